"""NexViTAD (seed 003, §3.1-3.2), federated: a frozen multi-scale encoder with adapters and
projected, interleaved DINOv2 features, trained through a multi-task decoder with a
pseudo-labelling head; inference by the federated Sinkhorn K-means memory bank on the trained
encoder's features (the decoder removed)."""

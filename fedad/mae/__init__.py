"""Method ``mae``: a masked autoencoder whose reconstruction error is the anomaly map."""

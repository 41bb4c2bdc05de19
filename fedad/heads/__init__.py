"""Feature-based anomaly detectors (NexViTAD's prototype memory bank, GMM and flow heads) and
their federated form: sites fit heads on their own patch features; only prototypes and
statistics cross to the server, which merges them into one global head."""

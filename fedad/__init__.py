"""fedad: federated industrial anomaly detection on Flower."""

"""Tracking: the MLflow writer, the store's read side, MLflow UI links."""

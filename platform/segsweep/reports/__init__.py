"""Reports: label-ratio curves, the answer published to MLflow, the dashboard."""

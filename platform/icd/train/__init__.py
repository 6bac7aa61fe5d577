"""Training: one Ray Train loop per stage, checkpoints, MLflow tracking."""

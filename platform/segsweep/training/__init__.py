"""Training: one run's loop, evaluation, checkpoints, devices, budgets."""

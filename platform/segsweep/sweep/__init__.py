"""The sweep: its spec, the driver, resume state, Ray Tune and Optuna at the edges."""

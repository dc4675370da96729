"""Training: shared state/optimizer, step functions, checkpoints, the pipeline."""

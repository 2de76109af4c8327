"""Training machinery: distributed setup, the DeepSpeed engine, checkpoints and metrics."""

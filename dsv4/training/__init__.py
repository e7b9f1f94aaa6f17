"""Training: validated run config, DeepSpeed engine and loop, metrics, checkpoints."""

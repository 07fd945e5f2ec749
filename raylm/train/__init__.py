"""Training, torch core only: the one Trainer, its step, FSDP2 wrapping, checkpoints, run directories and metrics."""

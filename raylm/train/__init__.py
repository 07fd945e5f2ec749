"""Training: the torch-core loop and step, FSDP wrapping, checkpoints, and the Ray Train glue."""

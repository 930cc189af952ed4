"""The training loop shared by every stage, and its checkpoints."""

"""eimctl: train and evaluate CLIP + projector + LM models with EIM (see README.md)."""

__version__ = "0.1.0"

"""Training stages, one per file. Each is started by `eimctl train-stage <name>`."""

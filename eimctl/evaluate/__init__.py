"""Evaluation: caption metrics (pycocoevalcap) and per-benchmark scoring."""

"""Data sets: readers for COCO Karpathy and generic JSONL, the demo generator, image loading."""

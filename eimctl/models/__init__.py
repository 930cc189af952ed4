"""Model parts (CLIP, projectors, LM), the family protocol and registry, and one module per family."""

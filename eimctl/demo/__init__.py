"""The offline embedded demo: its own small aligned CLIP and LM, pretrained on generated data."""

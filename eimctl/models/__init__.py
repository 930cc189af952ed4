"""Model parts: CLIP encoder, projectors (ST), language model, and the captioner that joins them."""

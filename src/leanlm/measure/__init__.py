"""Measurement: perplexity, KLD and top-1 against a reference (logits cached on disk), task accuracy and
generations (`evaluate`), and speed, memory and size (`bench`)."""

"""Preprocessing: requests in, the encoder's and the language model's tensors out (decoding, image kinds, resolution presets, chat templates)."""

"""Encoding: image patches to embeddings (the ONNX vision towers, their export, and the cache)."""

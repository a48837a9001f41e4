"""Importable logic behind the Triton models: images, chat prompts, per-family preprocessing,
batched generation, checkpoint loading and quantization, and the tools that deploy them.

Nothing here imports Triton's `triton_python_backend_utils`, except `vlm_serving.triton_models`,
which only runs inside Triton's Python-backend stub.
"""

"""Adapters between Triton's Python backend and `vlm_serving`: they only convert tensors.

These modules import `triton_python_backend_utils`, which exists only inside Triton's stub
process; each model's `model.py` in `model_repository/` re-exports one of these classes.
"""

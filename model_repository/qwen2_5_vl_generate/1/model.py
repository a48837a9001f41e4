"""qwen2_5_vl_generate: Triton adapter in vlm_serving/backend/generate_model.py, logic in vlm_serving/generation/batch.py."""

from vlm_serving.backend.generate_model import TritonPythonModel  # noqa: F401

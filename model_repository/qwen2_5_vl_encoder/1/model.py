"""qwen2_5_vl_encoder: Triton adapter in vlm_serving/backend/encoder_model.py, logic in vlm_serving/encoding/encoder.py."""

from vlm_serving.backend.encoder_model import TritonPythonModel  # noqa: F401

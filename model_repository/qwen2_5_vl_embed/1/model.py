"""qwen2_5_vl_embed: Triton adapter in vlm_serving/backend/embed_model.py, logic in vlm_serving/encoding/encoder.py."""

from vlm_serving.backend.embed_model import TritonPythonModel  # noqa: F401

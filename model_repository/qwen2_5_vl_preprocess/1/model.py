"""qwen2_5_vl_preprocess: Triton adapter in vlm_serving/backend/preprocess_model.py, logic in vlm_serving/preprocessing/preprocess.py."""

from vlm_serving.backend.preprocess_model import TritonPythonModel  # noqa: F401

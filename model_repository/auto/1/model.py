"""auto: Triton adapter in vlm_serving/backend/auto_model.py, logic in vlm_serving/routing.py."""

from vlm_serving.backend.auto_model import TritonPythonModel  # noqa: F401

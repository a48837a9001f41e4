"""cancel: Triton adapter in vlm_serving/backend/cancel_model.py, logic in vlm_serving/generation/cancellation.py."""

from vlm_serving.backend.cancel_model import TritonPythonModel  # noqa: F401

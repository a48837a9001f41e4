"""Helpers shared by the Python-backend adapters."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from vlm_serving.encoding.encoder_inputs import SPECS, ImageInputs, PackedImages, pack, unpack
from vlm_serving.errors import CALLER_ERROR_PREFIX, INTERNAL_ERROR_PREFIX


def model_parameters(args: dict) -> dict[str, str]:
    """The model config's `parameters`, with two overrides, strongest last:

    - a version folder that holds `checkpoint/` (weights shipped with that version, or a symlink
      to them) serves those weights instead of the `checkpoint` parameter;
    - `VLM_<MODEL>_<KEY>` in the environment replaces any parameter, e.g.
      `VLM_QWEN2_5_VL_GENERATE_CHECKPOINT=/weights/qwen2.5-vl-7b`.
    """
    config = json.loads(args["model_config"])
    values = {key: entry["string_value"] for key, entry in config.get("parameters", {}).items()}
    shipped = Path(args["model_repository"]) / args["model_version"] / "checkpoint"
    if "checkpoint" in values and (shipped / "config.json").is_file():
        values["checkpoint"] = str(shipped)
    prefix = f"VLM_{config['name'].upper()}_"
    for key in values:
        override = os.environ.get(prefix + key.upper())
        if override:
            values[key] = override
    return values


def optional_input(request, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def read_request_id(request) -> str:
    """The request's REQUEST_ID input ("" without one)."""
    value = optional_input(request, "REQUEST_ID")
    return "" if value is None else value.reshape(-1)[0].decode("utf-8")


def required_input(request, name: str) -> np.ndarray:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise ValueError(f"input {name} is required")
    return tensor.as_numpy()


def error_response(exc: Exception, caller_error: bool = True) -> "pb_utils.InferenceResponse":
    """A per-request error, so one bad request never fails its batch-mates (see vlm_serving.errors)."""
    if caller_error:
        error = pb_utils.TritonError(CALLER_ERROR_PREFIX + str(exc), pb_utils.TritonError.INVALID_ARG)
    else:
        error = pb_utils.TritonError(INTERNAL_ERROR_PREFIX + str(exc), pb_utils.TritonError.INTERNAL)
    return pb_utils.InferenceResponse(error=error)


def read_images(request, family: str) -> list[ImageInputs]:
    """A request's packed encoder inputs (one batch row), split back into images."""
    spec = SPECS[family]
    tensors = {entry.name: required_input(request, entry.name.upper())[0] for entry in spec}
    layout = required_input(request, "IMAGE_LAYOUT")[0]
    if layout.shape != (len(layout), len(spec)):
        raise ValueError(f"IMAGE_LAYOUT must be [images, {len(spec)}], got {list(layout.shape)}")
    return unpack(PackedImages(tensors, layout.astype(np.int64)), spec)


def image_tensors(images: list[ImageInputs], family: str) -> list["pb_utils.Tensor"]:
    """The packed encoder inputs of `images` as one batch row (the inverse of `read_images`)."""
    packed = pack(images, SPECS[family])
    tensors = {name.upper(): value for name, value in packed.tensors.items()}
    tensors["IMAGE_LAYOUT"] = packed.layout
    return [pb_utils.Tensor(name, np.ascontiguousarray(value)[None]) for name, value in tensors.items()]

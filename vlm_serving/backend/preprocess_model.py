"""Triton adapter for `vlm_serving.preprocessing.preprocess`: IMAGES + VIDEOS + MESSAGES in; token ids, the encoder's
packed inputs and the language model's image tensors out. A request whose caller has gone (REQUEST_ID on
the cancellation board) is answered with an error at once, its images never decoded."""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from vlm_serving.backend.cancel_model import AbandonedRequests
from vlm_serving.backend.common import (
    error_response, image_tensors, model_parameters, optional_input, read_request_id, required_input,
)
from vlm_serving.preprocessing.chat import MessageError
from vlm_serving.preprocessing.images import ImageError, ImageLimits
from vlm_serving.preprocessing.preprocess import image_threads, load_preprocessor
from vlm_serving.preprocessing.resolution import ResolutionPresets, parse_detail
from vlm_serving.preprocessing.video import VideoLimits
from vlm_serving.tracing import ModelTracing


def instance_count(args: dict) -> int:
    """How many instances of this model Triton runs (its instance groups' counts), each a process of its own."""
    groups = json.loads(args["model_config"]).get("instance_group") or [{}]
    return sum(int(group.get("count", 1)) for group in groups)


class TritonPythonModel:
    def initialize(self, args):
        parameters = model_parameters(args)
        limits = ImageLimits(
            max_bytes=int(parameters["max_image_bytes"]), max_pixels=int(parameters["max_image_pixels"])
        )
        self.family = parameters["family"]
        max_images = int(parameters["max_images"])
        self.preprocessor = load_preprocessor(
            self.family, parameters["checkpoint"], limits=limits, max_images=max_images,
            threads=image_threads(max_images, instance_count(args)),
            max_request_pixels=int(parameters["max_request_pixels"]),
            presets=ResolutionPresets.from_json(parameters["resolution_presets"]),
            video_limits=VideoLimits(max_bytes=int(parameters["max_video_bytes"])),
            max_videos=int(parameters["max_videos"]),
        )
        self.abandoned = AbandonedRequests(args)
        self.tracing = ModelTracing()

    def execute(self, requests):
        return [self._traced(request) for request in requests]

    def _traced(self, request):
        if not self.tracing.enabled:
            return self._preprocess(request)
        with self.tracing.span("preprocess", request, read_request_id(request)) as span:
            response = self._preprocess(request)
            if response.has_error():
                span.set_attribute("vlm.error", response.error().message())
            return response

    def finalize(self):
        self.tracing.shutdown()

    def _preprocess(self, request):
        abandoned = self.abandoned.response_if_abandoned(request)
        if abandoned is not None:
            return abandoned
        try:
            messages = required_input(request, "MESSAGES").reshape(-1)[0]
            images = optional_input(request, "IMAGES")
            encoded = [] if images is None else [bytes(image) for image in images.reshape(-1)]
            videos = optional_input(request, "VIDEOS")
            clips = [] if videos is None else [bytes(video) for video in videos.reshape(-1)]
            max_tokens = optional_input(request, "MAX_TOKENS")
            # Absent or 0: unset (the answer takes what the context leaves).
            budget = None if max_tokens is None else int(max_tokens.reshape(-1)[0]) or None
            detail = optional_input(request, "DETAIL")
            detail = None if detail is None else parse_detail(detail.reshape(-1)[0])
            task = optional_input(request, "TASK")
            task = None if task is None else task.reshape(-1)[0].decode("utf-8") or None
            tools = optional_input(request, "TOOLS")
            tools = [] if tools is None else json.loads(tools.reshape(-1)[0] or b"[]")
            result = self.preprocessor(encoded, messages, max_tokens=budget, detail=detail, task=task, tools=tools,
                                       encoded_videos=clips)
        except (ImageError, MessageError, ValueError) as exc:
            return error_response(exc)
        except Exception as exc:  # one request's unexpected failure must not fail its batch-mates
            return error_response(exc, caller_error=False)
        outputs = [pb_utils.Tensor("INPUT_IDS", result.input_ids[None])]
        outputs += image_tensors(result.images, self.family)
        outputs += [
            pb_utils.Tensor(name.upper(), np.ascontiguousarray(value)[None])
            for name, value in result.language_tensors.items()
        ]
        outputs.append(pb_utils.Tensor("IMAGE_TOKENS", np.array([[result.image_tokens]], dtype=np.int32)))
        outputs.append(pb_utils.Tensor("IMAGE_INFO", np.array([[result.image_info_json().encode()]], dtype=np.object_)))
        return pb_utils.InferenceResponse(output_tensors=outputs)

"""Triton adapter for `vlm_serving.generation.cancellation`: REQUEST_IDS in, each put on the board;
and `AbandonedRequests`, the board as the steps before generation read it."""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from vlm_serving.backend.common import optional_input, required_input
from vlm_serving.generation.cancellation import CancellationBoard


class TritonPythonModel:
    def initialize(self, args):
        self.board = CancellationBoard()

    def execute(self, requests):
        responses = []
        for request in requests:
            ids = [value.decode("utf-8") for value in required_input(request, "REQUEST_IDS").reshape(-1)]
            for request_id in ids:
                self.board.cancel(request_id)
            count = pb_utils.Tensor("CANCELLED", np.array([len(ids)], dtype=np.int32))
            responses.append(pb_utils.InferenceResponse(output_tensors=[count]))
        return responses


class AbandonedRequests:
    """Finds the requests whose caller has gone before a step inside an ensemble does their work
    (preprocessing, embedding): Triton never tells such a step that its caller left, so the step
    reads the cancellation board by REQUEST_ID (and `is_cancelled()`, for a direct caller).

    A step asks just before each request's own work, not once per batch: a request abandoned while
    its batch-mates' images were decoded is still skipped. Each skipped request is counted in
    `vlm_abandoned_requests_skipped_total` on Triton's metrics endpoint.
    """

    def __init__(self, args: dict):
        self.board = CancellationBoard()
        # The family must outlive its metric. Labelled per instance: two stubs' metrics with the same
        # labels would be one counter in the server, freed with whichever instance unloads first.
        self.family = pb_utils.MetricFamily(name="vlm_abandoned_requests_skipped_total",
                                            description="Requests whose caller had gone, skipped before their work",
                                            kind=pb_utils.MetricFamily.COUNTER)
        self.skipped = self.family.Metric(labels={"model": args["model_name"], "version": args["model_version"],
                                                  "instance": args["model_instance_name"]})

    def response_if_abandoned(self, request) -> "pb_utils.InferenceResponse | None":
        """None while the request's caller is there; else (counted) the error to answer it with at once."""
        request_id = optional_input(request, "REQUEST_ID")
        request_id = "" if request_id is None else request_id.reshape(-1)[0].decode("utf-8")
        if not (self.board.is_cancelled(request_id) or request.is_cancelled()):
            return None
        self.skipped.increment(1)
        error = pb_utils.TritonError(f"CANCELLED: request {request_id!r} was cancelled by its caller; its work was "
                                     "skipped", pb_utils.TritonError.CANCELLED)
        return pb_utils.InferenceResponse(error=error)

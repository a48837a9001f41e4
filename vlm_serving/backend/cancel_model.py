"""Triton adapter for `vlm_serving.generation.cancellation`: REQUEST_IDS in, each put on the board."""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from vlm_serving.backend.common import required_input
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

"""Triton adapter for `vlm_serving.encoding.encoder.OnnxEncoder`: the images of every request in a batch
run as one ONNX Runtime call and are split back per request."""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from vlm_serving.backend.common import error_response, model_parameters, read_images
from vlm_serving.encoding.encoder import EncoderChanges, OnnxEncoder, encode_each_request, encoder_identity


class TritonPythonModel:
    def initialize(self, args):
        parameters = model_parameters(args)
        self.family = parameters["family"]
        device = "cpu"
        if args["model_instance_kind"] == "GPU":
            device = f"cuda:{args['model_instance_device_id']}"
        onnx_dir = f"{parameters['checkpoint']}/onnx"
        self.encoder = OnnxEncoder(self.family, onnx_dir, parameters["variant"], device)
        version = int(args["model_version"])
        self.model_name = args["model_name"]
        self.identity = encoder_identity(self.model_name, version, self.encoder)
        # The embed step clears its cache on every load or unload: nothing the old encoder computed is reused.
        self.changes = EncoderChanges()
        self.changes.mark(self.model_name)
        pb_utils.Logger.log_info(
            f"{args['model_name']} version {version}: {self.encoder.path} on {', '.join(self.encoder.providers)}"
        )

    def finalize(self):
        self.changes.mark(self.model_name)

    def execute(self, requests):
        responses: list = [None] * len(requests)
        batch, owners = [], []
        for index, request in enumerate(requests):
            try:
                batch.append(read_images(request, self.family))
            except (ValueError, IndexError) as exc:
                responses[index] = error_response(exc)
                continue
            owners.append(index)
        answers = encode_each_request(self.encoder.encode, batch)
        identity = np.array([[self.identity.encode()]], dtype=np.object_)
        for index, rows in zip(owners, answers):
            if isinstance(rows, Exception):
                responses[index] = error_response(rows, caller_error=False)
                continue
            joined = np.concatenate(rows) if rows else np.zeros((0, self.encoder.hidden_size), dtype=np.float32)
            responses[index] = pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("IMAGE_EMBEDS", joined[None]), pb_utils.Tensor("ENCODER_IDENTITY", identity)]
            )
        return responses

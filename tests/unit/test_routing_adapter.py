"""Model `auto`'s Triton adapter (vlm_serving/backend/auto_model.py) in-process, on a stand-in for
Triton's Python-backend utilities (tests/unit/fake_pb_utils.py): the families' ensembles answer its
BLS calls as the test scripts them; the gateway puts a request it gives up on onto the cancellation
board, as the `cancel` model does."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from tests.unit import fake_pb_utils
from tests.unit.fake_pb_utils import ReceivedRequest, request_id
from vlm_serving.deploy.render import PROFILES, render_router
from vlm_serving.generation import cancellation
from vlm_serving.generation.cancellation import CancellationBoard

MESSAGES = json.dumps([{"role": "user", "content": [{"type": "text", "text": "What is it?"}]}])
# What a family's preprocessing answers a request whose caller is gone (backend/cancel_model.py).
SKIPPED = "CANCELLED: request 'req-1|pixtral.2' was cancelled by its caller; its work was skipped"


@pytest.fixture
def triton(monkeypatch, tmp_path):
    """The stand-in installed, and the board the adapter opens (a file of this test's own)."""
    monkeypatch.setattr(cancellation, "board_path", lambda server_pid=None: tmp_path / "board")
    with fake_pb_utils.installed() as pb_utils:
        yield pb_utils


class Request(ReceivedRequest):
    """A request to the decoupled router, with the sender its responses go to (recorded as sent)."""

    def __init__(self, tensors):
        super().__init__(tensors)
        self.sent: list[tuple[object, int]] = []

    def get_response_sender(self):
        return self

    def send(self, response=None, flags=0):
        self.sent.append((response, flags))


def router():
    config = json_format.MessageToDict(
        text_format.Parse(render_router(PROFILES["cpu"]), model_config_pb2.ModelConfig()),
        preserving_proto_field_name=True)
    model = importlib.import_module("vlm_serving.backend.auto_model").TritonPythonModel()
    model.initialize({"model_config": json.dumps(config), "model_name": "auto", "model_version": "1",
                      "model_instance_name": "auto_0_0", "model_repository": "/nonexistent/auto"})
    return model


def answer(pb_utils, confidence: float) -> list:
    """A family's whole answer: its one, final response."""
    def tensor(name, value, dtype):
        return pb_utils.Tensor(name, np.array([[value]], dtype=dtype))

    return [pb_utils.InferenceResponse([
        tensor("TEXT", b"a cat", np.object_), tensor("FINISH_REASON", b"length", np.object_),
        tensor("CONFIDENCE", confidence, np.float32), tensor("COMPLETION_TOKENS", 2, np.int32),
        tensor("MODEL_VERSION", b"1", np.object_)])]


def route_of(response) -> dict:
    return json.loads(fake_pb_utils.get_output_tensor_by_name(response, "ROUTE_INFO").as_numpy()[0, 0])


@pytest.mark.parametrize("caller_gone", [False, True])
def test_a_caller_gone_between_qwens_answer_and_pixtrals_call_ends_the_request_not_a_fallback(triton, caller_gone):
    """Qwen's answer is doubtful, so Pixtral is asked; meanwhile the gateway gave up on the request
    (its deadline: the id on the board; Triton's own cancellation never reached the router), and
    Pixtral's preprocessing skips it. Its failure is the caller's doing: nobody is answered. With the
    caller still there, the same failure is Pixtral's, and Qwen's held answer is returned."""

    def families(model_name, inputs):
        if model_name == "qwen2_5_vl":
            return answer(triton, confidence=-2.0)
        if model_name == "pixtral":
            if caller_gone:
                CancellationBoard().cancel("req-1")
            return [triton.InferenceResponse(error=triton.TritonError(SKIPPED, triton.TritonError.CANCELLED))]
        return triton.InferenceResponse()  # the `cancel` model

    triton.bls_handler = families
    model = router()
    request = Request({"MESSAGES": np.array([[MESSAGES.encode()]], dtype=np.object_), "REQUEST_ID": request_id("req-1")})
    model.execute([request])
    model.finalize()  # waits for the request's thread

    calls = [(name, inputs["REQUEST_ID"][0, 0].decode()) for name, inputs in fake_pb_utils.bls_calls if name != "cancel"]
    assert calls == [("qwen2_5_vl", "req-1|qwen2_5_vl.1"), ("pixtral", "req-1|pixtral.2")]
    [(response, flags)] = request.sent
    assert flags == triton.TRITONSERVER_RESPONSE_COMPLETE_FINAL
    if caller_gone:
        assert response is None, "the stream ends with no answer"
    else:
        assert not response.has_error() and route_of(response)["reason"] == "fallback_failed"
        assert [a["error"] for a in route_of(response)["attempts"]] == ["", SKIPPED]

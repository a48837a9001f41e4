"""Triton adapter for `vlm_serving.routing` (decoupled): model `auto` answers a request with the
family that `route` chooses, calling that family's ensemble through BLS.

Each request is handled on a thread of its own, and each call to a family is sent from another
(BLS exec blocks until the first response), so `execute` only hands requests over and a
request's images are classified while its speculative call to the primary runs. The image kinds come from the same classifier the preprocessing step runs; an image that
does not decode is left unclassified here, and the family's own preprocessing refuses it with its
exact error. Each call to a family carries a sub-request id of the request's REQUEST_ID (one is
made up when the caller sent none; `cancellation.subrequest_id`), numbered per call, so cancelling
the request on the board reaches every family's generation row, and an abandoned call can be
cancelled alone (and the family asked again under a new id); a caller that goes away mid-answer
has its REQUEST_ID put on the board here.

A call that fails (its error response: BLS exec answers a refusal, such as a model not ready, with
one too) is an error reply for `route`, unless the caller is gone (cancelled, or on the board,
where the gateway puts a request at its deadline): then the call raises `CallerGone`, since the
failure is the caller's own doing.
"""

from __future__ import annotations

import itertools
import json
import re
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

from vlm_serving.backend.common import model_parameters, optional_input
from vlm_serving.generation.cancellation import CancellationBoard, subrequest_id
from vlm_serving.deploy.render import RESPONSE_TENSORS, ROUTER_PARAMETERS
from vlm_serving.errors import CALLER_ERROR_PREFIX
from vlm_serving.preprocessing.image_kind import classify
from vlm_serving.preprocessing.images import ImageError, decode_image
from vlm_serving.routing import CallerGone, Reply, Route, RoutingOptions, route

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
FORWARDED_INPUTS = ["MESSAGES", "IMAGES", "VIDEOS", "DETAIL", "TASK", "TOOLS"] + [name for name, _, _ in ROUTER_PARAMETERS]
OUTPUTS = [name for name, _, _ in RESPONSE_TENSORS]
# What Triton core puts in front of a family's message: the request's id, the ensemble whose step failed.
_TRITON_PREFIXES = re.compile(r"^(\[request id: [^\]]*\] |in ensemble '[^']*', )+")


def _scalar(response, name: str):
    return pb_utils.get_output_tensor_by_name(response, name).as_numpy().reshape(-1)[0]


class TritonPythonModel:
    def initialize(self, args):
        parameters = model_parameters(args)
        self.default_threshold = float(parameters["confidence_threshold"])
        concurrent = int(parameters["max_concurrent_requests"])
        self.pool = ThreadPoolExecutor(concurrent, thread_name_prefix="auto")
        # BLS exec blocks until the call's first response (a whole answer when not streamed), so
        # calls are sent from threads of their own: the request's thread classifies meanwhile.
        # Two per request at most (a speculative call being read off, and the answering one).
        self.calls = ThreadPoolExecutor(2 * concurrent, thread_name_prefix="auto-call")
        self.board = CancellationBoard()  # where the gateway names the requests whose callers went away
        self.logger = pb_utils.Logger

    def execute(self, requests):
        for request in requests:
            self.pool.submit(self._answer, request, request.get_response_sender())
        return None

    def _answer(self, request, sender) -> None:
        try:
            inputs = {name: value for name in FORWARDED_INPUTS
                      if (value := optional_input(request, name)) is not None}
            request_id = (inputs["REQUEST_ID"].reshape(-1)[0].decode() if "REQUEST_ID" in inputs
                          else uuid.uuid4().hex)
            stream = bool(inputs["STREAM"].reshape(-1)[0]) if "STREAM" in inputs else False
            numbers = itertools.count(1)  # of the request's calls
            route(lambda: self._kinds(inputs.get("IMAGES")), self._options(request), stream,
                  call=lambda family, streamed: self._call(family, inputs, streamed, request, request_id, next(numbers)),
                  send=lambda reply, family, answer: self._send(sender, reply, family, answer),
                  abandon=lambda family, replies: self._abandon(replies),
                  has_video="VIDEOS" in inputs and inputs["VIDEOS"].size > 0)
        except CallerGone:
            sender.send(flags=FINAL)
        except Exception as exc:  # never leave the caller's stream open
            self.logger.log_error(f"auto: {type(exc).__name__}: {exc}")
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"auto: {exc}")), flags=FINAL)

    def _options(self, request) -> RoutingOptions:
        threshold = optional_input(request, "CONFIDENCE_THRESHOLD")
        fallback = optional_input(request, "FALLBACK")
        return RoutingOptions(
            confidence_threshold=self.default_threshold if threshold is None else float(threshold.reshape(-1)[0]),
            fallback=True if fallback is None else bool(fallback.reshape(-1)[0]),
        )

    @staticmethod
    def _kinds(images) -> list:
        kinds = []
        for index, data in enumerate([] if images is None else images.reshape(-1)):
            try:
                kinds.append(classify(decode_image(bytes(data), index=index)))
            except ImageError:
                pass  # the family's preprocessing refuses it, with its own message
        return kinds

    def _call(self, family: str, inputs: dict, stream: bool, request, request_id: str, number: int) -> "_Call":
        """Send the request to `family` now, as the request's call `number`; its replies as they come."""
        call_id = subrequest_id(request_id, f"{family}.{number}")
        tensors = dict(inputs, STREAM=np.array([[stream]], dtype=np.bool_),
                       REQUEST_ID=np.array([[call_id.encode()]], dtype=np.object_))
        call = pb_utils.InferenceRequest(
            model_name=family, requested_output_names=OUTPUTS,
            inputs=[pb_utils.Tensor(name, value) for name, value in tensors.items()],
        )
        return _Call(self.calls.submit(call.exec, decoupled=True), request, call_id,
                     cancel_request=lambda: self._cancel(request_id),
                     caller_gone=lambda: request.is_cancelled() or self.board.is_cancelled(request_id))

    def _abandon(self, replies: "_Call") -> None:
        """Stop a call whose answer is not wanted: its generation row is freed at the next step;
        its last responses are read off on the pool, so the caller's answer does not wait."""
        self._cancel(replies.call_id)
        self.calls.submit(replies.drain)

    @staticmethod
    def _send(sender, reply: Reply, family: str, answer: Route) -> None:
        """Forward a family's response, with ROUTE_INFO: the answering family, the reason and the
        attempts so far on every response (the final one's include the answering family's): a gateway
        continuing the stream on another server (gateway/migration.py) keeps the route from them."""
        if reply.error is not None:
            code = pb_utils.TritonError.INVALID_ARG if reply.error.startswith(CALLER_ERROR_PREFIX) else pb_utils.TritonError.INTERNAL
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(reply.error, code)), flags=FINAL)
            return
        info = {"family": family} | answer.to_dict()
        tensors = reply.payload.output_tensors() + [
            pb_utils.Tensor("ROUTE_INFO", np.array([[json.dumps(info).encode()]], dtype=np.object_))]
        sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=FINAL if reply.finished else 0)

    @staticmethod
    def _cancel(request_id: str) -> None:
        ids = pb_utils.Tensor("REQUEST_IDS", np.array([request_id.encode()], dtype=np.object_))
        pb_utils.InferenceRequest(model_name="cancel", requested_output_names=["CANCELLED"], inputs=[ids]).exec()

    def finalize(self):
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.calls.shutdown(wait=True, cancel_futures=True)


class _Call:
    """A call sent to a family (`sent`: its BLS exec, running on a thread); its replies, read once.

    The caller's cancellation is checked before each reply up to the final one, never after:
    once our final response is sent, Triton frees the request, and asking it then crashes the
    server (TRITONBACKEND_ResponseFactoryIsCancelled on a freed factory). A failure is always a
    final reply, read before anything of ours is final."""

    def __init__(self, sent, request, call_id: str, cancel_request, caller_gone):
        self.sent, self.request, self.call_id = sent, request, call_id
        self.cancel_request, self.caller_gone = cancel_request, caller_gone

    def __iter__(self):
        finished = False
        for response in self.sent.result():
            if not finished and self.request.is_cancelled():
                self.cancel_request()
                raise CallerGone()
            if response.has_error():
                yield self._failure(response.error().message(), response)
                return
            if not response.output_tensors():  # the empty response that only carries the final flag
                continue
            finish_reason = _scalar(response, "FINISH_REASON").decode()
            finished = bool(finish_reason)
            yield Reply(finished, finish_reason, float(_scalar(response, "CONFIDENCE")),
                        int(_scalar(response, "COMPLETION_TOKENS")), _scalar(response, "MODEL_VERSION").decode(),
                        payload=response)

    def _failure(self, message: str, response) -> Reply:
        if self.caller_gone():
            raise CallerGone()
        return Reply(True, error=_TRITON_PREFIXES.sub("", message), payload=response)

    def drain(self) -> None:
        """Read an abandoned call to its end, without asking the (maybe finished) request anything."""
        for _ in self.sent.result():
            pass

"""Model `auto`: which family answers, with a confidence fallback from Qwen2.5-VL to Pixtral.

The two-stage design this service grew from: Qwen2.5-VL is the fast primary model; Pixtral
answers requests with a diagram among their images (reason IMAGE_KIND), and requests whose
Qwen answer is less confident than the threshold are answered again by Pixtral (reason
LOW_CONFIDENCE); the rest keep Qwen's answer (reason DEFAULT).

Confidence is the answer's mean log-probability per generated token (0: certain); the default
threshold is ln(0.85) = -0.1625, the design's 0.85 read as the geometric-mean probability of the
answer's tokens. While the fallback is possible, Qwen's answer is held (asked for whole, not
streamed) until its confidence is known; a stream then gets it as one message, or Pixtral's
answer streamed. Routing by image kind, or with the fallback off, streams at once.

`route` is the whole decision, apart from Triton: the adapter (`backend/auto_model.py`) gives
it functions that classify the images, call a family, abandon a call and send a reply.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum

from vlm_serving.preprocessing.image_kind import ImageKind

PRIMARY = "qwen2_5_vl"
SPECIALIST = "pixtral"
DEFAULT_CONFIDENCE_THRESHOLD = math.log(0.85)


class RouteReason(str, Enum):
    IMAGE_KIND = "image_kind"  # a diagram among the images: the specialist answers
    LOW_CONFIDENCE = "low_confidence"  # the primary's answer was below the threshold
    DEFAULT = "default"  # the primary's answer


@dataclass(frozen=True)
class RoutingOptions:
    confidence_threshold: float = DEFAULT_CONFIDENCE_THRESHOLD
    fallback: bool = True


@dataclass
class Reply:
    """One response of a family's ensemble, as routing needs to see it; `payload` is what the
    adapter forwards (the Triton response)."""

    finished: bool
    finish_reason: str = ""
    confidence: float = 0.0
    completion_tokens: int = 0
    model_version: str = ""
    error: str | None = None
    payload: object = None


@dataclass
class Attempt:
    family: str
    model_version: str
    confidence: float
    completion_tokens: int


@dataclass
class Route:
    reason: RouteReason
    attempts: list[Attempt] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"reason": self.reason.value, "attempts": [attempt.__dict__ for attempt in self.attempts]}


Send = Callable[[Reply, str, "Route | None"], None]
Call = Callable[[str, bool], Iterable[Reply]]


def route(kinds: Callable[[], list[ImageKind]], options: RoutingOptions, stream: bool, call: Call, send: Send,
          abandon: Callable[[str, Iterable[Reply]], None]) -> Route:
    """Answer one request.

    `call(family, stream)` sends the request to a family's ensemble at once and returns its
    replies; `send(reply, family, route)` forwards a reply of `family` to the caller, the final
    one with the route; `abandon(family, replies)` stops a call whose answer is not wanted.
    `kinds()` classifies the images (decoding them takes milliseconds): the primary is asked
    first, speculatively, so that time overlaps its preprocessing, and is abandoned when a
    diagram sends the request to the specialist. An error reply ends the request as it is (the
    family's own message), with the route so far.
    """
    primary = call(PRIMARY, stream and not options.fallback)
    if ImageKind.DIAGRAM in kinds():
        abandon(PRIMARY, primary)
        return _relay(SPECIALIST, RouteReason.IMAGE_KIND, [], call(SPECIALIST, stream), send)
    if not options.fallback:
        return _relay(PRIMARY, RouteReason.DEFAULT, [], primary, send)
    held = None
    for reply in primary:  # read to its end, so the call is complete
        if reply.finished:
            held = reply
    if held is None:
        raise RuntimeError(f"{PRIMARY} ended its responses without a final one")
    attempts = [Attempt(PRIMARY, held.model_version, held.confidence, held.completion_tokens)]
    # An error, or a request cancelled meanwhile, ends here: a fallback would only redo dead work.
    if held.error is not None or held.finish_reason == "cancelled" or held.confidence >= options.confidence_threshold:
        answer = Route(RouteReason.DEFAULT, attempts)
        send(held, PRIMARY, answer)
        return answer
    return _relay(SPECIALIST, RouteReason.LOW_CONFIDENCE, attempts, call(SPECIALIST, stream), send)


def _relay(family: str, reason: RouteReason, attempts: list[Attempt], replies: Iterable[Reply], send: Send) -> Route:
    answer, finished = Route(reason, attempts), False
    for reply in replies:
        if reply.finished:
            attempts.append(Attempt(family, reply.model_version, reply.confidence, reply.completion_tokens))
            finished = True
        send(reply, family, answer if reply.finished else None)
    if not finished:
        raise RuntimeError(f"{family} ended its responses without a final one")
    return answer

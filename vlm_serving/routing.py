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
it a function that calls a family and one that sends a reply to the caller.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum

from vlm_serving.image_kind import ImageKind

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


def first_choice(kinds: list[ImageKind]) -> tuple[str, RouteReason]:
    if ImageKind.DIAGRAM in kinds:
        return SPECIALIST, RouteReason.IMAGE_KIND
    return PRIMARY, RouteReason.DEFAULT


Send = Callable[[Reply, str, "Route | None"], None]


def route(kinds: list[ImageKind], options: RoutingOptions, stream: bool,
          call: Callable[[str, bool], Iterator[Reply]], send: Send) -> Route:
    """Answer one request: `call(family, stream)` runs it on a family's ensemble; `send(reply,
    family, route)` forwards a reply of `family` to the caller, the final one with the route. An
    error reply ends the request as it is (the family's own message), with the route so far."""
    family, reason = first_choice(kinds)
    if family == SPECIALIST or not options.fallback:
        return _relay(family, reason, stream, [], call, send)
    held = None
    for reply in call(PRIMARY, False):  # read to its end, so the call is complete
        if reply.finished:
            held = reply
    if held is None:
        raise RuntimeError(f"{PRIMARY} ended its responses without a final one")
    attempts = [Attempt(PRIMARY, held.model_version, held.confidence, held.completion_tokens)]
    if held.error is not None or held.confidence >= options.confidence_threshold:
        answer = Route(RouteReason.DEFAULT, attempts)
        send(held, PRIMARY, answer)
        return answer
    return _relay(SPECIALIST, RouteReason.LOW_CONFIDENCE, stream, attempts, call, send)


def _relay(family: str, reason: RouteReason, stream: bool, attempts: list[Attempt],
           call: Callable[[str, bool], Iterator[Reply]], send: Send) -> Route:
    answer, finished = Route(reason, attempts), False
    for reply in call(family, stream):
        if reply.finished:
            attempts.append(Attempt(family, reply.model_version, reply.confidence, reply.completion_tokens))
            finished = True
        send(reply, family, answer if reply.finished else None)
    if not finished:
        raise RuntimeError(f"{family} ended its responses without a final one")
    return answer

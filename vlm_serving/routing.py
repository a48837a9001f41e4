"""Model `auto`: which family answers, with a confidence fallback from Qwen2.5-VL to Pixtral.

The two-stage design this service grew from: Qwen2.5-VL is the fast primary model; Pixtral
answers requests with a diagram among their images (reason IMAGE_KIND), and requests whose
Qwen answer is less confident than the threshold are answered again by Pixtral (reason
LOW_CONFIDENCE); the rest keep Qwen's answer (reason DEFAULT). A request with a video is Qwen's
alone (reason VIDEO, streamed at once): Qwen2.5-VL reads a clip natively, with its frames' timing
in its 3-D positions; Pixtral has no temporal positions and would read loose frames.

Confidence is the answer's mean log-probability per generated token (0: certain); the default
threshold is ln(0.85) = -0.1625, the design's 0.85 read as the geometric-mean probability of the
answer's tokens. While the fallback is possible, Qwen's answer is held (asked for whole, not
streamed) until its confidence is known; a stream then gets it as one message, or Pixtral's
answer streamed. Routing by image kind, or with the fallback off, streams at once.

Routing keeps the answer it has: when Pixtral's call fails, a held Qwen answer is returned
(reason FALLBACK_FAILED), and a diagram is answered by Qwen after all (reason SPECIALIST_FAILED,
Qwen asked again: its speculative call was abandoned); the failed attempt is listed with its
error. Every failure of Pixtral's call counts: a refusal that did no work (its queue full, the
model not loaded or not ready, the server unavailable) as much as an error midway. Not a failure:
the caller's cancellation or passed deadline (the call's replies raise `CallerGone`): the request
ends there, nobody is answered. Nor can a stream take it back once Pixtral's text was sent: an
error after that ends the request with Pixtral's error, so no caller reads two answers.

`route` is the whole decision, apart from Triton: the adapter (`backend/auto_model.py`) gives
it functions that classify the images, call a family, abandon a call and send a reply.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum

from vlm_serving.pipelines import PRIMARY
from vlm_serving.preprocessing.image_kind import ImageKind

SPECIALIST = "pixtral"
DEFAULT_CONFIDENCE_THRESHOLD = math.log(0.85)


class RouteReason(str, Enum):
    IMAGE_KIND = "image_kind"  # a diagram among the images: the specialist answers
    LOW_CONFIDENCE = "low_confidence"  # the primary's answer was below the threshold
    DEFAULT = "default"  # the primary's answer
    FALLBACK_FAILED = "fallback_failed"  # below the threshold, but the specialist's call failed: the primary's answer
    SPECIALIST_FAILED = "specialist_failed"  # a diagram, but the specialist's call failed: the primary answers
    VIDEO = "video"  # the request holds a video: the primary, which reads clips natively, answers


class CallerGone(Exception):
    """Raised by a call's replies when the caller cancelled the request or its deadline passed:
    the request ends, and no other family is asked."""


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
    error: str = ""  # why the attempt gave no answer (its family's error); empty when it answered

    @classmethod
    def of(cls, family: str, final: Reply) -> "Attempt":
        return cls(family, final.model_version, final.confidence, final.completion_tokens, final.error or "")


@dataclass
class Route:
    reason: RouteReason
    attempts: list[Attempt] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"reason": self.reason.value, "attempts": [attempt.__dict__ for attempt in self.attempts]}


# (reply, its family, the route: on a reply before the final one, its reason and the attempts before it)
Send = Callable[[Reply, str, Route], None]
Call = Callable[[str, bool], Iterable[Reply]]


def route(kinds: Callable[[], list[ImageKind]], options: RoutingOptions, stream: bool, call: Call, send: Send,
          abandon: Callable[[str, Iterable[Reply]], None], has_video: bool = False) -> Route:
    """Answer one request.

    `call(family, stream)` sends the request to a family's ensemble at once and returns its
    replies (which raise `CallerGone` when the caller went away); `send(reply, family, route)`
    forwards a reply of `family` to the caller, the final one with the route; `abandon(family,
    replies)` stops a call whose answer is not wanted. `kinds()` classifies the images (decoding
    them takes milliseconds): the primary is asked first, speculatively, so that time overlaps
    its preprocessing, and is abandoned when a diagram sends the request to the specialist. An
    error reply ends the request as it is (the family's own message), with the route so far,
    unless another answer can stand in for it (the module's docstring). A request with a video
    goes to the primary alone: the specialist would read the clip as loose frames, without their timing.
    """
    if has_video:
        return _relay(PRIMARY, RouteReason.VIDEO, [], call(PRIMARY, stream), send)
    primary = call(PRIMARY, stream and not options.fallback)
    if ImageKind.DIAGRAM in kinds():
        abandon(PRIMARY, primary)
        attempts: list[Attempt] = []
        return (_relay(SPECIALIST, RouteReason.IMAGE_KIND, attempts, call(SPECIALIST, stream), send, recoverable=True)
                or _relay(PRIMARY, RouteReason.SPECIALIST_FAILED, attempts, call(PRIMARY, stream), send))
    if not options.fallback:
        return _relay(PRIMARY, RouteReason.DEFAULT, [], primary, send)
    held = None
    for reply in primary:  # read to its end, so the call is complete
        if reply.finished:
            held = reply
    if held is None:
        raise RuntimeError(f"{PRIMARY} ended its responses without a final one")
    attempts = [Attempt.of(PRIMARY, held)]
    # An error, or a request cancelled meanwhile, ends here: a fallback would only redo dead work.
    if held.error is not None or held.finish_reason == "cancelled" or held.confidence >= options.confidence_threshold:
        return _deliver(held, Route(RouteReason.DEFAULT, attempts), send)
    return (_relay(SPECIALIST, RouteReason.LOW_CONFIDENCE, attempts, call(SPECIALIST, stream), send, recoverable=True)
            or _deliver(held, Route(RouteReason.FALLBACK_FAILED, attempts), send))


def _deliver(held: Reply, answer: Route, send: Send) -> Route:
    send(held, PRIMARY, answer)
    return answer


def _relay(family: str, reason: RouteReason, attempts: list[Attempt], replies: Iterable[Reply], send: Send,
           recoverable: bool = False) -> Route | None:
    """Forward `family`'s replies, the final one with the route; its attempt joins `attempts`.

    `recoverable`: another answer can stand in, so a failure before any reply was forwarded is
    not sent; the attempt is kept with its error and None returned."""
    answer, finished, forwarded = Route(reason, attempts), False, False
    for reply in replies:
        if reply.finished:
            attempts.append(Attempt.of(family, reply))
            finished = True
            if reply.error is not None and recoverable and not forwarded:
                return None
        send(reply, family, answer)  # the route so far on every reply: a stream migrated mid-answer keeps it
        forwarded = True
    if not finished:
        raise RuntimeError(f"{family} ended its responses without a final one")
    return answer

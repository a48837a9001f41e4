"""One budget for the encoded image and video bytes that all requests in flight hold in the gateway.

A request's size is bounded on its own (VLM_MAX_REQUEST_BYTES, VLM_MAX_REQUEST_IMAGE_BYTES), but
nothing else bounds how many large requests the gateway holds at once: a hundred concurrent 64 MiB
requests would hold 6.4 GB. Every request therefore reserves its media bytes here as soon as their
size is known (an HTTP body's Content-Length before the body is read, a gRPC message's image and
video data when the servicer sees it, a URL's body chunk by chunk as it is fetched) and gives them
back when it ends, whichever way it ends. A request that would take the total past the limit is
refused with RESOURCE_EXHAUSTED and a short RetryInfo: it did no work, and the bytes come back as
the requests in flight end.

A request's reservation is found through a context variable, so the HTTP handler, the servicer and
the URL fetches (tasks copy the context) all add to the same one; it is returned when the last of
them that holds it ends. Reservations are made on the event loop only: no await between the check
and the update, so the counter needs no lock.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

import grpc
from vlm.v1 import vlm_pb2

from gateway.errors import ApiError

# What a refused caller is told to wait: requests in flight end within seconds, typically.
RETRY_AFTER_S = 1.0


class Reservation:
    """The bytes one request holds; shared by every part of the gateway that serves the request."""

    def __init__(self, budget: "MediaBudget"):
        self.budget = budget
        self.bytes = 0
        self.holders = 0

    def add(self, count: int) -> None:
        """Hold `count` more bytes (a fetched chunk), or refuse the request."""
        self.budget.take(count)
        self.bytes += count

    def cover(self, total: int) -> None:
        """Hold at least `total` bytes in all (what the request is known to carry)."""
        if total > self.bytes:
            self.add(total - self.bytes)


_current: ContextVar[Reservation | None] = ContextVar("media_reservation", default=None)


class MediaBudget:
    """At most `limit` bytes of encoded images and videos held across all requests in flight."""

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0

    def take(self, count: int) -> None:
        if self.held + count > self.limit:
            raise ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"the gateway's budget for images and videos held by requests in flight is spent "
                           f"({self.held} of {self.limit} bytes held, this request needs {count} more; "
                           f"VLM_MAX_INFLIGHT_MEDIA_BYTES); retry after {RETRY_AFTER_S:g}s",
                           retry_after_s=RETRY_AFTER_S)
        self.held += count

    @contextmanager
    def hold(self) -> Iterator[Reservation]:
        """The current request's reservation (a new one outside any), returned to the budget when
        the last `hold` of it ends: success, error, cancellation or deadline."""
        reservation = _current.get()
        token = None
        if reservation is None or reservation.budget is not self or reservation.holders == 0:
            reservation = Reservation(self)
            token = _current.set(reservation)
        reservation.holders += 1
        try:
            yield reservation
        finally:
            reservation.holders -= 1
            if reservation.holders == 0:
                self.held -= reservation.bytes
                reservation.bytes = 0
            if token is not None:
                _current.reset(token)


def _held() -> Reservation | None:
    reservation = _current.get()
    return reservation if reservation is not None and reservation.holders else None


def hold_more(count: int) -> None:
    """Add `count` bytes to the current request's reservation (none outside a request: nothing to count)."""
    if (reservation := _held()) is not None:
        reservation.add(count)


def cover(total: int) -> None:
    """The current request holds at least `total` bytes (none outside a request: nothing to count)."""
    if (reservation := _held()) is not None:
        reservation.cover(total)


def media_bytes(request: vlm_pb2.GenerateRequest) -> int:
    """The image and video data a GenerateRequest carries (URLs are counted as they are fetched)."""
    return sum(len(part.image.data) + len(part.video.data) for message in request.messages for part in message.parts)

"""Model `auto`'s decision, apart from Triton: fake families that answer with a given confidence."""

from __future__ import annotations

import math

import pytest

from vlm_serving.preprocessing.image_kind import ImageKind
from vlm_serving.routing import DEFAULT_CONFIDENCE_THRESHOLD, CallerGone, Reply, RouteReason, RoutingOptions, route

PHOTO, DOCUMENT, DIAGRAM = ImageKind.PHOTO, ImageKind.DOCUMENT, ImageKind.DIAGRAM


class Families:
    """Each family streams three deltas (or one whole answer) with its confidence; records calls
    (when they are sent, before any reply is read) and abandoned calls. A family can be made to
    fail (`fail`), or to find its caller gone (`gone_during`)."""

    def __init__(self, qwen_confidence=-0.05, pixtral_confidence=-0.3, error=None):
        self.confidence = {"qwen2_5_vl": qwen_confidence, "pixtral": pixtral_confidence}
        self.error = error
        self.failures = {}  # family -> (error, deltas streamed before it)
        self.gone_during = set()
        self.finish_reason = "length"
        self.calls, self.sent, self.abandoned, self.events = [], [], [], []

    def fail(self, family, error, after_deltas=0):
        self.failures[family] = (error, after_deltas)

    def call(self, family, stream):
        self.calls.append((family, stream))
        self.events.append(f"call {family}")
        return self._replies(family, stream)

    def _replies(self, family, stream):
        if family in self.gone_during:
            raise CallerGone()
        if self.error:
            yield Reply(True, error=self.error, payload=f"{family}: error")
            return
        if family in self.failures:
            error, after_deltas = self.failures[family]
            for index in range(after_deltas if stream else 0):
                yield Reply(False, payload=f"{family}: delta {index}")
            yield Reply(True, error=error, payload=f"{family}: error")
            return
        if stream:
            for index in range(2):
                yield Reply(False, payload=f"{family}: delta {index}")
        yield Reply(True, self.finish_reason, self.confidence[family], 3, "1", payload=f"{family}: final")

    def abandon(self, family, replies):
        self.abandoned.append(family)

    def kinds(self, kinds):
        def classify():
            self.events.append("classified")
            return kinds
        return classify

    def route(self, kinds, options, stream, has_video=False):
        return route(self.kinds(kinds), options, stream, self.call, self.send, self.abandon, has_video=has_video)

    def send(self, reply, family, answer):
        assert reply.payload.startswith(family)
        self.sent.append((reply.payload, (answer.reason, [a.family for a in answer.attempts])))


@pytest.mark.parametrize("stream", [False, True])
def test_a_diagram_goes_to_pixtral_at_once_and_streams(stream):
    families = Families()
    answer = families.route([PHOTO, DIAGRAM], RoutingOptions(), stream)
    # Qwen was asked before the images were classified (speculatively), then abandoned unread.
    assert families.events[:2] == ["call qwen2_5_vl", "classified"] and families.abandoned == ["qwen2_5_vl"]
    assert answer.reason == RouteReason.IMAGE_KIND and families.calls[1:] == [("pixtral", stream)]
    # Every delta says the route so far (a stream migrated mid-answer keeps it).
    expected_deltas = ([("pixtral: delta 0", (RouteReason.IMAGE_KIND, [])), ("pixtral: delta 1", (RouteReason.IMAGE_KIND, []))]
                       if stream else [])
    assert families.sent == expected_deltas + [("pixtral: final", (RouteReason.IMAGE_KIND, ["pixtral"]))]


@pytest.mark.parametrize("stream", [False, True])
def test_a_video_goes_to_qwen_alone_streamed_at_once_even_beside_a_diagram_or_doubtful(stream):
    families = Families(qwen_confidence=-2.0)
    answer = families.route([DIAGRAM], RoutingOptions(), stream, has_video=True)
    assert answer.reason == RouteReason.VIDEO and families.calls == [("qwen2_5_vl", stream)]
    assert "classified" not in families.events and families.abandoned == []
    expected_deltas = ([("qwen2_5_vl: delta 0", (RouteReason.VIDEO, [])), ("qwen2_5_vl: delta 1", (RouteReason.VIDEO, []))]
                       if stream else [])
    assert families.sent == expected_deltas + [("qwen2_5_vl: final", (RouteReason.VIDEO, ["qwen2_5_vl"]))]


@pytest.mark.parametrize("stream", [False, True])
def test_a_confident_qwen_answer_is_held_then_sent_whole(stream):
    families = Families(qwen_confidence=-0.05)
    answer = families.route([PHOTO, DOCUMENT], RoutingOptions(), stream)
    assert families.events[:2] == ["call qwen2_5_vl", "classified"] and families.abandoned == []
    assert answer.reason == RouteReason.DEFAULT
    assert families.calls == [("qwen2_5_vl", False)], "held: asked for whole, whatever the caller asked"
    assert families.sent == [("qwen2_5_vl: final", (RouteReason.DEFAULT, ["qwen2_5_vl"]))]


@pytest.mark.parametrize("stream", [False, True])
def test_a_doubtful_qwen_answer_falls_back_to_pixtral_which_streams(stream):
    families = Families(qwen_confidence=-2.0)
    answer = families.route([], RoutingOptions(), stream)
    assert answer.reason == RouteReason.LOW_CONFIDENCE
    assert families.calls == [("qwen2_5_vl", False), ("pixtral", stream)]
    assert [(a.family, a.confidence) for a in answer.attempts] == [("qwen2_5_vl", -2.0), ("pixtral", -0.3)]
    assert families.sent[-1] == ("pixtral: final", (RouteReason.LOW_CONFIDENCE, ["qwen2_5_vl", "pixtral"]))
    assert all(route == (RouteReason.LOW_CONFIDENCE, ["qwen2_5_vl"]) for _, route in families.sent[:-1])
    assert all(payload.startswith("pixtral") for payload, _ in families.sent), "Qwen's held answer is never sent"


def test_the_threshold_is_inclusive_and_configurable():
    families = Families(qwen_confidence=-1.0)
    assert families.route([], RoutingOptions(confidence_threshold=-1.0), False).reason == RouteReason.DEFAULT
    assert families.route([], RoutingOptions(confidence_threshold=-0.99), False).reason == RouteReason.LOW_CONFIDENCE
    assert DEFAULT_CONFIDENCE_THRESHOLD == pytest.approx(math.log(0.85))


@pytest.mark.parametrize("stream", [False, True])
def test_with_the_fallback_off_qwen_streams_at_once_whatever_its_confidence(stream):
    families = Families(qwen_confidence=-9.0)
    answer = families.route([PHOTO], RoutingOptions(fallback=False), stream)
    assert answer.reason == RouteReason.DEFAULT and families.calls == [("qwen2_5_vl", stream)]
    assert families.sent[-1] == ("qwen2_5_vl: final", (RouteReason.DEFAULT, ["qwen2_5_vl"]))


def test_an_error_from_the_held_call_ends_the_request_without_a_fallback():
    families = Families(error="image 0: not a supported image file")
    answer = families.route([], RoutingOptions(), False)
    assert families.calls == [("qwen2_5_vl", False)] and families.sent == [("qwen2_5_vl: error", (RouteReason.DEFAULT, ["qwen2_5_vl"]))]
    assert answer.attempts[0].family == "qwen2_5_vl"


def test_a_primary_answer_cancelled_meanwhile_is_not_answered_again():
    families = Families(qwen_confidence=-9.0)
    families.finish_reason = "cancelled"  # the caller went away while Qwen's answer was held
    answer = families.route([], RoutingOptions(), False)
    assert families.calls == [("qwen2_5_vl", False)] and answer.reason == RouteReason.DEFAULT


QUEUE_FULL = "Exceeds maximum queue size: 64 requests already wait for this model's generation rows"


@pytest.mark.parametrize("stream", [False, True])
def test_a_failed_fallback_returns_qwens_held_answer_saying_why(stream):
    families = Families(qwen_confidence=-2.0)
    families.fail("pixtral", QUEUE_FULL)
    answer = families.route([PHOTO], RoutingOptions(), stream)
    assert families.calls == [("qwen2_5_vl", False), ("pixtral", stream)]
    assert answer.reason == RouteReason.FALLBACK_FAILED
    assert families.sent == [("qwen2_5_vl: final", (RouteReason.FALLBACK_FAILED, ["qwen2_5_vl", "pixtral"]))]
    assert [(a.family, a.confidence, a.error) for a in answer.attempts] == [("qwen2_5_vl", -2.0, ""),
                                                                            ("pixtral", 0.0, QUEUE_FULL)]
    # ROUTE_INFO's JSON: the reason's string and each attempt's error.
    info = answer.to_dict()
    assert info["reason"] == "fallback_failed" and [a["error"] for a in info["attempts"]] == ["", QUEUE_FULL]


def test_a_fallback_stream_that_failed_after_sending_text_fails_the_request():
    families = Families(qwen_confidence=-2.0)
    families.fail("pixtral", "INTERNAL: the generation step failed", after_deltas=1)
    families.route([PHOTO], RoutingOptions(), True)
    # Pixtral's text already reached the caller: Qwen's answer would be a second text, so the error ends it.
    assert families.sent == [("pixtral: delta 0", (RouteReason.LOW_CONFIDENCE, ["qwen2_5_vl"])),
                             ("pixtral: error", (RouteReason.LOW_CONFIDENCE, ["qwen2_5_vl", "pixtral"]))]


@pytest.mark.parametrize("stream", [False, True])
def test_a_diagram_whose_pixtral_call_fails_is_answered_by_qwen(stream):
    families = Families()
    families.fail("pixtral", "Request for unknown model: 'pixtral' is not found")
    answer = families.route([DIAGRAM], RoutingOptions(), stream)
    # The speculative Qwen call was abandoned for Pixtral; Qwen is asked again, streamed as the caller asked.
    assert families.abandoned == ["qwen2_5_vl"]
    assert families.calls == [("qwen2_5_vl", False), ("pixtral", stream), ("qwen2_5_vl", stream)]
    assert answer.reason == RouteReason.SPECIALIST_FAILED
    assert [(a.family, a.error) for a in answer.attempts] == [
        ("pixtral", "Request for unknown model: 'pixtral' is not found"), ("qwen2_5_vl", "")]
    expected_deltas = [(f"qwen2_5_vl: delta {i}", (RouteReason.SPECIALIST_FAILED, ["pixtral"])) for i in (0, 1)] if stream else []
    assert families.sent == expected_deltas + [
        ("qwen2_5_vl: final", (RouteReason.SPECIALIST_FAILED, ["pixtral", "qwen2_5_vl"]))]


def test_a_diagram_stream_that_failed_after_sending_text_fails_the_request():
    families = Families()
    families.fail("pixtral", "INTERNAL: the generation step failed", after_deltas=2)
    families.route([DIAGRAM], RoutingOptions(), True)
    assert families.calls == [("qwen2_5_vl", False), ("pixtral", True)], "Qwen is not asked again"
    assert [payload for payload, _ in families.sent] == ["pixtral: delta 0", "pixtral: delta 1", "pixtral: error"]


@pytest.mark.parametrize("kinds,qwen_confidence", [([PHOTO], -2.0), ([DIAGRAM], -0.05)])
def test_a_caller_gone_during_pixtrals_call_ends_the_request_without_another_answer(kinds, qwen_confidence):
    """A cancellation or a passed deadline is not a failure of Pixtral: nobody waits for an answer."""
    families = Families(qwen_confidence=qwen_confidence)
    families.gone_during.add("pixtral")
    with pytest.raises(CallerGone):
        families.route(kinds, RoutingOptions(), True)
    assert families.sent == [] and families.calls[-1] == ("pixtral", True)

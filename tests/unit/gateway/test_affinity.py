"""Cache-aware routing (gateway/affinity.py): what of a request a server may hold cached, the bounded-
load choice, the per-server memory of keys, and the pool choosing by it over scripted servers
(tests/integration/test_affinity.py runs it against real Triton servers and their cache counters)."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field

import pytest

from gateway.affinity import (AFFINITY, LOAD, MIN_TEXT_PREFIX_CHARS, NO_KEY, AffinityRouter, RequestKey,
                              ServedKeys)
from gateway.observability import PoolCollector
from gateway.settings import Settings, SettingsError
from tests.unit.gateway.test_triton_pool import pool_of

PHOTO, CHART = b"\x89PNG photo bytes" * 64, b"\x89PNG chart bytes" * 64


def question(text: str, images: int = 1) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}]


def about(image: bytes, text: str = "what is this?", ensemble: str = "pixtral") -> RequestKey:
    return RequestKey(ensemble, question(text), [image])


@dataclass
class Box:
    """A server as the router sees it."""

    name: str
    outstanding: int = 0
    served: ServedKeys = field(default_factory=ServedKeys)


def boxes(count: int = 3) -> list[Box]:
    return [Box(name) for name in "abcdefgh"[:count]]


# --- what of a request a server may hold -----------------------------------------------------------


def test_the_same_image_has_the_same_media_key_whatever_the_question():
    first, second = about(PHOTO, "what is this?"), about(PHOTO, "how many people?")
    assert first.media == second.media and len(first.media) == 1
    assert first.prefixes[0] == second.prefixes[0]  # the image part opens both prompts
    assert first.prefixes[-1] != second.prefixes[-1]
    assert about(CHART).media != first.media
    # What changes the image's embedding changes its key: the model, the detail asked for.
    assert about(PHOTO, ensemble="qwen2_5_vl").media != first.media
    assert RequestKey("pixtral", question("x"), [PHOTO], detail="high").media != first.media


def test_a_chats_next_turn_holds_every_prefix_key_of_the_turn_before():
    turn1 = question("describe the picture")
    turn2 = turn1 + [{"role": "assistant", "content": [{"type": "text", "text": "A harbour at dusk."}]},
                     {"role": "user", "content": [{"type": "text", "text": "what colour are the boats?"}]}]
    first, second = RequestKey("pixtral", turn1, [PHOTO]), RequestKey("pixtral", turn2, [PHOTO])
    assert second.prefixes[:len(first.prefixes)] == first.prefixes
    assert len(second.prefixes) == len(first.prefixes) + 2
    # Another role for the same text is another prompt.
    assert RequestKey("pixtral", [{**turn1[0], "role": "system"}], [PHOTO]).prefixes != first.prefixes


def test_short_text_alone_has_no_key_and_long_shared_text_has():
    assert RequestKey("pixtral", question("hello", images=0)).prefixes == []
    long_text = "x" * MIN_TEXT_PREFIX_CHARS
    keyed = RequestKey("pixtral", question(long_text, images=0))
    assert len(keyed.prefixes) == 1 and keyed.media == []
    # Video clips: their bytes and sampling key them like images.
    clip = [{"role": "user", "content": [{"type": "video", "fps": 2.0, "max_frames": 8}]}]
    assert RequestKey("pixtral", clip, videos=[b"mp4"]).media == RequestKey("pixtral", clip, videos=[b"mp4"]).media
    faster = [{"role": "user", "content": [{"type": "video", "fps": 4.0, "max_frames": 8}]}]
    assert RequestKey("pixtral", faster, videos=[b"mp4"]).prefixes != RequestKey("pixtral", clip, videos=[b"mp4"]).prefixes


# --- the per-server memory ------------------------------------------------------------------------


def test_served_keys_keep_the_most_recent_within_their_capacity():
    served = ServedKeys(capacity=4)
    photo, chart = about(PHOTO), about(CHART)  # 2 prefix keys + 1 media key each
    served.add(photo)
    assert served.overlap(photo) == 3 and len(served) == 3
    served.add(chart)
    assert len(served) == 4  # bounded: the photo's oldest keys left first
    assert served.overlap(chart) == 3 and served.overlap(photo) < 3
    served.add(photo)  # sent again: the most recent now
    assert served.overlap(photo) == 3 and len(served) == 4
    assert served.overlap(about(b"never sent")) == 0


def test_overlap_counts_the_longest_prefix_sent_and_the_images_sent():
    served = ServedKeys()
    turn1 = RequestKey("pixtral", question("describe"), [PHOTO])
    served.add(turn1)
    turn2 = RequestKey("pixtral", question("describe") + [{"role": "user", "content": [
        {"type": "text", "text": "and now this one"}, {"type": "image"}]}], [PHOTO, CHART])
    # Two parts of its prefix (image, "describe") and one of its two images were sent here.
    assert served.overlap(turn2) == 2 + 1


# --- the choice -------------------------------------------------------------------------------------


def test_the_same_image_goes_to_the_same_server_while_loads_are_even():
    router, servers = AffinityRouter(), boxes(3)
    first = router.choose(servers, about(PHOTO, "question 0"))
    for i in range(1, 10):
        assert router.choose(servers, about(PHOTO, f"question {i}")) is first
    # Another image is free to go elsewhere: the least-loaded first candidate (ties keep their order).
    assert router.choose(servers[1:] + servers[:1], about(CHART)) is servers[1]
    assert router.decisions == {AFFINITY: 9, NO_KEY: 2}


def test_the_image_moves_when_its_server_is_saturated_and_comes_back_after():
    router, servers = AffinityRouter(load_factor=1.25), boxes(3)
    home = router.choose(servers, about(PHOTO))
    home.outstanding = 5  # the others idle: 5 is over ceil(1.25 x 6 / 3) = 3
    moved = router.choose(servers, about(PHOTO, "again"))
    assert moved is not home and moved.outstanding == 0
    assert router.decisions[LOAD] == 1
    home.outstanding = 0
    # Both now hold the image: the busier one is passed over, the tie goes to the first.
    moved.outstanding = 1
    assert router.choose(servers, about(PHOTO, "third")) is home


@pytest.mark.parametrize("load_factor", [1.0, 1.25, 2.0])
def test_a_server_takes_affinity_requests_up_to_the_bound_and_no_further(load_factor):
    """Mirrokni et al.'s bounded loads: the affinity server may hold ceil(c x (total + 1) / n) in
    flight, the new request counted; the request that would pass the bound goes to the least loaded."""
    router, servers = AffinityRouter(load_factor=load_factor), boxes(3)
    home = router.choose(servers, about(PHOTO))
    home.served.add(about(PHOTO))
    others_load = [2, 1]
    servers[1].outstanding, servers[2].outstanding = others_load
    for in_flight in range(0, 12):
        home.outstanding = in_flight
        bound = math.ceil(load_factor * (in_flight + sum(others_load) + 1) / 3)
        chosen = router.choose([*servers], about(PHOTO, f"q{in_flight}"))
        if in_flight < bound:
            assert chosen is home, (in_flight, bound)
        else:
            assert chosen is servers[2], (in_flight, bound)  # the least loaded


def test_a_second_holder_within_the_bound_is_preferred_to_the_least_loaded():
    router, servers = AffinityRouter(), boxes(3)
    a, b, c = servers
    for holder in (a, b):
        holder.served.add(about(PHOTO))
    a.outstanding, b.outstanding = 9, 1  # a over the bound, b within it, c idle but without the image
    assert router.choose(servers, about(PHOTO, "?")) is b


def test_least_loaded_mode_ignores_keys_and_counts_nothing():
    router, servers = AffinityRouter(mode="least_loaded"), boxes(2)
    servers[0].served.add(about(PHOTO))
    servers[0].outstanding = 1
    assert router.choose(servers, about(PHOTO)) is servers[1]
    assert len(servers[1].served) == 0 and not router.decisions


def test_bad_settings_name_the_variable_and_the_fix():
    base = {"VLM_API_KEYS": "k"}
    assert Settings.from_env(base).routing == "affinity"
    assert Settings.from_env({**base, "VLM_ROUTING": "least_loaded", "VLM_AFFINITY_LOAD_FACTOR": "2",
                              "VLM_AFFINITY_KEYS": "100"}).affinity_load_factor == 2.0
    for variable, value, says in (("VLM_ROUTING", "random", "affinity, least_loaded"),
                                  ("VLM_AFFINITY_LOAD_FACTOR", "0.5", "at least 1"),
                                  ("VLM_AFFINITY_LOAD_FACTOR", "many", "not a valid float"),
                                  ("VLM_AFFINITY_KEYS", "0", "at least 1")):
        with pytest.raises(SettingsError, match=f"{variable}.*{says}"):
            Settings.from_env({**base, variable: value})


# --- the pool choosing by it ----------------------------------------------------------------------


async def ask(pool, key: RequestKey | None) -> str:
    return "".join([chunk.text async for chunk in pool.generate("pixtral", [], [], None, "r", affinity=key)])


def test_the_pool_sends_an_image_to_one_server_and_spreads_when_it_is_held_busy():
    async def main():
        pool, servers = pool_of("a:1", "b:1", "c:1")
        await pool.probe()
        for i in range(6):
            assert await ask(pool, about(PHOTO, f"question {i}")) == "Hello"
        assert sorted(server.requests for server in servers.values()) == [0, 0, 6]
        home = next(address for address, server in servers.items() if server.requests)
        release = asyncio.Event()
        for server in servers.values():  # every request stays in flight until released
            server.hold = release
        held = [asyncio.create_task(ask(pool, about(PHOTO, f"held {i}"))) for i in range(6)]
        await asyncio.sleep(0.05)
        # The home server took the image while it stayed within ceil(1.25 x (in flight + 1) / 3); the
        # second request passed that bound (1 of 1) and went to an idle server, which then shared it.
        assert pool.servers[home].outstanding == 3
        assert sorted(server.outstanding for server in pool.servers.values()) == [0, 3, 3]
        # Another image has no home: the least loaded, the idle server, takes it.
        idle = next(address for address, server in pool.servers.items() if server.outstanding == 0)
        held.append(asyncio.create_task(ask(pool, about(CHART))))
        await asyncio.sleep(0.05)
        assert pool.servers[idle].outstanding == 1
        release.set()
        assert await asyncio.gather(*held) == ["Hello"] * 7
        metrics = {sample.labels["reason"]: sample.value for family in PoolCollector(pool).collect()
                   if family.name == "vlm_routing_decisions" for sample in family.samples}
        assert metrics == {AFFINITY: 5 + 5, LOAD: 1, NO_KEY: 2}

    asyncio.run(main())


def test_the_pool_with_one_server_hashes_nothing():
    async def main():
        pool, servers = pool_of("a:1")
        await pool.probe()
        key = about(PHOTO)
        assert await ask(pool, key) == "Hello"
        assert "prefixes" not in vars(key) and len(pool.servers["a:1"].served) == 0

    asyncio.run(main())


def test_a_server_ejected_for_a_lost_connection_is_forgotten_as_a_cache():
    """It may come back restarted, its caches empty: the image goes where it is sent next, not back."""
    async def main():
        pool, servers = pool_of("a:1", "b:1", "c:1")
        await pool.probe()
        assert await ask(pool, about(PHOTO)) == "Hello"
        home = next(address for address, server in servers.items() if server.requests)
        assert len(pool.servers[home].served) > 0
        pool.eject(pool.servers[home], "connection refused")
        assert len(pool.servers[home].served) == 0

    asyncio.run(main())


def test_large_media_is_hashed_off_the_event_loop_and_small_media_on_it(monkeypatch):
    """A large picture's hash would hold every other request on the loop: it is made on a worker thread."""
    import threading

    from gateway.affinity import HASH_OFF_LOOP_BYTES

    hashed_on = []
    media_hash = RequestKey._media_hash

    def recording(self, kind, data):
        hashed_on.append((len(data), threading.current_thread() is threading.main_thread()))
        return media_hash(self, kind, data)

    monkeypatch.setattr(RequestKey, "_media_hash", recording)

    async def main():
        pool, servers = pool_of("a:1", "b:1")
        await pool.probe()
        large = b"\x89PNG" + b"x" * HASH_OFF_LOOP_BYTES
        assert await ask(pool, about(large)) == "Hello"
        assert await ask(pool, about(PHOTO)) == "Hello"

    asyncio.run(main())
    assert hashed_on == [(len(b"\x89PNG") + HASH_OFF_LOOP_BYTES, False), (len(PHOTO), True)]

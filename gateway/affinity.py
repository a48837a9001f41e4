"""Cache-aware routing: send a request where its images and its prompt's beginning were sent before,
unless that server already carries more than its share of the load.

Each Triton server keeps what it computed: the embed step caches image and clip embeddings by
content (encoder cache) and the engine keeps the key/value blocks of prompts it prefilled (prefix
cache, `vlm_serving.generation.kv_blocks`). A conversation's next turn, or another question about the
same document, finds them only on the server that served the first. The gateway cannot see those
caches; it remembers instead, per server, the keys of the last requests it sent there (`ServedKeys`,
a bounded LRU) and scores each server by how many of a new request's keys it holds (`RequestKey`):

- its media: a content hash of each image's and clip's bytes (the encoder cache finds those anywhere
  in a prompt);
- its prompt prefix: one hash per message part, each chained over everything before it (the ensemble,
  the detail, the tools, the messages' roles, texts and media hashes), as the engine chains its
  blocks' keys, at the coarse granularity of parts. A server holding the hash of part i was sent the
  same prompt up to part i. Text-only prefixes shorter than `MIN_TEXT_PREFIX_CHARS` are left out:
  a short prompt is cheap to prefill anywhere, and following it would only unbalance the load.

The choice is consistent hashing with bounded loads (Mirrokni, Thorup and Zadimoghaddam, 2018): the
best-scoring server takes the request while its requests in flight stay within
ceil(load_factor x mean load), the mean counting the new request; beyond that bound the next-best
scoring server within it, and when none is, the least-loaded server ("load wins"). A request no
server holds a key of goes to the least-loaded server as before. Keys are a routing hint, never a
correctness matter: a stale or colliding key only costs a cache miss.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol, TypeVar

ROUTING_MODES = ("affinity", "least_loaded")
# Why a request went where it went (vlm_routing_decisions_total{reason}).
AFFINITY = "affinity"  # to a server that holds some of its keys, within the load bound
LOAD = "load"  # servers held its keys but all were over the load bound: the least-loaded one took it
NO_KEY = "no_key"  # no server holds any of its keys (a first request, short text only): least loaded
# Shared text shorter than this (about 128 tokens) is not worth a detour from the least-loaded server.
MIN_TEXT_PREFIX_CHARS = 512
# Media above this is hashed on a worker thread (BLAKE2b at about 1 GB/s releases the GIL): a 10 MB
# picture hashed on the event loop would hold every other request for about 10 ms.
HASH_OFF_LOOP_BYTES = 256 * 1024


def _field(digest, value: bytes) -> None:
    """Length-prefixed, so that no two different sequences of fields hash the same bytes."""
    digest.update(len(value).to_bytes(8, "little"))
    digest.update(value)


class RequestKey:
    """What of a request a server may still have cached: `media`, a content hash per image and clip,
    and `prefixes`, the chained hashes of its prompt's parts (only those past a media part or
    `MIN_TEXT_PREFIX_CHARS` of text). Computed when first read: a pool with one server, or routing
    by load alone, never hashes the request's bytes."""

    def __init__(self, ensemble: str, messages: list[dict], images: Sequence[bytes] = (),
                 videos: Sequence[bytes] = (), detail: str | None = None, tools: str = ""):
        self._ensemble, self._messages = ensemble, messages
        self._images, self._videos = images, videos
        self._detail, self._tools = detail or "", tools

    def _root(self):
        """What every hash of the request starts from: what changes every image's embedding (the
        model, the detail)."""
        digest = hashlib.blake2b(digest_size=16)
        for value in (self._ensemble, self._detail):
            _field(digest, value.encode())
        return digest

    @cached_property
    def _image_hashes(self) -> list[bytes]:
        return [self._media_hash(b"image", data) for data in self._images]

    @cached_property
    def _video_hashes(self) -> list[bytes]:
        return [self._media_hash(b"video", data) for data in self._videos]

    def _media_hash(self, kind: bytes, data: bytes) -> bytes:
        digest = self._root()
        _field(digest, kind)
        _field(digest, data)
        return digest.digest()

    @property
    def media(self) -> list[bytes]:
        return self._image_hashes + self._video_hashes

    @property
    def media_bytes(self) -> int:
        return sum(map(len, self._images)) + sum(map(len, self._videos))

    def compute(self) -> None:
        """Every hash now (each is remembered): on a worker thread, when the media is large."""
        self.prefixes  # the prefixes' chain hashes the media first

    @cached_property
    def prefixes(self) -> list[bytes]:
        chain = self._root()
        _field(chain, self._tools.encode())  # the tools' schemas open the prompt
        images, videos = iter(self._image_hashes), iter(self._video_hashes)
        keys, text_chars, seen_media = [], 0, False
        for message in self._messages:
            header = {name: message[name] for name in ("role", "tool_calls", "tool_call_id") if name in message}
            _field(chain, json.dumps(header, sort_keys=True).encode())
            for part in message.get("content", ()):
                if part["type"] == "text":
                    _field(chain, b"text")
                    _field(chain, part["text"].encode("utf-8", "surrogatepass"))
                    text_chars += len(part["text"])
                else:  # an image or a clip: its content hash and how it is sampled (a clip's fps, frames)
                    _field(chain, json.dumps(part, sort_keys=True).encode())
                    _field(chain, next(images if part["type"] == "image" else videos, b""))
                    seen_media = True
                if seen_media or text_chars >= MIN_TEXT_PREFIX_CHARS:
                    keys.append(chain.copy().digest())
        return keys


class ServedKeys:
    """The keys of the requests last sent to one server, at most `capacity` (least recent out first)."""

    def __init__(self, capacity: int = 4096):
        self.capacity = capacity
        self._keys: OrderedDict[bytes, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: bytes) -> bool:
        return key in self._keys

    def add(self, request: RequestKey) -> None:
        for key in (*request.prefixes, *request.media):
            self._keys[key] = None
            self._keys.move_to_end(key)
        while len(self._keys) > self.capacity:
            self._keys.popitem(last=False)

    def overlap(self, request: RequestKey) -> int:
        """How much of the request this server was sent: the parts of its longest prefix sent here
        plus its images and clips sent here (0: nothing)."""
        prefixes = request.prefixes
        depth = next((i + 1 for i in range(len(prefixes) - 1, -1, -1) if prefixes[i] in self._keys), 0)
        return depth + sum(key in self._keys for key in request.media)

    def clear(self) -> None:
        self._keys.clear()


class Candidate(Protocol):
    outstanding: int
    served: ServedKeys


C = TypeVar("C", bound=Candidate)


@dataclass
class AffinityRouter:
    """The routing policy (VLM_ROUTING, VLM_AFFINITY_LOAD_FACTOR, VLM_AFFINITY_KEYS) and its
    decisions so far, by reason."""

    mode: str = "affinity"
    load_factor: float = 1.25
    keys_per_server: int = 4096
    decisions: Counter = field(default_factory=Counter)

    def __post_init__(self):
        if self.mode not in ROUTING_MODES:
            raise ValueError(f"VLM_ROUTING={self.mode!r} must be one of {', '.join(ROUTING_MODES)}")
        if not self.load_factor >= 1:
            raise ValueError(f"VLM_AFFINITY_LOAD_FACTOR={self.load_factor} must be at least 1 (a server may take "
                             "that many times its share of the load; 1.25 is a good start)")
        if self.keys_per_server < 1:
            raise ValueError(f"VLM_AFFINITY_KEYS={self.keys_per_server} must be at least 1 (keys remembered per server)")

    def served_keys(self) -> ServedKeys:
        return ServedKeys(self.keys_per_server)

    def choose(self, candidates: Sequence[C], request: RequestKey | None) -> C:
        """The server for the request among `candidates` (non-empty; equal choices go to the first),
        remembered as holding the request's keys."""
        least_loaded = min(candidates, key=lambda c: c.outstanding)  # min keeps the first of ties
        if self.mode == "least_loaded":
            return least_loaded
        chosen, reason = least_loaded, NO_KEY
        if request is not None:
            chosen, reason = self._by_affinity(candidates, request) or (least_loaded, reason)
            chosen.served.add(request)
        self.decisions[reason] += 1
        return chosen

    def _by_affinity(self, candidates: Sequence[C], request: RequestKey) -> tuple[C, str] | None:
        scores = [candidate.served.overlap(request) for candidate in candidates]
        holders = sorted((i for i, score in enumerate(scores) if score),
                         key=lambda i: (-scores[i], candidates[i].outstanding))  # stable: ties keep their order
        if not holders:
            return None
        bound = math.ceil(self.load_factor * (sum(c.outstanding for c in candidates) + 1) / len(candidates))
        within = next((candidates[i] for i in holders if candidates[i].outstanding < bound), None)
        if within is None:
            return min(candidates, key=lambda c: c.outstanding), LOAD
        return within, AFFINITY

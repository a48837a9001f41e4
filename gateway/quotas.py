"""Per-key quotas and fair sharing of a saturated model between keys.

A key's limits (gateway/keys.py `Limits`) are kept per key name, so the old and the new key of a
rotation share them:
- requests_per_second: a token bucket of `burst` requests (default: one second's worth, at least 1)
  refilled at that rate; a request takes one;
- max_concurrent: requests of the key in flight at once;
- tokens_per_minute: a bucket of that many generated tokens refilled at a sixtieth of it a second;
  each answer's completion tokens are charged when it is complete (the bucket may go below zero:
  the answer's length is not known in advance), and new requests are refused while it holds less
  than one token.

Fair sharing: once a model has `capacity` requests in flight (VLM_MODEL_CAPACITY: its generation
rows plus the queue it may have), a new request is admitted only if its key holds fewer than its
fair share of them, capacity / active keys (the keys with a request in flight on that model,
counting the caller's). A key alone may fill the model; a second key's requests are still admitted
(up to its share) and the first key's refused until it is down to its share: one key can never keep
every generation row.

A refusal is RESOURCE_EXHAUSTED with google.rpc.RetryInfo (when to try again) and
google.rpc.QuotaFailure (the key's name; which limit); nothing of the request ran.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import grpc

from gateway.errors import ApiError
from gateway.keys import KeyEntry, Limits

# When a slot frees is not known: a refusal for concurrency or fair share says to retry after this.
BUSY_RETRY_S = 1.0


class TokenBucket:
    """`size` tokens, refilled at `rate` a second; the level may go below zero (a charge after the fact)."""

    def __init__(self, rate: float, size: float, now: float):
        self.rate, self.size = rate, size
        self.level, self.updated = size, now

    def _refill(self, now: float) -> None:
        self.level = min(self.size, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait(self, now: float, need: float) -> float:
        """Seconds until the bucket holds `need` (0: it does now)."""
        self._refill(now)
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def take(self, amount: float) -> None:
        self.level -= amount


class QuotaRefusal(ApiError):
    def __init__(self, key: str, limit: str, description: str, retry_after_s: float):
        super().__init__(grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"API key {key!r}: {description}; retry in {retry_after_s:.2f}s",
                         retry_after_s=retry_after_s, quota_violations=[(key, f"{limit}: {description}")])
        self.limit = limit


@dataclass
class KeyUsage:
    limits: Limits
    requests: TokenBucket | None
    tokens: TokenBucket | None
    in_flight: int = 0


@dataclass
class ModelLoad:
    in_flight: int = 0
    by_key: dict[str, int] = field(default_factory=dict)


class Quotas:
    def __init__(self, capacity: int = 0, clock=time.monotonic):
        self.capacity = capacity  # per model; 0: no fair sharing
        self.clock = clock
        self.usage: dict[str, KeyUsage] = {}
        self.models: dict[str, ModelLoad] = {}

    def _usage(self, entry: KeyEntry) -> KeyUsage:
        usage = self.usage.get(entry.name)
        if usage is None or usage.limits != entry.limits:  # new, or its limits changed in the key file
            limits, now = entry.limits, self.clock()
            rate = limits.requests_per_second
            requests = TokenBucket(rate, limits.burst or max(1.0, rate), now) if rate else None
            per_minute = limits.tokens_per_minute
            tokens = TokenBucket(per_minute / 60, per_minute, now) if per_minute else None
            if usage is not None:  # what was used stays used (two keys of a name with other limits gain nothing)
                for new, old in ((requests, usage.requests), (tokens, usage.tokens)):
                    if new is not None and old is not None:
                        new.level = min(new.size, old.level)
            usage = KeyUsage(limits, requests, tokens, usage.in_flight if usage else 0)
            self.usage[entry.name] = usage
        return usage

    def admit(self, entry: KeyEntry | None, model: str) -> QuotaRefusal | None:
        """Take a place for one request of `entry` on `model` (give it back with `release`), or say why not."""
        if entry is None:
            return None
        usage = self._usage(entry)
        limits, now = usage.limits, self.clock()
        if limits.max_concurrent is not None and usage.in_flight >= limits.max_concurrent:
            return QuotaRefusal(entry.name, "max_concurrent", f"{usage.in_flight} requests in flight, the most "
                                f"this key may have at once", BUSY_RETRY_S)
        if usage.tokens is not None:
            wait = usage.tokens.wait(now, 1.0)  # room for at least one token
            if wait:
                return QuotaRefusal(entry.name, "tokens_per_minute", f"its {limits.tokens_per_minute} generated "
                                    "tokens per minute are used up", wait)
        load = self.models.setdefault(model, ModelLoad())
        held = load.by_key.get(entry.name, 0)
        if self.capacity and load.in_flight >= self.capacity:
            active = len(load.by_key) + (0 if held else 1)
            if held >= self.capacity / active:
                return QuotaRefusal(entry.name, "fair_share", f"model {model!r} is at its capacity of "
                                    f"{self.capacity} requests and this key holds {held}, its fair share among "
                                    f"{active} keys", BUSY_RETRY_S)
        if usage.requests is not None:
            wait = usage.requests.wait(now, 1.0)
            if wait:
                return QuotaRefusal(entry.name, "requests_per_second", f"over {limits.requests_per_second:g} "
                                    f"requests per second (burst {usage.requests.size:g})", wait)
            usage.requests.take(1.0)
        usage.in_flight += 1
        load.in_flight += 1
        load.by_key[entry.name] = held + 1
        return None

    def release(self, entry: KeyEntry | None, model: str) -> None:
        if entry is None:
            return
        self.usage[entry.name].in_flight -= 1
        load = self.models[model]
        load.in_flight -= 1
        held = load.by_key[entry.name] - 1
        if held:
            load.by_key[entry.name] = held
        else:
            del load.by_key[entry.name]

    def charge(self, entry: KeyEntry | None, completion_tokens: int) -> None:
        """Count an answer's generated tokens against the key's tokens per minute."""
        usage = self.usage.get(entry.name) if entry is not None else None
        if usage is not None and usage.tokens is not None:
            usage.tokens.wait(self.clock(), 0)  # brings the level up to now before the charge
            usage.tokens.take(completion_tokens)

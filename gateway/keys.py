"""Named API keys: the environment's plain keys and a file of salted hashes, reloaded when it changes.

The key file (VLM_API_KEYS_FILE) holds one JSON object a line (blank lines and lines starting with
`#` are skipped); `vlm keys add` writes them:

    {"name": "ci-bot", "scope": "user", "id": "k7f3a9c2e", "hash": "scrypt$16384$8$1$<salt>$<digest>",
     "requests_per_second": 5, "burst": 10, "max_concurrent": 4, "tokens_per_minute": 20000}

A key looks like `vlm_<id>_<secret>`: the id (not secret) picks the one entry whose hash it is checked
against, so an unknown key costs no hashing at all and a new one one scrypt (about 40 ms, on a
worker thread). A verified key is remembered by an HMAC-SHA256 of it under a secret of this process
(a dict lookup per request after the first); the memory is dropped whenever the file is reloaded,
so a revoked or rotated key stops working at the next reload. The environment's keys
(VLM_API_KEYS, VLM_ADMIN_API_KEYS) are named env-1, env-2, ... in their sorted order.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass, field

from gateway.settings import SettingsError

log = logging.getLogger("gateway.keys")

SCOPES = ("user", "admin")
LIMITS = ("requests_per_second", "burst", "max_concurrent", "tokens_per_minute")
# scrypt's cost: 16 MiB and about 40 ms a key (OWASP's minimum for scrypt is N=2^17 at r=8 for
# passwords; these keys carry 190 random bits, so no guessing is helped by a slower hash).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 14, 8, 1
KEY_PREFIX = "vlm_"
_KEY = re.compile(r"^vlm_([0-9a-z]{8,32})_[A-Za-z0-9_-]{16,}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# How often the key file's size and modification time are looked at, at most (also on every unknown id).
RELOAD_POLL_S = 1.0
# Wrong keys remembered (so one repeated wrong secret costs one scrypt); forgotten all at once when full.
MAX_REMEMBERED_MISSES = 10_000


class KeyFileError(SettingsError):
    pass


@dataclass(frozen=True)
class Limits:
    """What one key may use; None: unlimited. `burst`: requests a key may send at once beyond its
    rate (the token bucket's size; default: one second's worth, at least 1)."""

    requests_per_second: float | None = None
    burst: int | None = None
    max_concurrent: int | None = None
    tokens_per_minute: int | None = None


@dataclass(frozen=True)
class KeyEntry:
    name: str
    scope: str = "user"
    limits: Limits = field(default_factory=Limits)
    key_id: str = ""
    hash: str = field(default="", repr=False)

    @property
    def admin(self) -> bool:
        return self.scope == "admin"


# The key of the request being served (set by authentication; read by quotas, audit and every log line).
caller_var: contextvars.ContextVar[KeyEntry | None] = contextvars.ContextVar("caller", default=None)


def new_key() -> tuple[str, str]:
    """A fresh (key id, key)."""
    key_id = secrets.token_hex(5)
    return key_id, f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(24)}"


def hash_key(key: str) -> str:
    """`scrypt$N$r$p$<salt>$<digest>` (base64) of `key` under a fresh random salt."""
    salt = os.urandom(16)
    digest = hashlib.scrypt(key.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_key(key: str, stored: str) -> bool:
    _, n, r, p, salt, digest = stored.split("$")
    expected = base64.b64decode(digest)
    given = hashlib.scrypt(key.encode("utf-8", "surrogateescape"), salt=base64.b64decode(salt), n=int(n), r=int(r),
                           p=int(p), dklen=len(expected), maxmem=256 * int(r) * int(n))
    return hmac.compare_digest(given, expected)


def entry_line(entry: KeyEntry) -> str:
    """The key file's line for `entry`."""
    limits = {name: getattr(entry.limits, name) for name in LIMITS if getattr(entry.limits, name) is not None}
    return json.dumps({"name": entry.name, "scope": entry.scope, "id": entry.key_id, "hash": entry.hash, **limits})


def parse_entry(line: str, where: str) -> KeyEntry:
    """One line of the key file; KeyFileError naming the line and the field otherwise."""
    try:
        data = json.loads(line)
    except ValueError as exc:
        raise KeyFileError(f"{where}: not a JSON object ({exc}); each line is one key's entry") from None
    if not isinstance(data, dict):
        raise KeyFileError(f"{where}: not a JSON object; each line is one key's entry")
    unknown = sorted(set(data) - {"name", "scope", "id", "hash", *LIMITS})
    if unknown:
        raise KeyFileError(f"{where}: unknown field {unknown[0]!r}; fields are name, scope, id, hash, {', '.join(LIMITS)}")
    name = data.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise KeyFileError(f"{where}: name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
    if data.get("scope", "user") not in SCOPES:
        raise KeyFileError(f"{where}: scope {data.get('scope')!r} must be one of {', '.join(SCOPES)}")
    key_id = data.get("id")
    if not isinstance(key_id, str) or not re.fullmatch(r"[0-9a-z]{8,32}", key_id):
        raise KeyFileError(f"{where}: id {key_id!r} must be the 8-32 lowercase letters or digits after 'vlm_' in the key")
    stored = data.get("hash")
    parts = stored.split("$") if isinstance(stored, str) else []
    if len(parts) != 6 or parts[0] != "scrypt" or not all(p.isdigit() for p in parts[1:4]) or not all(
            _is_base64(p) for p in parts[4:]):
        raise KeyFileError(f"{where}: hash must be 'scrypt$N$r$p$<salt>$<digest>' (base64 salt and digest) as "
                           "`vlm keys add` writes it")
    limits = {}
    for limit in LIMITS:
        value = data.get(limit)
        number = (int, float) if limit == "requests_per_second" else int
        if value is not None and (isinstance(value, bool) or not isinstance(value, number) or value <= 0):
            raise KeyFileError(f"{where}: {limit} must be a positive {'number' if limit == 'requests_per_second' else 'integer'}"
                               f" (leave it out for no limit), not {value!r}")
        limits[limit] = value
    if limits["burst"] is not None and limits["requests_per_second"] is None:
        raise KeyFileError(f"{where}: burst needs requests_per_second (the rate the bucket refills at)")
    return KeyEntry(name, data.get("scope", "user"), Limits(**limits), key_id, stored)


def _is_base64(text: str) -> bool:
    try:
        return bool(base64.b64decode(text, validate=True))
    except ValueError:
        return False


def load_key_file(path: str) -> list[KeyEntry]:
    try:
        with open(path, encoding="utf-8") as file:
            lines = file.read().splitlines()
    except OSError as exc:
        raise KeyFileError(f"VLM_API_KEYS_FILE={path}: cannot read it ({exc.strerror}); create it with `vlm keys add`") from None
    entries = [parse_entry(line, f"VLM_API_KEYS_FILE={path} line {number}")
               for number, line in enumerate(lines, 1) if line.strip() and not line.lstrip().startswith("#")]
    seen: set[str] = set()
    for entry in entries:
        if entry.key_id in seen:
            raise KeyFileError(f"VLM_API_KEYS_FILE={path}: id {entry.key_id} is used twice; each key has its own id")
        seen.add(entry.key_id)
    return entries


def env_entries(api_keys: frozenset[str], admin_keys: frozenset[str]) -> dict[str, KeyEntry]:
    """The environment's keys as entries env-1, env-2, ... in the keys' sorted order (stable across
    restarts; a key that must keep its name whatever is added belongs in the key file), admin scope
    for admin keys."""
    return {key: KeyEntry(f"env-{number}", "admin" if key in admin_keys else "user")
            for number, key in enumerate(sorted(api_keys), 1)}


class KeyRing:
    """Which entry a presented key is, cheaply: see the module's docstring."""

    def __init__(self, env_keys: dict[str, KeyEntry], path: str = "", clock=time.monotonic,
                 poll_s: float = RELOAD_POLL_S):
        self.secret = secrets.token_bytes(32)
        self.path = path
        self.clock = clock
        self.poll_s = poll_s
        self.env = {self._digest(key): entry for key, entry in env_keys.items()}
        self.by_id: dict[str, KeyEntry] = {}
        self.verified: dict[bytes, KeyEntry] = {}
        self.misses: set[bytes] = set()
        self.file_state: tuple | None = None
        self.checked = clock()
        if path:
            self._load(self._state())

    def _digest(self, key: str) -> bytes:
        return hmac.digest(self.secret, key.encode("utf-8", "surrogateescape"), "sha256")

    def _state(self) -> tuple | None:
        try:
            stat = os.stat(self.path)
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size, stat.st_ino

    def _load(self, state) -> None:
        """Read the file (KeyFileError if it is bad) and forget every verified key."""
        entries = load_key_file(self.path)
        self.by_id = {entry.key_id: entry for entry in entries}
        self.verified, self.misses, self.file_state = {}, set(), state
        log.info("key file loaded", extra={"fields": {"path": self.path, "keys": len(entries)}})

    def reload_if_changed(self) -> None:
        """Reload the file if its size, modification time or inode changed. A bad file keeps the
        keys of the last good one (and logs why): a typo never locks every caller out."""
        self.checked = self.clock()
        state = self._state()
        if state == self.file_state:
            return
        try:
            self._load(state)
        except KeyFileError as exc:
            self.file_state = state  # logged once per change, not once a request
            log.error("key file not reloaded; the previous keys stay valid", extra={"fields": {"error": str(exc)}})

    def _cached(self, presented: str) -> tuple[bytes, KeyEntry | None]:
        """(digest, entry) when the key is known without hashing, else (digest, None)."""
        if self.path and self.clock() - self.checked >= self.poll_s:
            self.reload_if_changed()
        digest = self._digest(presented)
        return digest, self.env.get(digest) or self.verified.get(digest)

    async def identify(self, presented: str | None) -> KeyEntry | None:
        """The entry whose key `presented` is, or None."""
        if presented is None:
            return None
        digest, entry = self._cached(presented)
        if entry is not None or not self.path or digest in self.misses:
            return entry
        match = _KEY.match(presented)
        if match is None:
            return None
        candidate = self.by_id.get(match.group(1))
        if candidate is None:  # perhaps just added: look at the file now (one stat)
            self.reload_if_changed()
            candidate = self.by_id.get(match.group(1))
        if candidate is None:
            return None
        if await asyncio.to_thread(verify_key, presented, candidate.hash):
            if self.by_id.get(candidate.key_id) is candidate:  # not reloaded away meanwhile
                self.verified[digest] = candidate
            return candidate
        if len(self.misses) >= MAX_REMEMBERED_MISSES:
            self.misses.clear()
        self.misses.add(digest)
        return None

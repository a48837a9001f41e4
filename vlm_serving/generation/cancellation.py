"""Cancellation that reaches a generation step already running inside an ensemble.

Triton does not tell a running ensemble step that its caller went away (the ensemble scheduler
checks cancellation only between steps), so a cancelled stream would keep its batch row busy
until max_tokens. The gateway therefore names the request it gives up on to the `cancel` model,
which writes it onto this board, and every generation instance of the same server checks the
board at each step; the preprocess and embed steps check it before each request's work and skip
abandoned requests (vlm_serving/backend/cancel_model.py: AbandonedRequests). The board is a small
ring of request-id hashes in a file in /dev/shm, named after the Triton server process that all
the Python stubs share as parent.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

SLOTS = 4096
SUBREQUEST_SEPARATOR = "|"


def board_path(server_pid: int | None = None) -> Path:
    directory = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")
    return directory / f"vlm-cancel-{os.getppid() if server_pid is None else server_pid}"


def _hash(request_id: str) -> np.uint64:
    # 0 marks an empty slot, so no id may hash to it.
    value = int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=8).digest(), "little")
    return np.uint64(value or 1)


class CancellationBoard:
    """The last `SLOTS` cancelled request ids; one writer (the cancel model), many readers."""

    def __init__(self, path: Path | None = None):
        self.path = path or board_path()
        size = (SLOTS + 1) * 8
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
        finally:
            os.close(fd)
        # slots[SLOTS] counts writes; the ring is slots[:SLOTS].
        self.slots = np.memmap(self.path, dtype=np.uint64, mode="r+", shape=(SLOTS + 1,))

    def cancel(self, request_id: str) -> None:
        written = int(self.slots[SLOTS])
        self.slots[written % SLOTS] = _hash(request_id)
        self.slots[SLOTS] = written + 1

    def is_cancelled(self, request_id: str) -> bool:
        """Whether `request_id`, or the request it is a sub-request of (`subrequest_id`), was cancelled."""
        if not request_id:
            return False
        # Asked for every running row at every generation step: one comparison pass per id.
        parent, separator, _ = request_id.rpartition(SUBREQUEST_SEPARATOR)
        ring = self.slots[:SLOTS]
        return bool((ring == _hash(request_id)).any()) or bool(separator and (ring == _hash(parent)).any())


def subrequest_id(parent: str, name: str) -> str:
    """The id of a request made on behalf of `parent` (model auto's call to a family): cancelling
    the parent cancels it too, cancelling it leaves the parent alone. The separator is one no
    gateway request id can hold, so no caller can name another's parent."""
    return f"{parent}{SUBREQUEST_SEPARATOR}{name}"

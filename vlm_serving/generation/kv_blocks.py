"""Which blocks of the paged key/value cache each row holds, and which full blocks are kept for
reuse (the bookkeeping; `paged_cache` holds the tensors).

The cache is a pool of fixed-size blocks of `block_tokens` token slots. A row holds a block table:
the blocks its positions 0, 1, ... fill, in order, so position p sits in slot
`table[p // block_tokens] * block_tokens + p % block_tokens`. A row takes blocks as it grows and
gives them back when it leaves; no row's keys ever move. Block 0 is never handed out: it is the
slot that shorter rows' padded reads point at (masked), so it is outside the budget.

Prefix caching: a full block of a prompt is kept under a key that hashes the key of the block
before it, its token ids and, for image and video tokens, the image's or clip's content and what
its positions follow (`media_digests`): equal keys mean equal tokens at equal positions after an
equal past, so equal keys and values. A new row
starts with the longest run of its prompt's keys already kept (reference-counted: several rows
hold them at once, none writes them: a row writes only past the blocks it matched). A kept block
that no row holds is free to take: the least recently released one is taken (evicted) first.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Hashable

import numpy as np
import torch


class OutOfBlocks(RuntimeError):
    """The pool has fewer free blocks than a row needs."""


def media_digests(runs, media_embeds: np.ndarray | None) -> list[tuple[int, int, bytes]]:
    """(start, end, content digest) of each image's or clip's run of tokens in a prompt (`runs`:
    `batch.MediaRun`s in prompt order, whose tokens take `media_embeds`' rows in that order). The
    digest hashes the run's kind (an image never stands for a clip), its embedding rows (the vision
    encoder's output: it covers the encoder's identity too) and what its positions follow where the
    model has it (Qwen2.5-VL): the grid and a clip's seconds per temporal patch (the same frames
    at another rate take other temporal positions)."""
    digests, row = [], 0
    for run in runs:
        tokens = run.end - run.start
        digest = hashlib.blake2b(bytes([run.kind]), digest_size=16)
        digest.update(np.ascontiguousarray(media_embeds[row : row + tokens]).tobytes())
        digest.update(np.asarray(run.grid, dtype=np.int64).tobytes())
        if run.seconds_per_patch is not None:
            digest.update(np.float32(run.seconds_per_patch).tobytes())
        digests.append((run.start, run.end, digest.digest()))
        row += tokens
    return digests


def prefix_keys(token_ids: list[int], block_tokens: int, media: list[tuple[int, int, bytes]]) -> list[bytes]:
    """The keys of a token sequence's full blocks, each chained to the one before it."""
    ids = np.asarray(token_ids, dtype=np.int64)
    keys, key = [], b""
    for start in range(0, len(ids) - block_tokens + 1, block_tokens):
        end = start + block_tokens
        digest = hashlib.blake2b(key, digest_size=16)
        digest.update(ids[start:end].tobytes())
        for run_start, run_end, content in media:
            if run_start < end and start < run_end:  # the block holds some of this image's or clip's tokens
                digest.update(content + (start - run_start).to_bytes(8, "little", signed=True))
        key = digest.digest()
        keys.append(key)
    return keys


class BlockTables:
    def __init__(self, blocks: int, block_tokens: int):
        if blocks < 1 or block_tokens < 1:
            raise ValueError(f"a paged cache needs at least one block of at least one token, got {blocks} of {block_tokens}")
        self.blocks = blocks
        self.block_tokens = block_tokens
        self._free = list(range(blocks, 0, -1))  # popped from the end: block 1 first
        self._tables: dict[Hashable, list[int]] = {}
        self._holders: dict[int, int] = {}  # block -> rows holding it
        self._by_key: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # kept blocks no row holds, least recent first
        self.peak_used = 0
        self.evicted = 0

    def needed(self, tokens: int) -> int:
        """Blocks that hold `tokens` positions."""
        return -(-tokens // self.block_tokens)

    @property
    def free(self) -> int:
        """Blocks a row can take: never used, or kept with no row holding them."""
        return len(self._free) + len(self._idle)

    @property
    def used(self) -> int:
        """Blocks rows hold (a block several rows share counts once)."""
        return self.blocks - self.free

    @property
    def kept(self) -> int:
        """Full blocks kept under a prefix key (held or idle)."""
        return len(self._key_of)

    def held(self, row: Hashable) -> int:
        return len(self._tables.get(row, ()))

    def grow(self, row: Hashable, tokens: int) -> None:
        """Make the row's table cover positions 0 to tokens - 1; OutOfBlocks (taking nothing) if the
        pool lacks the blocks."""
        table = self._tables.setdefault(row, [])
        missing = self.needed(tokens) - len(table)
        if missing <= 0:
            return
        if missing > self.free:
            raise OutOfBlocks(f"{missing} more block(s) needed, {self.free} free of {self.blocks}")
        for _ in range(missing):
            block = self._take()
            self._holders[block] = 1
            table.append(block)
        self.peak_used = max(self.peak_used, self.used)

    def _take(self) -> int:
        if self._free:
            return self._free.pop()
        block, _ = self._idle.popitem(last=False)  # evict the least recently released kept block
        del self._by_key[self._key_of.pop(block)]
        self.evicted += 1
        return block

    def match(self, row: Hashable, keys: list[bytes]) -> int:
        """Start a row that holds nothing with the longest run of `keys` kept: its table's first
        blocks. Returns how many blocks it matched."""
        assert not self._tables.get(row), "a row matches a prefix before it holds any block"
        table = self._tables.setdefault(row, [])
        for key in keys:
            block = self._by_key.get(key)
            if block is None:
                break
            self._idle.pop(block, None)
            self._holders[block] = self._holders.get(block, 0) + 1
            table.append(block)
        self.peak_used = max(self.peak_used, self.used)
        return len(table)

    def kept_prefix(self, keys: list[bytes]) -> int:
        """How many of `keys`, from the first, are kept (what `match` would take now)."""
        count = 0
        while count < len(keys) and keys[count] in self._by_key:
            count += 1
        return count

    def keep(self, row: Hashable, keys: list[bytes]) -> None:
        """Keep the row's first len(keys) blocks (full and written) under their keys for later rows;
        a key already kept keeps its block."""
        for block, key in zip(self._tables[row], keys):
            if block not in self._key_of and key not in self._by_key:
                self._by_key[key] = block
                self._key_of[block] = key

    def release(self, row: Hashable) -> None:
        """Give back every block the row holds: kept ones stay kept (idle) until taken."""
        for block in self._tables.pop(row, []):
            self._holders[block] -= 1
            if self._holders[block]:
                continue
            del self._holders[block]
            if block in self._key_of:
                self._idle[block] = None
            else:
                self._free.append(block)

    def table(self, row: Hashable) -> list[int]:
        return self._tables[row]

    def slots(self, row: Hashable, start: int, end: int) -> torch.Tensor:
        """[end - start] slots of the row's positions start to end - 1 (its table must cover them)."""
        positions = torch.arange(start, end)
        table = torch.tensor(self._tables[row], dtype=torch.long)
        return table[positions // self.block_tokens] * self.block_tokens + positions % self.block_tokens

    def padded_slots(self, rows: list[Hashable], lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's slots of positions 0 to its length - 1, right-padded with slot 0 to the longest:
        ([rows, longest] slots, [rows, longest] True where a position is the row's)."""
        longest = max(lengths)
        width = self.needed(longest)
        tables = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            table = self._tables[row][:width]
            tables[i, : len(table)] = torch.tensor(table, dtype=torch.long)
        positions = torch.arange(longest)
        valid = positions[None, :] < torch.tensor(lengths)[:, None]
        slots = tables[:, positions // self.block_tokens] * self.block_tokens + positions % self.block_tokens
        return slots.masked_fill(~valid, 0), valid

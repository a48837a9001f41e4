"""Which blocks of the paged key/value cache each row holds (the bookkeeping; `paged_cache` holds the tensors).

The cache is a pool of fixed-size blocks of `block_tokens` token slots. A row holds a block table:
the blocks its positions 0, 1, ... fill, in order, so position p sits in slot
`table[p // block_tokens] * block_tokens + p % block_tokens`. A row takes blocks as it grows and
gives them all back when it leaves; no row's keys ever move. Block 0 is never handed out: it is
the slot that shorter rows' padded reads point at (masked), so it is outside the budget.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch


class OutOfBlocks(RuntimeError):
    """The pool has fewer free blocks than a row needs."""


class BlockTables:
    def __init__(self, blocks: int, block_tokens: int):
        if blocks < 1 or block_tokens < 1:
            raise ValueError(f"a paged cache needs at least one block of at least one token, got {blocks} of {block_tokens}")
        self.blocks = blocks
        self.block_tokens = block_tokens
        self._free = list(range(blocks, 0, -1))  # popped from the end: block 1 first
        self._tables: dict[Hashable, list[int]] = {}
        self.peak_used = 0

    def needed(self, tokens: int) -> int:
        """Blocks that hold `tokens` positions."""
        return -(-tokens // self.block_tokens)

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.blocks - len(self._free)

    def held(self, row: Hashable) -> int:
        return len(self._tables.get(row, ()))

    def grow(self, row: Hashable, tokens: int) -> None:
        """Make the row's table cover positions 0 to tokens - 1; OutOfBlocks (taking nothing) if the
        pool lacks the blocks."""
        table = self._tables.setdefault(row, [])
        missing = self.needed(tokens) - len(table)
        if missing <= 0:
            return
        if missing > len(self._free):
            raise OutOfBlocks(f"{missing} more block(s) needed, {len(self._free)} free of {self.blocks}")
        table.extend(self._free.pop() for _ in range(missing))
        self.peak_used = max(self.peak_used, self.used)

    def release(self, row: Hashable) -> None:
        """Give back every block the row holds."""
        self._free.extend(reversed(self._tables.pop(row, [])))

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

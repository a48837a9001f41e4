"""The engine's paged key/value cache and the attention that reads it (issue 25).

`PagedKV` holds one pool per layer for keys and one for values, [blocks * block_tokens, kv heads,
head dim], allocated once; `kv_blocks.BlockTables` says which blocks each row holds. One forward
packs every row's new tokens unpadded into one sequence ([1, tokens, hidden]); `PagedStep` is that
forward's layout, built once on the CPU and shared by every layer.

It plugs into transformers' own model code at two points, both pinned by tests/unit/test_paged_cache.py:
- the attention layers call `cache.update(keys, values, layer_idx, kwargs=kwargs)` with the
  forward's keyword arguments, so `update` writes the new keys and values into their slots in
  place (`index_copy_`: nothing already cached is ever copied);
- the attention function is looked up by name in `AttentionInterface` ("paged_rows", registered
  here): decoding rows attend together (each over the slots of its own blocks, padded with
  block 0 and masked; a key/value head's query heads as its queries), each prefill chunk attends causally over its own row's
  slots. No row ever reads another row's keys. A forward without a `paged_step` (plain `generate`
  on the same model object) gets transformers' SDPA with SDPA's own masks, unchanged.
Passing `attention_mask=PREPARED_MASK` (a 4-D tensor, which transformers' mask builder returns
as it is) skips building masks: each row's own are made here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from vlm_serving.generation.kv_blocks import BlockTables
from vlm_serving.generation.loading import context_tokens

PAGED_ATTENTION = "paged_rows"
# The mask a packed forward passes: 4-D, so transformers takes it as prepared and builds none; never read.
PREPARED_MASK = torch.zeros(1, 1, 0, 0, dtype=torch.bool)


@dataclass
class PagedStep:
    """One packed forward's layout: where each new token is written, and what each row reads."""

    cache: "PagedKV"
    write: torch.Tensor  # [tokens] slot of each packed token
    decode_at: torch.Tensor  # [decoding rows] packed index of each decoding row's one token
    decode_slots: torch.Tensor  # [decoding rows, longest] each one's slots, padded with slot 0
    decode_valid: torch.Tensor  # [decoding rows, 1, 1, longest] True where the slot is the row's
    # (packed start, packed end, the row's slots up to end, causal mask [new, cached]) per prefill chunk.
    chunks: list[tuple[int, int, torch.Tensor, torch.Tensor]]

    @property
    def rows(self) -> int:
        return len(self.decode_at) + len(self.chunks)

    @property
    def prefill_ends(self) -> list[int]:
        """Where each prefill chunk's row stands after it (a whole prompt's length when it completes)."""
        return [len(slots) for _, _, slots, _ in self.chunks]


class PagedKV:
    """Per-layer key and value pools and their block tables. Not a transformers `Cache`: the model
    only calls `update`."""

    def __init__(self, model, blocks: int, block_tokens: int):
        config = model.config.get_text_config()
        refuse_sliding_window(config)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.tables = BlockTables(blocks, block_tokens)
        shape = ((blocks + 1) * block_tokens, config.num_key_value_heads, head_dim)
        device, dtype = model.device, model.dtype
        # Untouched pages cost no memory until written; block 0 is read (masked) and must hold no NaN.
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        for pool in self.keys + self.values:
            pool[:block_tokens].zero_()

    def plan(self, decoding: list[tuple[object, int]], chunks: list[tuple[object, int, int]]) -> PagedStep:
        """The layout of a forward packing `decoding` rows' one token each (row, its position) and
        then `chunks` (row, first position, end) of prompts. Every row's table must cover its tokens."""
        tables = self.tables
        device = self.keys[0].device
        writes = [tables.slots(row, position, position + 1) for row, position in decoding]
        decode_slots = decode_valid = torch.zeros(0, 0, dtype=torch.long)
        if decoding:
            decode_slots, decode_valid = tables.padded_slots([row for row, _ in decoding],
                                                             [position + 1 for _, position in decoding])
        planned, at = [], len(decoding)
        for row, start, end in chunks:
            slots = tables.slots(row, 0, end)
            writes.append(slots[start:])
            causal = torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]
            planned.append((at, at + end - start, slots.to(device), causal.to(device)))
            at += end - start
        return PagedStep(self, torch.cat(writes).to(device), torch.arange(len(decoding), device=device),
                         decode_slots.to(device), decode_valid[:, None, None, :].to(device), planned)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, kwargs: dict):
        """[1, kv heads, tokens, dim] new keys and values of the packed tokens, written at their slots."""
        step: PagedStep = kwargs["paged_step"]
        self.keys[layer_idx].index_copy_(0, step.write, key_states[0].transpose(0, 1))
        self.values[layer_idx].index_copy_(0, step.write, value_states[0].transpose(0, 1))
        return key_states, value_states


def refuse_sliding_window(config) -> None:
    """The paged attention attends over a row's whole past: a window that would cut it within the
    model's context would change the answers, so such a model is refused here."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None) or []
    windowed = "sliding_attention" in types or getattr(config, "use_sliding_window", window is not None)
    if windowed and window is not None and window < context_tokens(config):
        raise ValueError(f"the model's sliding window of {window} tokens is shorter than its context of "
                         f"{context_tokens(config)} tokens; the paged cache attends over whole rows, so serve it "
                         "with scheduler static")


def paged_rows_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [1, heads, tokens, dim] packed -> [1, tokens, heads, dim]; keys and values read from the pools."""
    step: PagedStep | None = kwargs.get("paged_step")
    if step is None:  # a plain forward of the same model (the static scheduler's generate)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    keys, values = step.cache.keys[module.layer_idx], step.cache.values[module.layer_idx]
    out = torch.empty_like(query[0].transpose(0, 1))  # [tokens, heads, dim]
    if len(step.decode_at):
        rows, kv_heads = len(step.decode_at), keys.shape[1]
        # A decoding row's one query per head: the heads sharing a key/value head attend as that
        # head's queries ([rows, kv heads, heads per kv head, dim]), so no key is repeated per head.
        q = query[0][:, step.decode_at].transpose(0, 1).reshape(rows, kv_heads, -1, query.shape[-1])
        k = _gather(keys, step.decode_slots).permute(0, 2, 1, 3)  # [rows, kv heads, longest, dim]
        v = _gather(values, step.decode_slots).permute(0, 2, 1, 3)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=step.decode_valid, scale=scaling)
        out[step.decode_at] = attended.reshape(rows, -1, query.shape[-1])
    for start, end, slots, causal in step.chunks:
        q = query[:, :, start:end]  # [1, heads, new, dim]
        k = _gather(keys, slots).transpose(0, 1)[None]  # [1, kv heads, cached, dim]
        v = _gather(values, slots).transpose(0, 1)[None]
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=causal, scale=scaling, enable_gqa=True)
        out[start:end] = attended[0].transpose(0, 1)
    return out[None], None


def _gather(pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """pool[slots] ([*slots shape, kv heads, dim]): `index_select` on the flattened slots is about
    1.4x faster than advanced indexing on the CPU (perf/paged_row.py's shape)."""
    return pool.index_select(0, slots.reshape(-1)).view(*slots.shape, *pool.shape[1:])


AttentionInterface.register(PAGED_ATTENTION, paged_rows_attention)
# Plain forwards of a model set to paged_rows build exactly the masks SDPA would.
ALL_MASK_ATTENTION_FUNCTIONS.register(PAGED_ATTENTION, sdpa_mask)


def use_paged_attention(model) -> None:
    """Route the model's text attention through `paged_rows_attention` (the vision tower keeps SDPA)."""
    model.set_attn_implementation({"text_config": PAGED_ATTENTION, "vision_config": "sdpa"})

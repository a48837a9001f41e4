"""The paged key/value cache (issue 25): its block bookkeeping, the transformers internals it relies
on (pinned here: `cache.update(..., kwargs=)`, a 4-D mask taken as prepared, the attention looked
up by name), and the engine's use of it (no cached key ever moves; admission by blocks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoConfig

from tests.conftest import FAMILIES, picture
from tests.families import Family, ask
from tests.unit.test_engine import CASES, Caller, drive, reference
from vlm_serving.generation import paged_cache
from vlm_serving.generation.engine import EngineLimits, InflightEngine
from vlm_serving.generation.kv_blocks import BlockTables, OutOfBlocks
from vlm_serving.generation.paged_cache import PREPARED_MASK, PagedKV, refuse_sliding_window, use_paged_attention


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, checkpoints):
    return Family(request.param, checkpoints / request.param)


# ----- block bookkeeping -----


def test_rows_take_blocks_as_they_grow_and_give_them_all_back():
    tables = BlockTables(blocks=4, block_tokens=4)
    tables.grow("a", 5)  # two blocks
    tables.grow("b", 4)  # one
    assert (tables.held("a"), tables.held("b"), tables.free) == (2, 1, 1)
    a = tables.table("a")
    assert tables.slots("a", 3, 6).tolist() == [a[0] * 4 + 3, a[1] * 4, a[1] * 4 + 1]
    tables.grow("a", 8)  # still two blocks
    assert tables.free == 1
    with pytest.raises(OutOfBlocks, match="2 more block"):
        tables.grow("b", 12)
    assert tables.held("b") == 1, "a grow that cannot be met takes nothing"
    tables.release("a")
    assert (tables.free, tables.used, tables.peak_used) == (3, 1, 3)
    assert 0 not in tables.table("b"), "block 0 is the padding block, never handed out"


def test_padded_slots_point_past_each_rows_length_at_the_padding_block():
    tables = BlockTables(blocks=4, block_tokens=2)
    tables.grow("long", 5)
    tables.grow("short", 2)
    slots, valid = tables.padded_slots(["long", "short"], [5, 2])
    assert slots[0].tolist() == tables.slots("long", 0, 5).tolist()
    assert slots[1].tolist() == tables.slots("short", 0, 2).tolist() + [0, 0, 0]
    assert valid.tolist() == [[True] * 5, [True, True, False, False, False]]


# ----- transformers internals the cache relies on -----


def packed_logits(model, cache: PagedKV, decoding, chunks, embeds, positions) -> torch.Tensor:
    step = cache.plan(decoding, chunks)
    keep = list(range(len(decoding))) + [len(embeds) - 1]
    return model(inputs_embeds=embeds[None], position_ids=positions, cache=cache, use_cache=False,
                 attention_mask=PREPARED_MASK, paged_step=step, logits_to_keep=torch.tensor(keep)).logits[0]


def test_a_packed_forward_gives_each_row_its_own_plain_forwards_logits(family):
    """Row "a" decodes its third token while row "b"'s prompt is prefilled in two chunks beside it:
    each row's logits are those of a plain SDPA forward over that row alone (Qwen2.5-VL with its 3-D
    positions). This pins every internal at once: `update` called with the forward's kwargs, the
    4-D mask taken as prepared, the attention found by name, positions taken as given."""
    model = family.model
    use_paged_attention(model)
    ids = {"a": torch.tensor([5, 6, 7]), "b": torch.tensor([11, 12, 13, 14, 15, 16, 17])}
    embed = model.get_input_embeddings()
    three_d = family.generator.marks_modalities

    def positions(values):
        values = torch.as_tensor(values)
        return values.expand(3, 1, -1) if three_d else values[None]

    with torch.inference_mode():
        plain = {name: model(input_ids=tokens[None], position_ids=positions(torch.arange(len(tokens))),
                             use_cache=False).logits[0] for name, tokens in ids.items()}
        cache = PagedKV(model, blocks=8, block_tokens=2)
        cache.tables.grow("a", 3)
        cache.tables.grow("b", 7)
        # a's first two tokens, b's first four: one prefill forward of two chunks.
        first = cache.plan([], [("a", 0, 2), ("b", 0, 4)])
        model(inputs_embeds=embed(torch.cat([ids["a"][:2], ids["b"][:4]]))[None],
              position_ids=positions([0, 1, 0, 1, 2, 3]), cache=cache, use_cache=False,
              attention_mask=PREPARED_MASK, paged_step=first)
        logits = packed_logits(model, cache, [("a", 2)], [("b", 4, 7)],
                               embed(torch.cat([ids["a"][2:], ids["b"][4:]])), positions([2, 4, 5, 6]))
    torch.testing.assert_close(logits[0], plain["a"][2], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[1], plain["b"][6], atol=1e-4, rtol=1e-4)


def test_update_gets_the_forwards_kwargs_and_the_prepared_mask_reaches_the_attention(family, monkeypatch):
    model = family.model
    use_paged_attention(model)
    seen = {"update": [], "mask": []}
    real_update, real_attention = PagedKV.update, paged_cache.paged_rows_attention

    def update(self, key_states, value_states, layer_idx, kwargs):
        seen["update"].append((layer_idx, "paged_step" in kwargs))
        return real_update(self, key_states, value_states, layer_idx, kwargs)

    def attention(module, query, key, value, attention_mask, **kwargs):
        seen["mask"].append(attention_mask)
        return real_attention(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(PagedKV, "update", update)
    monkeypatch.setitem(paged_cache.AttentionInterface._global_mapping, paged_cache.PAGED_ATTENTION, attention)
    cache = PagedKV(model, blocks=4, block_tokens=4)
    cache.tables.grow("a", 3)
    positions = torch.arange(3).expand(3, 1, -1) if family.generator.marks_modalities else torch.arange(3)[None]
    with torch.inference_mode():
        packed_logits(model, cache, [], [("a", 0, 3)], model.get_input_embeddings()(torch.tensor([1, 2, 3])), positions)
    layers = model.config.get_text_config().num_hidden_layers
    assert seen["update"] == [(layer, True) for layer in range(layers)]
    assert len(seen["mask"]) == layers and all(mask is PREPARED_MASK for mask in seen["mask"])


def test_plain_forwards_of_a_paged_model_keep_sdpas_masks(family):
    """The static scheduler and the references call the same model object: a left-padded batch
    gives the same logits before and after the text attention is routed through paged_rows."""
    model = family.model
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.inference_mode():
        model.set_attn_implementation("sdpa")
        before = model(input_ids=ids, attention_mask=mask).logits
        use_paged_attention(model)
        after = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_a_sliding_window_shorter_than_the_context_is_refused(checkpoints):
    config = AutoConfig.from_pretrained(checkpoints / "pixtral").get_text_config()
    assert config.sliding_window == config.max_position_embeddings  # the tiny Pixtral's: never cuts
    refuse_sliding_window(config)
    config.sliding_window = 1024
    with pytest.raises(ValueError, match="sliding window of 1024 tokens is shorter than its context of 4096"):
        refuse_sliding_window(config)


# ----- the engine on the paged cache -----


def test_no_cached_key_moves_while_rows_join_and_leave(family):
    """The pools are allocated once and every step writes only its new tokens' slots: a row's keys
    stay where they were written (bitwise) while others join, run and leave."""
    engine = InflightEngine(family.generator, EngineLimits(prefill_chunk_tokens=16))
    pools = [pool.data_ptr() for pool in engine._cache.keys + engine._cache.values]
    long, joiner = Caller(), Caller()
    engine.submit(family.request(ask("keep going"), [], max_tokens=40), long.sink())
    for _ in range(4):
        engine.step()
    [row] = engine._running
    slots = engine.blocks.slots(row, 0, row.cached)
    written = engine._cache.keys[-1][slots].clone()
    drive(engine, {0: [(joiner, family.request(ask("Describe it.", 1), [picture(64, 64, seed=2)], max_tokens=6))]},
          check=lambda engine: None if long.done else torch.testing.assert_close(
              engine._cache.keys[-1][slots], written, atol=0, rtol=0))
    assert [pool.data_ptr() for pool in engine._cache.keys + engine._cache.values] == pools
    assert joiner.final.completion_tokens == 6 and long.final.completion_tokens > 0


def test_admission_counts_each_rows_own_blocks_not_the_longest_rows(family):
    """One long row and four short ones: the dense cache needed rows x the longest reserve
    (5 x 400 = 2,000 slots); the paged cache admits all five in 400 + 4 x 48 (+ rounding)."""
    long = family.request(ask("a long answer"), [], max_tokens=400 - 32)
    shorts = [family.request(ask(f"q{n}"), [], max_tokens=8) for n in range(4)]
    reserves = [len(r.input_ids) + r.params.max_tokens for r in [long] + shorts]
    budget = sum(-(-reserve // 16) * 16 for reserve in reserves)
    assert budget < 2 * max(reserves), "the dense cache would have admitted two rows at most"
    engine = InflightEngine(family.generator, EngineLimits(cache_tokens=budget, max_running=8))
    callers = [Caller() for _ in reserves]
    for caller, request in zip(callers, [long] + shorts):
        engine.submit(request, caller.sink())
    engine.step()
    assert engine.stats.waiting == 0 and engine.stats.running + engine.stats.finished == 5
    peaks = []
    drive(engine, {}, check=lambda engine: peaks.append(engine.stats.cache_tokens_used))
    assert max(peaks) <= budget and engine.blocks.used == 0
    for caller, request in zip(callers[1:], shorts):
        assert caller.final.completion_tokens >= 1


# ----- prefix caching -----


def run_alone(engine: InflightEngine, request) -> Caller:
    caller = Caller()
    drive(engine, {0: [(caller, request)]})
    return caller


def test_a_second_turn_reuses_the_first_turns_blocks_and_stays_exact(family):
    pictures = [picture(200, 120, seed=1)]
    turn = ask("What is in the picture?", 1)
    engine = InflightEngine(family.generator)
    first_request = family.request(turn, pictures, max_tokens=8)
    first = run_alone(engine, first_request)
    assert first.final.cached_tokens == 0
    following = turn + [{"role": "assistant", "content": [{"type": "text", "text": first.final.text}]},
                        {"role": "user", "content": [{"type": "text", "text": "And the colours?"}]}]
    second_request = family.request(following, pictures, max_tokens=8)
    before, after = first_request.input_ids, second_request.input_ids
    common = int(np.argmin(before == after[: len(before)])) if (before != after[: len(before)]).any() else len(before)
    block = engine.blocks.block_tokens
    second = run_alone(engine, second_request)
    assert second.final.cached_tokens == common // block * block
    assert second.final.cached_tokens >= len(before) - 2 * block, "the whole first prompt but its last blocks"
    assert second.final.token_ids == reference(family, following, pictures, 8)


def test_two_different_images_with_the_same_prompt_never_share_their_blocks(family):
    one, other = picture(64, 64, seed=2), picture(64, 64, seed=5)
    requests = [family.request(ask("Describe it.", 1), [image], max_tokens=6) for image in (one, other, other)]
    assert (requests[0].input_ids == requests[1].input_ids).all(), "the same placeholder tokens"
    first_image = int(np.flatnonzero(requests[0].input_ids == family.generator.image_token_id)[0])
    engine = InflightEngine(family.generator, EngineLimits(block_tokens=4))
    callers = [run_alone(engine, request) for request in requests]
    assert callers[1].final.cached_tokens == first_image // 4 * 4, "only the text before the image is shared"
    assert callers[2].final.cached_tokens > first_image, "the same image again shares its blocks"
    for caller, image in zip(callers, (one, other, other)):
        assert caller.final.token_ids == reference(family, ask("Describe it.", 1), [image], 6)


def test_eviction_under_pressure_keeps_every_answer_exact(family):
    """A pool smaller than the prompts' kept blocks: running the cases one after the other evicts
    the least recently used, and a first case run again (partly evicted) is still exact."""
    cases = CASES + CASES[:1]
    requests = [family.request(messages, pictures, max_tokens=max_tokens) for messages, pictures, max_tokens in cases]
    budget = -(-max(len(r.input_ids) + r.params.max_tokens for r in requests) // 16) * 16
    engine = InflightEngine(family.generator, EngineLimits(cache_tokens=budget))
    callers = [run_alone(engine, request) for request in requests]
    assert engine.blocks.evicted > 0 and engine.blocks.kept <= engine.blocks.blocks
    for caller, (messages, pictures, max_tokens) in zip(callers, cases):
        assert caller.final.token_ids == reference(family, messages, pictures, max_tokens)


def test_prompts_are_packed_unpadded_under_a_budget_of_real_tokens(family):
    """A long prompt and a short one arrive together under a 64-token budget: every forward feeds
    at most 64 prompt tokens (no padding counted), the budget is shared, so the short prompt's
    first token comes while the long one is still being prefilled; both stay exact."""
    long_messages, short_messages = ask("question " * 300), ask("Hi")
    requests = [family.request(long_messages, [], max_tokens=4), family.request(short_messages, [], max_tokens=4)]
    assert len(requests[0].input_ids) > 4 * 64 > 2 * len(requests[1].input_ids)
    fed = []
    engine = InflightEngine(family.generator, EngineLimits(prefill_chunk_tokens=64))
    model = engine.model

    def forward(**inputs):
        fed.append(sum(end - start for start, end, _, _ in inputs["paged_step"].chunks))
        return model(**inputs)

    engine.model = type("Counted", (), {"__call__": staticmethod(forward),
                                        "get_input_embeddings": staticmethod(model.get_input_embeddings)})()
    long, short = Caller(), Caller()
    order = []
    drive(engine, {0: [(long, requests[0]), (short, requests[1])]},
          check=lambda engine: order.extend(name for name, caller in (("short", short), ("long", long))
                                            if caller.updates and name not in order))
    assert max(fed) == 64 and sum(fed) == sum(len(r.input_ids) for r in requests)
    assert order == ["short", "long"]
    for caller, messages in ((long, long_messages), (short, short_messages)):
        assert caller.final.token_ids == reference(family, messages, [], 4)


def test_prefix_caching_switches_off_per_deployment(family):
    limits = EngineLimits.from_parameters({"prefix_caching": "false", "cache_tokens": "4096"})
    assert (limits.prefix_caching, limits.cache_tokens) == (False, 4096)
    assert EngineLimits.from_parameters(EngineLimits().to_parameters()) == EngineLimits()
    with pytest.raises(ValueError, match="engine switch prefix_caching='off' must be true or false"):
        EngineLimits.from_parameters({"prefix_caching": "off"})
    engine = InflightEngine(family.generator, limits)
    request = family.request(ask("Describe it.", 1), [picture(64, 64, seed=2)], max_tokens=6)
    callers = [run_alone(engine, request) for _ in range(2)]
    assert [caller.final.cached_tokens for caller in callers] == [0, 0] and engine.blocks.kept == 0
    assert callers[0].final.token_ids == callers[1].final.token_ids


def test_questions_about_one_image_submitted_together_share_its_blocks(family):
    """Submitted in one step, the later questions wait for the first one's prefill of the shared
    image (the rows behind them go first) and then start from its blocks; all stay exact."""
    image = picture(200, 120, seed=1)
    questions = ["What is in the picture?", "Which colours?", "Describe it."]
    requests = [family.request(ask(question, 1), [image], max_tokens=5) for question in questions]
    last_image = int(np.flatnonzero(requests[0].input_ids == family.generator.image_token_id)[-1])
    engine = InflightEngine(family.generator, EngineLimits(block_tokens=4))
    callers = [Caller() for _ in requests]
    drive(engine, {0: list(zip(callers, requests))})
    assert callers[0].final.cached_tokens == 0
    for caller, request in zip(callers[1:], requests[1:]):
        common = int(np.flatnonzero(request.input_ids[:len(requests[0].input_ids)] != requests[0].input_ids[:len(request.input_ids)])[0])
        assert common > last_image and caller.final.cached_tokens == common // 4 * 4, "the image's blocks shared"
    for caller, question in zip(callers, questions):
        assert caller.final.token_ids == reference(family, ask(question, 1), [image], 5)

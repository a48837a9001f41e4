"""Rows 17 of `make bench` (also alone): grammar work at a real vocabulary size, off the critical path.

    .venv/bin/python -m perf.grammar_row

The tiny checkpoints' tokenizers have a few hundred tokens, where a grammar costs next to nothing;
Qwen2.5-VL's has 151,643 (152,064 logits), and xgrammar's compile and mask costs grow with it. The
vocabulary here is synthetic at that size, built from the tiny Qwen2.5-VL tokenizer's pieces (each
new token one to three of them joined, as BPE merges join pieces), byte-level like the real one.
17a: each task's schema (one image) and perf.engine's typical schema, compiled uncached, and how long
     the engine's `submit` (Triton's execute thread) takes for a request with that format (it
     compiles on the compiler's thread; before issue 24 it compiled there and then);
17b-d: a step's masks for 1, 16 and 64 rows, each row at a random point of an OCR answer (most of
     its characters inside strings, where masks cost the most): filled row by row (the engine
     before issue 24) and by xgrammar's batch matcher (`MaskFiller`);
17e: what a step waits for its masks after a forward that leaves the CPU free (a GPU forward; here
     a sleep of FORWARD_MS), 64 rows: fill started before the forward (`MaskFiller`) / filled after it.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import time

import xgrammar as xgr
from transformers import AutoTokenizer

from perf.engine import TYPICAL_SCHEMA
from vlm_serving import tasks
from vlm_serving.deploy.triton_server import BUILD
from vlm_serving.generation.grammar import FormatCompiler, MaskFiller
from vlm_serving.generation.structured import JSON_SCHEMA, ResponseFormat

REGULAR_TOKENS = 151_643  # Qwen2.5-VL's tokenizer
LOGITS = 152_064  # its model's vocab_size (the logits' width)
FORWARD_MS = 30.0  # about a decode step of a 7B model at 64 rows on one GPU
STEPS = 24


def progress(message: str) -> None:
    print(f"perf.grammar_row: {message}", file=sys.stderr, flush=True)


def synthetic_vocabulary(seed: int = 0) -> tuple[list[str], int]:
    """(byte-level token strings of Qwen2.5-VL's size, the end token's id): the tiny tokenizer's own
    tokens first, then distinct joins of one to three of its pieces, then reserved special tokens."""
    tokenizer = AutoTokenizer.from_pretrained(BUILD / "models" / "qwen2_5_vl")
    vocabulary = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    pieces = [piece for piece in tokenizer.get_vocab() if not piece.startswith("<|")]
    seen, rng = set(vocabulary), random.Random(seed)
    while len(vocabulary) < REGULAR_TOKENS:
        token = "".join(rng.choice(pieces) for _ in range(rng.choice((1, 2, 2, 3))))
        if token not in seen:
            seen.add(token)
            vocabulary.append(token)
    vocabulary += [f"<|reserved_{i}|>" for i in range(LOGITS - len(vocabulary))]
    return vocabulary, tokenizer.eos_token_id


def compiler(vocabulary: list[str], eos: int) -> FormatCompiler:
    return FormatCompiler(xgr.TokenizerInfo(vocabulary, vocab_type=xgr.VocabType.BYTE_LEVEL, vocab_size=LOGITS,
                                            stop_token_ids=[eos]))


def compile_rows(vocabulary: list[str], eos: int) -> list[tuple]:
    formats = {f"{task} task": tasks.output_format(task, 1) for task in tasks.STRUCTURED}
    formats["typical schema (perf.engine)"] = ResponseFormat(JSON_SCHEMA, schema=json.dumps(TYPICAL_SCHEMA))
    rows = []
    for name, response_format in formats.items():
        fresh = compiler(vocabulary, eos)  # uncached: a compiler of its own per format
        started = time.perf_counter()
        grammar = fresh.row(response_format)  # what submit does with a format
        submitted = time.perf_counter() - started
        grammar.matcher  # noqa: B018 (waits for the compile)
        compiled = time.perf_counter() - started
        progress(f"compiled the {name} in {compiled:.2f} s (submit: {submitted * 1000:.2f} ms)")
        rows.append((name, submitted, compiled))
    return rows


# An OCR answer as a real model writes it: most of its characters inside strings, where a mask
# costs the most (every token that fits the string's characters must be checked).
OCR_ANSWER = json.dumps([
    {"bbox_2d": [34, 20, 388, 64], "text_content": "Central Station - Platforms 1 to 6"},
    {"bbox_2d": [40, 80, 301, 112], "text_content": "Trains to the airport every 15 minutes"},
    {"bbox_2d": [40, 130, 352, 160], "text_content": "Tickets must be validated before boarding."},
    {"bbox_2d": [410, 300, 590, 332], "text_content": "EXIT / Ausgang / Sortie"},
], separators=(",", ":"))


def matchers_within(compiled: xgr.CompiledGrammar, rows: int, rng: random.Random) -> list[xgr.GrammarMatcher]:
    """`rows` matchers, each standing at a random point of OCR_ANSWER (as rows of a batch do, each
    at its own point of its answer)."""
    matchers = []
    for _ in range(rows):
        matcher = xgr.GrammarMatcher(compiled)
        assert matcher.accept_string(OCR_ANSWER[: rng.randrange(len(OCR_ANSWER))])
        matchers.append(matcher)
    return matchers


def mask_rows(format_compiler: FormatCompiler) -> tuple[list[tuple[int, float, float]], xgr.CompiledGrammar]:
    """Per row count (1, 16, 64): (rows, seconds row by row, seconds batched), each the mean over
    STEPS batches of rows at random points of an OCR answer; and the OCR task's grammar."""
    compiled = format_compiler.compile(tasks.output_format(tasks.OCR, 1))
    filler = MaskFiller(LOGITS)
    rng = random.Random(0)
    results = []
    for rows in (1, 16, 64):
        serial, batched = [], []
        for _ in range(STEPS):
            matchers = matchers_within(compiled, rows, rng)
            bitmask = xgr.allocate_token_bitmask(rows, LOGITS)
            started = time.perf_counter()
            for i, matcher in enumerate(matchers):
                matcher.fill_next_token_bitmask(bitmask, i)
            serial.append(time.perf_counter() - started)
            started = time.perf_counter()
            filler.fill(rows, list(range(rows)), matchers)
            batched.append(time.perf_counter() - started)
        progress(f"masks for {rows} rows: {statistics.mean(serial) * 1000:.2f} ms row by row, "
                 f"{statistics.mean(batched) * 1000:.2f} ms batched")
        results.append((rows, statistics.mean(serial), statistics.mean(batched)))
    return results, compiled


def critical_path_row(compiled: xgr.CompiledGrammar) -> tuple[float, float]:
    """(filled during the forward, filled after it): seconds a step waits for 64 rows' masks once a
    FORWARD_MS forward is done, mean over STEPS steps."""
    filler, rng = MaskFiller(LOGITS), random.Random(1)
    during, after = [], []
    for _ in range(STEPS):
        matchers = matchers_within(compiled, 64, rng)
        filling = filler.start([_Standing(matcher) for matcher in matchers])
        time.sleep(FORWARD_MS / 1000)  # the GPU computes; the CPU is free
        started = time.perf_counter()
        filling.result()
        during.append(time.perf_counter() - started)
        time.sleep(FORWARD_MS / 1000)
        started = time.perf_counter()
        bitmask = xgr.allocate_token_bitmask(len(matchers), LOGITS)
        for i, matcher in enumerate(matchers):
            matcher.fill_next_token_bitmask(bitmask, i)
        after.append(time.perf_counter() - started)
    return statistics.mean(during), statistics.mean(after)


class _Standing:
    """A row's grammar standing where its matcher is (all MaskFiller.start reads of a row)."""

    def __init__(self, matcher: xgr.GrammarMatcher):
        self.matcher = matcher


def rows() -> list[tuple]:
    """Rows 17a-e as (key, measure, measured, ratio, goal, unit, failed)."""
    progress(f"building a synthetic byte-level vocabulary of {LOGITS:,} tokens")
    vocabulary, eos = synthetic_vocabulary()
    table = []
    compiled = compile_rows(vocabulary, eos)
    table.append(("17a", f"compile uncached at {LOGITS:,} tokens, submit's time / the compile's: "
                  + "; ".join(f"{name} {submitted * 1000:.1f} ms / {seconds:.2f} s" for name, submitted, seconds in compiled),
                  f"compile {min(s for _, _, s in compiled):.2f}-{max(s for _, _, s in compiled):.2f} s",
                  max(submitted / seconds for _, submitted, seconds in compiled), "reported", "x", ""))
    masks, ocr = mask_rows(compiler(vocabulary, eos))
    for key, (count, serial, batched) in zip("bcd", masks):
        table.append((f"17{key}", f"a step's masks at {LOGITS:,} tokens, {count} row(s) at random points of OCR "
                      f"answers, batch matcher on {os.cpu_count()} threads / row by row",
                      f"{batched * 1000:.2f} / {serial * 1000:.2f} ms", batched / serial, "reported", "x", ""))
    during, after = critical_path_row(ocr)
    table.append(("17e", f"a step's wait for 64 rows' masks after a {FORWARD_MS:.0f} ms forward that frees the CPU, "
                  "filled during it / after it", f"{during * 1000:.2f} / {after * 1000:.2f} ms", during / after,
                  "reported", "x", ""))
    return table


def main() -> int:
    from perf.bench import print_table

    print_table(rows())
    return 0


if __name__ == "__main__":
    sys.exit(main())

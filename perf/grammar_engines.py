"""Why xgrammar: two grammar engines on the same schema and tokenizers (a one-off, for the choice).

    .venv/bin/pip install llguidance==1.9.1   # not a project dependency
    .venv/bin/python -m perf.grammar_engines

For each tiny tokenizer: the engine's tokenizer set-up, compiling a typical JSON Schema, and the
mean time per step of one random path (fill the next-token mask, apply it, sample, advance),
200 steps at most. Results: perf/RESULTS.md, "Constrained decoding".
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from perf.engine import TYPICAL_SCHEMA

REPO_ROOT = Path(__file__).resolve().parents[1]


def walk(fill, apply, accept, done, vocab: int) -> tuple[float, int]:
    """(seconds per step, steps) of one random path through a grammar."""
    generator = torch.Generator().manual_seed(0)
    steps, started = 0, time.perf_counter()
    while not done() and steps < 200:
        logits = torch.randn(1, vocab, generator=generator)
        apply(logits, fill())
        token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))
        accept(token)
        steps += 1
    return (time.perf_counter() - started) / max(steps, 1), steps


def xgrammar_row(tokenizer, vocab: int) -> str:
    import xgrammar as xgr

    started = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    setup = time.perf_counter() - started
    started = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(TYPICAL_SCHEMA), any_whitespace=False)
    compile_s = time.perf_counter() - started
    matcher, bitmask = xgr.GrammarMatcher(compiled), xgr.allocate_token_bitmask(1, vocab)

    def fill():
        matcher.fill_next_token_bitmask(bitmask)
        return bitmask

    step, steps = walk(fill, xgr.apply_token_bitmask_inplace, matcher.accept_token, matcher.is_terminated, vocab)
    return f"xgrammar | {setup * 1000:.1f} | {compile_s * 1000:.1f} | {step * 1000:.3f} ({steps} steps)"


def llguidance_row(tokenizer, vocab: int) -> str:
    try:
        import llguidance
        import llguidance.hf
        import llguidance.torch as guidance_torch
    except ImportError:
        return "llguidance | not installed (pip install llguidance==1.9.1) | | "
    started = time.perf_counter()
    guidance_tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
    setup = time.perf_counter() - started
    started = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(TYPICAL_SCHEMA),
                                                            defaults={"whitespace_flexible": False})
    matcher = llguidance.LLMatcher(guidance_tokenizer, grammar)
    compile_s = time.perf_counter() - started
    bitmask = guidance_torch.allocate_token_bitmask(1, guidance_tokenizer.vocab_size)

    def fill():
        guidance_torch.fill_next_token_bitmask(matcher, bitmask, 0)
        return bitmask

    step, steps = walk(fill, guidance_torch.apply_token_bitmask_inplace, matcher.consume_token, matcher.is_stopped, vocab)
    return f"llguidance | {setup * 1000:.1f} | {compile_s * 1000:.1f} | {step * 1000:.3f} ({steps} steps)"


def main() -> int:
    print("| tokenizer | engine | tokenizer set-up ms | compile ms | ms per step |")
    print("| --- | --- | --- | --- | --- |")
    for family in ("qwen2_5_vl", "pixtral"):
        tokenizer = AutoTokenizer.from_pretrained(REPO_ROOT / "build" / "models" / family, local_files_only=True)
        for row in (xgrammar_row(tokenizer, len(tokenizer)), llguidance_row(tokenizer, len(tokenizer))):
            print(f"| {family} | {row} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

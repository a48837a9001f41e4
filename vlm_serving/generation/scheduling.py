"""How a generation instance schedules its requests (light: the config renderer imports it).

- `static`: each execution runs one `generate` over the batch Triton's dynamic batcher formed
  (`batch.BatchGenerator`); a request that arrives a step later waits for the whole batch.
- `inflight`: one loop per instance owns the running batch and lets requests join and leave at
  every step (`engine.InflightEngine`), within `EngineLimits`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

SCHEDULERS = ("inflight", "static")


@dataclass(frozen=True)
class EngineLimits:
    """How much one generation instance runs at once (rendered into the model config per profile)."""

    # Rows decoded together at each step.
    max_running: int = 16
    # Key/value-cache budget in token slots, for every layer (bytes = this × layers × 2 × kv heads ×
    # head dim × dtype size): a pool of cache_tokens / block_tokens blocks (rounded up), allocated
    # once. A row holds the blocks its tokens fill; admission counts what rows need now, and the
    # newest rows are preempted (recomputed later) when the blocks run out. One row's prompt +
    # max_tokens must fit.
    cache_tokens: int = 65536
    # Token slots per block of the paged cache.
    block_tokens: int = 16
    # Prompt tokens prefilled per step (real tokens, packed unpadded across the prefilling rows and
    # shared evenly among them); each running row's decode token comes on top, in the same forward.
    prefill_chunk_tokens: int = 512
    # Requests waiting for a row; beyond this many, new ones are refused (EngineFull).
    max_waiting: int = 64
    # Keep prompts' full blocks for later rows with the same prefix (earlier turns, the same image).
    prefix_caching: bool = True

    def to_parameters(self) -> dict[str, str]:
        """As model-config parameters (string values; switches as "true" / "false")."""
        return {name.name: _as_parameter(getattr(self, name.name)) for name in fields(self)}

    @classmethod
    def from_parameters(cls, parameters: dict[str, str]) -> "EngineLimits":
        values = {}
        for name in fields(cls):
            if name.name not in parameters:
                continue
            text = parameters[name.name]
            if name.type == "bool":
                if text.lower() not in ("true", "false"):
                    raise ValueError(f"engine switch {name.name}={text!r} must be true or false")
                values[name.name] = text.lower() == "true"
            else:
                values[name.name] = int(text)
        limits = cls(**values)
        for name in fields(limits):
            if name.type != "bool" and getattr(limits, name.name) < 1:
                raise ValueError(f"engine limit {name.name}={getattr(limits, name.name)} must be at least 1")
        return limits


def _as_parameter(value: int | bool) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)

"""Which Triton models make up each public model: a family's pipeline, and the router.

Imports nothing heavy: the gateway (and its container image) needs these names, not the renderer.
"""

from __future__ import annotations

FAMILIES = ("qwen2_5_vl", "pixtral")
ROUTER = "auto"


def pipeline(ensemble: str) -> list[str]:
    """A family's Triton models in load order: each before the models that call it (the encoder
    before the embed step that calls it through BLS, which Triton does not know of; the steps
    before the ensemble). Loading the ensemble alone would leave the encoder out. The router's
    pipeline is both families' and then itself: it serves when all of them do."""
    if ensemble == ROUTER:
        return [model for family in FAMILIES for model in pipeline(family)] + [ROUTER]
    steps = ("preprocess", "encoder", "embed", "generate")
    return [f"{ensemble}_{step}" for step in steps] + [ensemble]


def own_models(ensemble: str) -> list[str]:
    """The models an admin load or unload of `ensemble` touches: the router only itself (its
    families are models of their own)."""
    return [ROUTER] if ensemble == ROUTER else pipeline(ensemble)

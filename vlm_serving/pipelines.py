"""Which Triton models make up each public model: a family's pipeline, and the router.

Imports nothing heavy: the gateway (and its container image) needs these names, not the renderer.
"""

from __future__ import annotations

FAMILIES = ("qwen2_5_vl", "pixtral")
ROUTER = "auto"
# The router's primary family (vlm_serving.routing): it answers alone when the other family's call fails.
PRIMARY = "qwen2_5_vl"


def pipeline(ensemble: str) -> list[str]:
    """A family's Triton models in load order: each before the models that call it (the encoder
    before the embed step that calls it through BLS, which Triton does not know of; the steps
    before the ensemble). Loading the ensemble alone would leave the encoder out. The router's
    pipeline is both families' and then itself (it serves with less: `serving_models`)."""
    if ensemble == ROUTER:
        return [model for family in FAMILIES for model in pipeline(family)] + [ROUTER]
    steps = ("preprocess", "encoder", "embed", "generate")
    return [f"{ensemble}_{step}" for step in steps] + [ensemble]


def serving_models(ensemble: str) -> list[str]:
    """The models that must be READY for `ensemble` to answer: its pipeline, but for the router only
    itself and its primary family's, since routing keeps the primary's answer when the other
    family's call fails (its model not ready included)."""
    if ensemble == ROUTER:
        return pipeline(PRIMARY) + [ROUTER]
    return pipeline(ensemble)


def own_models(ensemble: str) -> list[str]:
    """The models an admin load or unload of `ensemble` touches: the router only itself (its
    families are models of their own)."""
    return [ROUTER] if ensemble == ROUTER else pipeline(ensemble)

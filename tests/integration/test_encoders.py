"""The encoder step on the real Triton server: cache hits skip the encoder model, requests batch in it,
text-only requests never reach it, and a new encoder version invalidates the cache."""

from __future__ import annotations

import re
import shutil
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import tritonclient.grpc as grpcclient

from tests.conftest import FAMILIES, encode, picture
from vlm_serving.ensemble_client import generate, user_message

pytestmark = pytest.mark.integration


def counts(triton, model: str, version: str = "") -> tuple[int, int]:
    """(requests, executions) the model's loaded versions (or this one) have run."""
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        stats = client.get_inference_statistics(model, version, as_json=True)["model_stats"]
    finally:
        client.close()
    return sum(int(s.get("inference_count", 0)) for s in stats), sum(int(s.get("execution_count", 0)) for s in stats)


def cache_metric(triton, name: str, encoder: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{triton.metrics_port}/metrics", timeout=5).read().decode()
    match = re.search(rf'^{name}{{model="{encoder}"}} (\S+)$', text, re.MULTILINE)
    assert match, f"{name} for {encoder} not on Triton's metrics endpoint"
    return float(match.group(1))


def ask(triton, family, image: bytes | None, **params):
    messages = user_message("What is in the picture?", 1 if image else 0)
    return generate(triton.grpc_url, family, messages, [image] if image else [], max_tokens=8, **params)


@pytest.mark.parametrize("family", FAMILIES)
def test_repeated_image_skips_the_encoder_and_answers_the_same(triton, family):
    encoder = f"{family}_encoder"
    image, other = encode(picture(150, 110, seed=901)), encode(picture(150, 110, seed=902))
    before, _ = counts(triton, encoder)
    hits_before = cache_metric(triton, "vlm_encoder_cache_hits_total", encoder)
    first = ask(triton, family, image)
    assert counts(triton, encoder)[0] == before + 1, "a new image goes to the encoder"
    second = ask(triton, family, image)
    assert counts(triton, encoder)[0] == before + 1, "the same image again is answered from the cache"
    assert second.token_ids == first.token_ids and second.image_tokens == first.image_tokens > 0
    assert cache_metric(triton, "vlm_encoder_cache_hits_total", encoder) == hits_before + 1
    assert cache_metric(triton, "vlm_encoder_cache_bytes", encoder) > 0
    ask(triton, family, other)
    assert counts(triton, encoder)[0] == before + 2, "a different image misses"
    text_only = ask(triton, family, None)
    assert text_only.image_tokens == 0 and counts(triton, encoder)[0] == before + 2, "text never reaches the encoder"
    assert counts(triton, f"{family}_embed")[0] >= 4


def test_concurrent_requests_share_encoder_batches(triton):
    encoder = "qwen2_5_vl_encoder"
    images = [encode(picture(120 + 4 * i, 90, seed=1000 + i)) for i in range(24)]
    requests_before, executions_before = counts(triton, encoder)
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda image: ask(triton, "qwen2_5_vl", image), images))
    assert all(r.image_tokens > 0 for r in results)
    requests, executions = counts(triton, encoder)
    assert requests - requests_before == 24
    assert executions - executions_before < 24, "some encoder executions ran several requests"


def test_a_new_encoder_version_invalidates_the_cache(triton):
    encoder, repository = "qwen2_5_vl_encoder", triton.repository
    image = encode(picture(130, 100, seed=950))
    first = ask(triton, "qwen2_5_vl", image)
    ask(triton, "qwen2_5_vl", image)
    version = repository / encoder / "2"
    shutil.copytree(repository / encoder / "1", version)  # same weights (the checkpoint parameter), new version
    time.sleep(1.1)  # Triton compares modification times to the second
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        client.load_model(encoder)
        assert client.is_model_ready(encoder, "2")
        again = ask(triton, "qwen2_5_vl", image)
        assert counts(triton, encoder, "2")[0] == 1, "entries of version 1 no longer hit"
        assert again.token_ids == first.token_ids, "same weights, same answer"
        ask(triton, "qwen2_5_vl", image)
        assert counts(triton, encoder, "2")[0] == 1, "version 2 caches again"
    finally:  # roll back to version 1: the cache starts over once more
        shutil.rmtree(version)
        time.sleep(1.1)
        client.load_model(encoder)
        client.close()
    assert ask(triton, "qwen2_5_vl", image).token_ids == first.token_ids
    assert counts(triton, encoder, "1")[0] == 1, "after the rollback the image is encoded anew"

"""Both ensembles on the real Triton server, compared with plain transformers."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.conftest import FAMILIES, encode, picture
from tests.reference import served_size, transformers_generate
from tests.unit.test_images import _png_header_only
from vlm_serving.ensemble_client import generate, user_message

pytestmark = pytest.mark.integration
EOS = {"qwen2_5_vl": "<|im_end|>", "pixtral": "</s>"}


def until_eos(family, checkpoint, tokens):
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(checkpoint).convert_tokens_to_ids(EOS[family])
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_equal_plain_transformers_generate(triton, checkpoints, family):
    pictures = [picture(180, 120, seed=11), picture(60, 90, seed=12)]
    messages = user_message("What do these two pictures show?", 2)
    result = generate(triton.grpc_url, family, messages, [encode(p) for p in pictures], max_tokens=16)
    expected = transformers_generate(family, checkpoints / family, messages, pictures, 16,
                                     served_size(family, checkpoints / family))
    assert result.token_ids == until_eos(family, checkpoints / family, expected)
    assert result.finish_reason in ("length", "stop") and result.completion_tokens >= len(result.token_ids)
    assert result.image_tokens > 0 and result.prompt_tokens > result.image_tokens
    assert result.confidence < 0 and len(result.deltas) == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_stream_joins_to_the_unary_answer(triton, family):
    images = [encode(picture(140, 100, seed=21), "JPEG")]
    messages = user_message("Describe the scene.", 1)
    unary = generate(triton.grpc_url, family, messages, images, max_tokens=24)
    streamed = generate(triton.grpc_url, family, messages, images, max_tokens=24, stream=True)
    assert len(streamed.deltas) > 1
    assert "".join(streamed.deltas) == unary.text and streamed.token_ids == unary.token_ids
    assert (streamed.finish_reason, streamed.completion_tokens, streamed.prompt_tokens) == (
        unary.finish_reason, unary.completion_tokens, unary.prompt_tokens
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_text_only_request(triton, checkpoints, family):
    messages = [{"role": "user", "content": "Say something without a picture."}]
    result = generate(triton.grpc_url, family, messages, [], max_tokens=10)
    assert result.image_tokens == 0
    assert result.token_ids == until_eos(family, checkpoints / family, transformers_generate(family, checkpoints / family, messages, [], 10))


def batch_sizes(url: str, model: str) -> dict[int, int]:
    stats = grpcclient.InferenceServerClient(url).get_inference_statistics(model, as_json=True)
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats["model_stats"][0].get("batch_stats", [])}


@pytest.mark.parametrize("family", FAMILIES)
def test_concurrent_requests_are_batched_and_answer_as_alone(triton, family):
    requests = [([encode(picture(64 + 8 * i, 64, seed=100 + i))], user_message(f"Picture {i}?", 1)) for i in range(16)]
    alone = [generate(triton.grpc_url, family, m, imgs, max_tokens=8).token_ids for imgs, m in requests[:4]]
    before = batch_sizes(triton.grpc_url, f"{family}_generate")
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda r: generate(triton.grpc_url, family, r[1], r[0], max_tokens=8), requests))
    after = batch_sizes(triton.grpc_url, f"{family}_generate")
    grown = {size: after.get(size, 0) - before.get(size, 0) for size in after}
    assert any(size > 1 and count > 0 for size, count in grown.items()), f"no batch > 1 formed: {grown}"
    assert [r.token_ids for r in together[:4]] == alone
    assert len({tuple(r.token_ids) for r in together}) > 8, "different pictures must give different answers"


@pytest.mark.parametrize("family", FAMILIES)
def test_a_bad_image_fails_only_its_own_request(triton, family):
    good = [([encode(picture(80, 80, seed=200 + i))], user_message("ok?", 1)) for i in range(6)]
    truncated = encode(picture(80, 80))[:300]
    jobs = good[:3] + [([truncated], user_message("bad", 1))] + good[3:]

    def call(job):
        try:
            return generate(triton.grpc_url, family, job[1], job[0], max_tokens=6)
        except InferenceServerException as exc:
            return exc

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(call, jobs))
    error = results.pop(3)
    assert isinstance(error, InferenceServerException)
    assert "image 0: truncated or corrupt PNG data" in error.message()
    assert all(not isinstance(r, Exception) and r.completion_tokens == 6 for r in results)


@pytest.mark.parametrize(
    "data,message",
    [
        (b"", "image 0: empty image data"),
        (b"GIF89a" + b"\x00" * 5, "image 0: cannot read the GIF header"),
        (b"<html>not an image</html>", "image 0: not a supported image file"),
        (_png_header_only(50000, 50000), "decompression-bomb guard"),
    ],
)
def test_bad_images_get_a_clear_error(triton, data, message):
    with pytest.raises(InferenceServerException, match=message):
        generate(triton.grpc_url, "qwen2_5_vl", user_message("?", 1), [data], max_tokens=4)


def test_bad_parameters_and_messages_are_refused_with_the_reason(triton):
    # The stream API carries Triton's error text but no status code (the gateway maps it).
    with pytest.raises(InferenceServerException, match="temperature=3 must be in \\[0, 2\\]"):
        generate(triton.grpc_url, "pixtral", user_message("hi", 0), [], temperature=3.0)
    with pytest.raises(InferenceServerException, match="hold 1 image part\\(s\\) but 0 image\\(s\\)"):
        generate(triton.grpc_url, "pixtral", user_message("hi", 1), [])


def test_sampling_with_a_seed_repeats_through_triton(triton):
    args = dict(max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, repetition_penalty=1.1)
    messages = user_message("Sample", 0)
    first = generate(triton.grpc_url, "qwen2_5_vl", messages, [], seed=42, **args)
    second = generate(triton.grpc_url, "qwen2_5_vl", messages, [], seed=42, **args)
    assert first.token_ids == second.token_ids


def test_stop_sequence_through_triton(triton):
    messages = user_message("Tell me more", 0)
    full = generate(triton.grpc_url, "pixtral", messages, [], max_tokens=24).text
    stop = next(full[i : i + 2] for i in range(3, len(full) - 2) if "\ufffd" not in full[i : i + 2])
    stopped = generate(triton.grpc_url, "pixtral", messages, [], max_tokens=24, stop=[stop], stream=True)
    assert stopped.text == full[: full.index(stop)] and stopped.finish_reason == "stop"


@pytest.mark.parametrize("family", FAMILIES)
def test_each_images_kind_and_processed_size_come_back_and_detail_is_checked(triton, family):
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = plt.figure(figsize=(6, 4), dpi=100)
    figure.add_subplot().bar(["a", "b", "c"], [3, 1, 2], color=["#4c72b0", "#dd8452", "#55a868"])
    chart = io.BytesIO()
    figure.savefig(chart, format="png")
    plt.close(figure)
    noise = encode(picture(320, 240, seed=3))  # random pixels: a photo's statistics
    result = generate(triton.grpc_url, family, user_message("Compare", 2), [chart.getvalue(), noise], max_tokens=2,
                      detail="high")
    assert [image["kind"] for image in result.images] == ["diagram", "photo"]
    # The tiny checkpoints clamp every preset to their own maximum (tests/unit/test_preprocess.py).
    for image in result.images:
        if family == "qwen2_5_vl":
            assert image["width"] * image["height"] <= 50176 and image["width"] % 28 == 0 == image["height"] % 28
        else:
            assert max(image["width"], image["height"]) == 128
    assert generate(triton.grpc_url, family, user_message("hi", 0), [], max_tokens=2).images == []
    with pytest.raises(InferenceServerException, match="detail 'ultra' is not one of auto, low, high"):
        generate(triton.grpc_url, family, user_message("?", 1), [noise], max_tokens=2, detail="ultra")

"""The exported ONNX encoders against the transformers towers, the packing of their inputs, the cache."""

import asyncio

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText

from tests.conftest import FAMILIES
from vlm_serving.encoding.encoder import EmbeddingCache, EncoderChanges, OnnxEncoder, embed_batch
from vlm_serving.encoding.encoder_export import export_fp16
from vlm_serving.encoding.encoder_inputs import PIXTRAL_SPEC, QWEN_SPEC, image_digest, pack, pixtral_image_inputs, qwen_image_inputs
from vlm_serving.encoding.encoder_inputs import segment_layout, unpack

# Patch grids (rows, cols) per call: single images of several sizes, then several different sizes at once.
QWEN_CALLS = [[(4, 4)], [(8, 16)], [(22, 14)], [(4, 6), (10, 8)], [(16, 16), (4, 4), (6, 10)]]
PIXTRAL_CALLS = [[(2, 2)], [(8, 8)], [(3, 7)], [(3, 5), (8, 6)], [(8, 8), (1, 1), (5, 2)]]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, checkpoints):
    model = AutoModelForImageTextToText.from_pretrained(checkpoints / request.param, local_files_only=True).eval()
    return request.param, checkpoints / request.param, model


def qwen_case(model, grids, seed=0):
    """Our per-image inputs and transformers' own (patches, grid_thw) for the same images."""
    config = model.config.vision_config
    rng = np.random.default_rng(seed)
    patches = [rng.standard_normal((h * w, 3 * 2 * 14 * 14), dtype=np.float32) for h, w in grids]
    images = [qwen_image_inputs(p, np.array([1, h, w]), config) for p, (h, w) in zip(patches, grids)]
    return images, np.concatenate(patches), np.array([[1, h, w] for h, w in grids])


def pixtral_case(grids, seed=0):
    """Our per-image inputs and transformers' padded pixel batch + image sizes for the same images."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros((len(grids), 3, 16 * max(h for h, _ in grids), 16 * max(w for _, w in grids)), dtype=np.float32)
    images = []
    for i, (h, w) in enumerate(grids):
        picture = rng.standard_normal((3, h * 16, w * 16), dtype=np.float32)
        pixels[i, :, : h * 16, : w * 16] = picture
        patches = picture.reshape(3, h, 16, w, 16).transpose(1, 3, 0, 2, 4).reshape(h * w, -1)
        images.append(pixtral_image_inputs(patches, h, w))
    return images, pixels, np.array([[h * 16, w * 16] for h, w in grids])


def transformers_embeddings(name, model, grids):
    with torch.inference_mode():
        if name == "qwen2_5_vl":
            images, patches, grid_thw = qwen_case(model, grids)
            output = model.model.visual(torch.from_numpy(patches), grid_thw=torch.from_numpy(grid_thw)).pooler_output
            return images, output.numpy()
        images, pixels, sizes = pixtral_case(grids)
        features = model.model.get_image_features(
            torch.from_numpy(pixels), vision_feature_layer=-1, vision_feature_select_strategy="full",
            image_sizes=torch.from_numpy(sizes),
        ).pooler_output
        return images, torch.cat(list(features)).numpy()


def test_fp32_export_equals_the_transformers_tower(family):
    name, checkpoint, model = family
    encoder = OnnxEncoder(name, checkpoint / "onnx", "fp32")
    for grids in QWEN_CALLS if name == "qwen2_5_vl" else PIXTRAL_CALLS:
        images, expected = transformers_embeddings(name, model, grids)
        ours = encoder.encode(images)
        rows = [h * w // (4 if name == "qwen2_5_vl" else 1) for h, w in grids]
        assert [len(o) for o in ours] == rows, "one embedding row per image token, split per image"
        difference = np.abs(np.concatenate(ours) - expected).max()
        assert difference <= 1e-4, f"{grids}: max abs difference {difference:.2e}"
        assert np.abs(expected).max() > 0.1, "the comparison must be of non-trivial outputs"


def test_int8_variant_stays_close_to_fp32(family):
    name, checkpoint, model = family
    grids = QWEN_CALLS[3] if name == "qwen2_5_vl" else PIXTRAL_CALLS[3]
    images, _ = transformers_embeddings(name, model, grids)
    fp32 = np.concatenate(OnnxEncoder(name, checkpoint / "onnx", "fp32").encode(images))
    int8 = np.concatenate(OnnxEncoder(name, checkpoint / "onnx", "int8").encode(images))
    assert not np.array_equal(int8, fp32), "int8 must be a different graph"
    cosine = (fp32 * int8).sum(-1) / (np.linalg.norm(fp32, axis=-1) * np.linalg.norm(int8, axis=-1))
    assert cosine.min() > 0.98


def test_fp16_variant_runs_with_fp32_inputs_and_outputs(family, tmp_path):
    name, checkpoint, model = family
    (tmp_path / "encoder.json").write_text((checkpoint / "onnx" / "encoder.json").read_text())
    export_fp16(checkpoint / "onnx" / "encoder.fp32.onnx", tmp_path / "encoder.fp16.onnx")
    grids = QWEN_CALLS[3] if name == "qwen2_5_vl" else PIXTRAL_CALLS[3]
    images, expected = transformers_embeddings(name, model, grids)
    ours = np.concatenate(OnnxEncoder(name, tmp_path, "fp16").encode(images))
    assert ours.dtype == np.float32
    assert np.abs(ours - expected).max() <= 0.05 * np.abs(expected).max()


def test_packed_indices_equal_transformers_for_several_images(checkpoints):
    """Per-image index tensors joined by `pack` equal transformers' computation over all images at once."""
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

    model = AutoModelForImageTextToText.from_pretrained(checkpoints / "qwen2_5_vl", local_files_only=True)
    config = model.config.vision_config
    grids = [(16, 16), (4, 4), (6, 10), (8, 8)]  # 8 = a multiple of the window: a padding-only window
    images, _, grid_thw = qwen_case(model, grids)
    packed = pack(images, QWEN_SPEC)
    grid_thw = torch.from_numpy(grid_thw)
    window_index, cu_window_seqlens = get_vision_window_index(grid_thw, 2, config.window_size, config.patch_size)
    assert np.array_equal(packed.tensors["window_index"], window_index.numpy())
    assert np.array_equal(packed.tensors["cu_window_seqlens"], cu_window_seqlens.numpy())
    assert np.array_equal(packed.tensors["cu_seqlens"], get_vision_cu_seqlens(grid_thw).numpy())
    assert np.array_equal(packed.tensors["position_ids"], get_vision_position_ids(grid_thw, 2).numpy())


@pytest.mark.parametrize("spec", [QWEN_SPEC, PIXTRAL_SPEC], ids=["qwen2_5_vl", "pixtral"])
def test_unpack_returns_each_image_as_it_was(spec, checkpoints):
    if spec is QWEN_SPEC:
        model = AutoModelForImageTextToText.from_pretrained(checkpoints / "qwen2_5_vl", local_files_only=True)
        images, _, _ = qwen_case(model, [(4, 6), (10, 8), (2, 2)])
    else:
        images, _, _ = pixtral_case([(3, 5), (8, 6), (1, 1)])
    back = unpack(pack(images, spec), spec)
    assert len(back) == len(images)
    for original, restored in zip(images, back):
        assert original.keys() == restored.keys()
        for key in original:
            assert np.array_equal(original[key], restored[key]) and original[key].dtype == restored[key].dtype, key
    empty = pack([], spec)
    assert empty.count == 0 and unpack(empty, spec) == []
    assert all(len(value) == (1 if entry.kind == "bounds" else 0) for entry, value in zip(spec, empty.tensors.values()))


def test_segment_layout_pads_segments_and_finds_every_row_again():
    bounds = np.array([0, 3, 4, 9, 11], dtype=np.int32)
    gather, scatter = segment_layout(bounds, rows=11)
    assert gather.tolist() == [[0, 1, 2, 11, 11], [3, 11, 11, 11, 11], [4, 5, 6, 7, 8], [9, 10, 11, 11, 11]]
    assert np.array_equal(gather.reshape(-1)[scatter], np.arange(11)), "scatter is gather's inverse"
    empty_gather, empty_scatter = segment_layout(np.zeros(1, dtype=np.int32), rows=0)
    assert empty_gather.shape == (0, 0) and empty_scatter.shape == (0,)


def test_image_digest_tells_images_apart():
    images, _, _ = pixtral_case([(3, 5), (3, 5), (5, 3)], seed=0)
    same, _, _ = pixtral_case([(3, 5)], seed=0)
    assert image_digest(images[0]) == image_digest(same[0])
    assert len({image_digest(image) for image in images}) == 3
    transposed = dict(images[0], position_ids=images[0]["position_ids"][:, ::-1].copy())
    assert image_digest(transposed) != image_digest(images[0]), "same pixels, other layout"


def test_cache_is_bounded_in_bytes_and_evicts_the_least_recently_used():
    cache = EmbeddingCache(max_bytes=3 * 400)
    rows = {key: np.full((10, 10), i, dtype=np.float32) for i, key in enumerate([b"a", b"b", b"c", b"d"])}  # 400 B each
    for key in (b"a", b"b", b"c"):
        cache.put("enc/1", key, rows[key])
    assert cache.get("enc/1", b"a") is not None  # a is now the most recent
    cache.put("enc/1", b"d", rows[b"d"])
    assert cache.get("enc/1", b"b") is None, "b was the least recently used"
    assert all(cache.get("enc/1", key) is not None for key in (b"a", b"c", b"d"))
    assert cache.bytes == 1200 and cache.stats.evictions == 1
    assert cache.get("enc/2", b"a") is None, "another encoder identity never hits"
    cache.put("enc/1", b"huge", np.zeros(1000, dtype=np.float32))
    assert cache.get("enc/1", b"huge") is None and cache.bytes == 1200, "larger than the whole cache: not kept"
    with pytest.raises(ValueError):
        cache.get("enc/1", b"a")[0, 0] = 1.0  # entries are shared: read-only
    cache.clear()
    assert cache.bytes == 0 and cache.get("enc/1", b"a") is None


def _images(*seeds):
    return [pixtral_case([(2, 3)], seed=seed)[0][0] for seed in seeds]


class FakeEncoder:
    """Records the calls; one row per patch, filled with the image's first pixel (so rows tell images apart)."""

    def __init__(self, identity="pixtral_encoder/1/fp32/1", fail_on=None):
        self.identity, self.fail_on, self.calls = identity, fail_on, []

    async def __call__(self, images):
        self.calls.append(len(images))
        await asyncio.sleep(0)
        if self.fail_on is not None and any(np.array_equal(image["pixel_values"], self.fail_on) for image in images):
            raise RuntimeError("encoder failed")
        return [np.full((len(i["pixel_values"]), 4), i["pixel_values"][0, 0], dtype=np.float32) for i in images], self.identity


def test_embed_batch_encodes_only_unseen_images_once():
    cache, encoder = EmbeddingCache(1 << 20), FakeEncoder()
    a, b, c = _images(1, 2, 3)
    first = asyncio.run(embed_batch([[a, b], [], [b, c]], cache, encoder.identity, encoder))
    assert encoder.calls == [2, 1], "b, shared by two requests, is encoded once"
    assert first[1].shape == (0, 0), "a text-only request needs no encoder"
    assert np.array_equal(first[0][6:], first[2][:6]), "both requests got b's rows"
    again = asyncio.run(embed_batch([[c, a]], cache, encoder.identity, encoder))
    assert encoder.calls == [2, 1], "all seen: no encoder call"
    assert np.array_equal(again[0], np.concatenate([first[2][6:], first[0][:6]]))
    assert (cache.stats.hits, cache.stats.misses) == (2, 4)


def test_embed_batch_failure_fails_only_the_requests_that_needed_it():
    a, b = _images(1, 2)
    cache, encoder = EmbeddingCache(1 << 20), FakeEncoder(fail_on=b["pixel_values"])
    answers = asyncio.run(embed_batch([[a], [b], []], cache, encoder.identity, encoder))
    assert isinstance(answers[1], RuntimeError) and "encoder failed" in str(answers[1])
    assert answers[0].shape == (6, 4) and answers[2].shape == (0, 0)


def test_encoder_changes_are_seen_by_another_process(tmp_path):
    encoder_side, embed_side = EncoderChanges(server_pid=1), EncoderChanges(server_pid=1)
    encoder_side.directory = embed_side.directory = tmp_path / "encoders"
    assert embed_side.current("qwen2_5_vl_encoder") == ""
    encoder_side.mark("qwen2_5_vl_encoder")
    loaded = embed_side.current("qwen2_5_vl_encoder")
    assert loaded and embed_side.current("qwen2_5_vl_encoder") == loaded
    encoder_side.mark("qwen2_5_vl_encoder")  # e.g. the old version unloading after a new one loaded
    assert embed_side.current("qwen2_5_vl_encoder") not in ("", loaded)
    assert embed_side.current("pixtral_encoder") == ""


def test_missing_variant_says_how_to_export(checkpoints, tmp_path):
    with pytest.raises(FileNotFoundError, match="vlm_serving.encoding.encoder_export"):
        OnnxEncoder("pixtral", tmp_path, "fp16")
    with pytest.raises(ValueError, match="use one of fp32, int8, fp16"):
        OnnxEncoder("pixtral", checkpoints / "pixtral" / "onnx", "bf16")


def test_calls_are_capped_in_patches_without_changing_results(family):
    name, checkpoint, model = family
    grids = QWEN_CALLS[4] if name == "qwen2_5_vl" else PIXTRAL_CALLS[4]
    images, expected = transformers_embeddings(name, model, grids)
    one_call = OnnxEncoder(name, checkpoint / "onnx", patches_per_call=10_000)
    capped = OnnxEncoder(name, checkpoint / "onnx", patches_per_call=40)  # below the largest image: it runs alone
    calls = []
    capped._run = lambda group, run=capped._run: calls.append(len(group)) or run(group)
    for ours, theirs in zip(capped.encode(images), one_call.encode(images)):
        assert np.abs(ours - theirs).max() <= 1e-5
    assert np.abs(np.concatenate(capped.encode(images)) - expected).max() <= 1e-4
    assert len(calls) > 1


def test_cached_embeddings_own_their_memory():
    # One image's embeddings are a slice of the whole encode call's output; a cached view would
    # keep the whole output alive while only the slice is counted.
    output = np.zeros((1000, 64), dtype=np.float32)
    cache = EmbeddingCache(max_bytes=1 << 20)
    cache.put("encoder", b"image", output[:10])
    cached = cache.get("encoder", b"image")
    assert not np.shares_memory(cached, output) and cached.base is None
    assert cache.bytes == cached.nbytes == 10 * 64 * 4


def test_one_requests_failing_images_do_not_fail_its_batch_mates():
    huge = {"pixel_values": np.zeros((9, 1), dtype=np.float32)}
    small = [{"pixel_values": np.full((2, 1), float(i), dtype=np.float32)} for i in range(3)]
    calls = []

    def encode(images):  # runs out of memory whenever the huge image is in the call
        calls.append(len(images))
        if any(image is huge for image in images):
            raise MemoryError("failed to allocate the attention scores")
        return [image["pixel_values"] * 2 for image in images]

    from vlm_serving.encoding.encoder import encode_each_request

    answers = encode_each_request(encode, [[small[0]], [huge, small[1]], [small[2]]])
    assert isinstance(answers[1], MemoryError)
    assert [a[0][0, 0] for a in (answers[0], answers[2])] == [0.0, 4.0]
    assert calls == [4, 1, 2, 1]  # the whole batch once, then each request alone
    assert isinstance(encode_each_request(encode, [[huge]])[0], MemoryError)


def test_export_works_from_a_checkpoint_with_bin_weights(checkpoints, tmp_path):
    import torch
    from transformers import AutoModelForImageTextToText

    from vlm_serving.encoding.encoder_export import export

    source = checkpoints / "pixtral"
    target = tmp_path / "pixtral"
    target.mkdir()
    for item in source.iterdir():
        if item.suffix != ".safetensors" and item.name not in ("onnx", "model.safetensors.index.json"):
            (target / item.name).symlink_to(item)
    model = AutoModelForImageTextToText.from_pretrained(source, local_files_only=True)
    torch.save(model.state_dict(), target / "pytorch_model.bin")
    out = export(target, variants=("fp32",))
    assert (out / "encoder.fp32.onnx").is_file()
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    (weightless / "config.json").symlink_to(source / "config.json")
    with pytest.raises(FileNotFoundError, match="no weights to export from"):
        export(weightless, variants=("fp32",))

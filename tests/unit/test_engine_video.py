"""Qwen2.5-VL video through the generation engine (issue 27).

A clip's `<|video_pad|>` tokens take the vision encoder's rows as an image's tokens do (one
IMAGE_EMBEDS, images and clips in prompt order), its 3-D positions follow its grid and its seconds
per temporal patch, and the prefix cache never lets two clips, or one clip at two rates, share
blocks. The references are plain transformers `generate` given the pixels (`pixel_values_videos`,
`video_grid_thw`, `second_per_grid_ts`, and `mm_token_type_ids` as the processor writes them); the
engine gets the rows the model's own vision tower gives for those pixels, as the encoder would.
"""

from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from tests.unit import fake_pb_utils
from tests.unit.test_engine import Caller, drive
from vlm_serving.deploy.render import PROFILES, render_family
from vlm_serving.generation.batch import BatchGenerator, GenerationRequest
from vlm_serving.generation.engine import EngineLimits, InflightEngine
from vlm_serving.generation.loading import load_model, load_tokenizer
from vlm_serving.generation.sampling import SamplingParams

PAD = {"image": "<|image_pad|>", "video": "<|video_pad|>"}


@dataclass(frozen=True)
class Media:
    """One image or clip as the vision tower takes it: its patches and grid (and a clip's rate)."""

    kind: str  # "image" or "video"
    pixels: torch.Tensor  # [t * h * w patches, channels * temporal patch * patch * patch]
    grid: tuple[int, int, int]
    seconds_per_patch: float = 0.0  # a clip's seconds per temporal patch (2 frames / sampling fps)

    def at_rate(self, seconds_per_patch: float) -> "Media":
        return replace(self, seconds_per_patch=seconds_per_patch)


def patches(seed: int, grid: tuple[int, int, int]) -> torch.Tensor:
    t, h, w = grid
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((t * h * w, 3 * 2 * 14 * 14), np.float32))


def clip(seed: int, grid=(2, 4, 6), seconds_per_patch: float = 1.0) -> Media:
    return Media("video", patches(seed, grid), grid, seconds_per_patch)


def still(seed: int, grid=(1, 4, 4)) -> Media:
    return Media("image", patches(seed, grid), grid)


class Qwen:
    """The tiny Qwen2.5-VL: the engine's generator, and a separate plain model for the references."""

    def __init__(self, checkpoint):
        self.tokenizer = load_tokenizer(checkpoint)
        self.model = load_model(checkpoint)
        self.generator = BatchGenerator("qwen2_5_vl", self.model, self.tokenizer)
        self.plain = AutoModelForImageTextToText.from_pretrained(checkpoint, local_files_only=True).eval()
        self.merge = self.model.config.vision_config.spatial_merge_size

    def tokens(self, item: Media) -> int:
        """The placeholder tokens of an image or clip: its patches merged merge x merge."""
        return int(np.prod(item.grid)) // self.merge**2

    def prompt_ids(self, media: list[Media], text: str) -> np.ndarray:
        """The chat template's prompt with each placeholder repeated once per token, as the processor does."""
        parts = [{"type": item.kind} for item in media] + [{"type": "text", "text": text}]
        rendered = self.tokenizer.apply_chat_template([{"role": "user", "content": parts}], tokenize=False,
                                                      add_generation_prompt=True)
        placeholders = iter(media)
        pieces = re.split("(" + "|".join(map(re.escape, PAD.values())) + ")", rendered)
        expanded = "".join(piece * self.tokens(next(placeholders)) if piece in PAD.values() else piece for piece in pieces)
        ids = np.asarray(self.tokenizer(expanded)["input_ids"], dtype=np.int64)
        pads = np.isin(ids, self.tokenizer.convert_tokens_to_ids(list(PAD.values())))
        assert pads.sum() == sum(map(self.tokens, media)), "each placeholder is one token"
        return ids

    def request(self, media: list[Media], text: str, max_tokens: int = 12) -> GenerationRequest:
        """What preprocessing and the encoder send the generation step for this prompt."""
        with torch.inference_mode():
            rows = [self.model.model.visual(item.pixels, grid_thw=torch.tensor([item.grid])).pooler_output
                    for item in media]
        images = [item for item in media if item.kind == "image"]
        clips = [item for item in media if item.kind == "video"]
        return GenerationRequest(
            self.prompt_ids(media, text), SamplingParams(max_tokens=max_tokens),
            image_embeds=torch.cat(rows).numpy() if rows else None,
            language_tensors={
                "image_grid_thw": np.array([item.grid for item in images], np.int64).reshape(-1, 3),
                "video_grid_thw": np.array([item.grid for item in clips], np.int64).reshape(-1, 3),
                "second_per_grid_ts": np.array([item.seconds_per_patch for item in clips], np.float32),
            },
        )

    def reference(self, media: list[Media], text: str, max_tokens: int = 12) -> list[int]:
        """Plain `generate`'s greedy tokens given the pixels, up to the end-of-sequence token."""
        ids = torch.from_numpy(self.prompt_ids(media, text))[None]
        token_types = torch.zeros_like(ids, dtype=torch.int32)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        for kind, value, pixels_name, grid_name in ((1, "image", "pixel_values", "image_grid_thw"),
                                                     (2, "video", "pixel_values_videos", "video_grid_thw")):
            token_types[ids == self.tokenizer.convert_tokens_to_ids(PAD[value])] = kind
            chosen = [item for item in media if item.kind == value]
            if chosen:
                inputs[pixels_name] = torch.cat([item.pixels for item in chosen])
                inputs[grid_name] = torch.tensor([item.grid for item in chosen])
        inputs["mm_token_type_ids"] = token_types
        clips = [item.seconds_per_patch for item in media if item.kind == "video"]
        if clips:
            inputs["second_per_grid_ts"] = torch.tensor(clips, dtype=torch.float32)
        with torch.inference_mode():
            out = self.plain.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
        tokens = out[0, ids.shape[1]:].tolist()
        ends = [i for i, token in enumerate(tokens) if token in self.generator.eos_ids]
        return tokens[: ends[0]] if ends else tokens


@pytest.fixture(scope="module")
def qwen(checkpoints):
    return Qwen(checkpoints / "qwen2_5_vl")


def run_alone(engine: InflightEngine, request: GenerationRequest) -> Caller:
    caller = Caller()
    drive(engine, {0: [(caller, request)]})
    return caller


def first_video_token(qwen: Qwen, request: GenerationRequest) -> int:
    return int(np.flatnonzero(request.input_ids == qwen.generator.video_token_id)[0])


def shared_prefix(one: np.ndarray, other: np.ndarray) -> int:
    length = min(len(one), len(other))
    differ = np.flatnonzero(one[:length] != other[:length])
    return int(differ[0]) if len(differ) else length


CASES = {
    "a clip alone": ([clip(1)], "What happens in the clip?"),
    "a clip then an image": ([clip(2), still(3)], "Compare them"),
    "an image then a clip": ([still(3), clip(2)], "Compare them"),
    "two clips at different rates": ([clip(4, seconds_per_patch=0.5), clip(5, grid=(3, 4, 4), seconds_per_patch=2.0)],
                                     "Which one is faster?"),
}


@pytest.mark.parametrize("prefix_caching", [True, False], ids=["prefix-caching", "no-prefix-caching"])
def test_greedy_tokens_with_clips_equal_plain_generate(qwen, prefix_caching):
    """Each case alone, then all of them again together in one running batch (from the cache where
    it is on); 16-token prefill chunks make a clip's positions span several steps."""
    references = {name: qwen.reference(media, text) for name, (media, text) in CASES.items()}
    assert len(set(map(tuple, references.values()))) == len(CASES), "different inputs must give different tokens"
    assert all(len(tokens) > 3 for tokens in references.values())
    engine = InflightEngine(qwen.generator, EngineLimits(prefix_caching=prefix_caching, block_tokens=4,
                                                         prefill_chunk_tokens=16))
    for name, (media, text) in CASES.items():
        assert run_alone(engine, qwen.request(media, text)).final.token_ids == references[name], name
    together = {name: Caller() for name in CASES}
    drive(engine, {step: [(together[name], qwen.request(*CASES[name]))] for step, name in enumerate(CASES)})
    for name, caller in together.items():
        assert caller.final.token_ids == references[name], name
        assert (caller.final.cached_tokens > 0) == prefix_caching


def test_the_static_scheduler_gives_plain_generates_tokens_for_clips(qwen):
    """`BatchGenerator.generate` (render --scheduler static): every case in one left-padded batch."""
    requests = [qwen.request(media, text) for media, text in CASES.values()]
    updates = {}
    qwen.generator.generate(requests, lambda index, update: updates.setdefault(index, []).append(update))
    for index, (name, (media, text)) in enumerate(CASES.items()):
        assert updates[index][-1].token_ids == qwen.reference(media, text), name


QUESTIONS = ("What happens in the clip?", "Who is there?")


def test_a_second_request_about_the_same_clip_starts_from_its_cached_blocks(qwen):
    engine = InflightEngine(qwen.generator, EngineLimits(block_tokens=4))
    media = [clip(1)]
    first_request, second_request = (qwen.request(media, question) for question in QUESTIONS)
    first, second = run_alone(engine, first_request), run_alone(engine, second_request)
    common = shared_prefix(first_request.input_ids, second_request.input_ids)
    last_video_token = int(np.flatnonzero(first_request.input_ids == qwen.generator.video_token_id)[-1])
    assert first.final.cached_tokens == 0
    assert common > last_video_token and second.final.cached_tokens == common // 4 * 4, "the clip's blocks shared"
    references = [qwen.reference(media, question) for question in QUESTIONS]
    assert [first.final.token_ids, second.final.token_ids] == references


@pytest.mark.parametrize("other", ["the same frames at another rate", "other frames of the same size"])
def test_a_clip_shares_no_blocks_with_another_of_the_same_tokens(qwen, other):
    """The prompts' token ids are equal; only the text before the clip may come from the cache."""
    one = clip(1)
    changed = one.at_rate(0.5) if other == "the same frames at another rate" else clip(6)
    text = "What happens in the clip?"
    engine = InflightEngine(qwen.generator, EngineLimits(block_tokens=4))
    requests = [qwen.request([media], text) for media in (one, changed)]
    assert (requests[0].input_ids == requests[1].input_ids).all()
    callers = [run_alone(engine, request) for request in requests]
    assert callers[1].final.cached_tokens == first_video_token(qwen, requests[1]) // 4 * 4
    references = [qwen.reference([media], text) for media in (one, changed)]
    assert references[0] != references[1], f"{other} must change the answer for this test to see sharing"
    assert [caller.final.token_ids for caller in callers] == references


def malformed(qwen: Qwen) -> list[tuple[str, GenerationRequest, str]]:
    """(what is wrong, a request with that fault and nothing else, what its error says) around a
    good request of an image (4 tokens) then a clip (2 x 4 x 6 patches: 12 tokens)."""
    good = qwen.request([still(3), clip(2)], "Compare them")
    tensors = good.language_tensors

    def with_tensors(**changed):
        return replace(good, language_tensors={**tensors, **changed})

    without = {name: value for name, value in tensors.items() if name not in ("video_grid_thw", "second_per_grid_ts")}
    return [
        ("one embedding row too few", replace(good, image_embeds=good.image_embeds[1:]),
         "the prompt holds 4 image token(s) and 12 video token(s) but 15 embedding row(s) came with it"),
        ("a clip's grid that makes more tokens than its run", with_tensors(video_grid_thw=np.array([[2, 4, 8]])),
         "VIDEO_GRID_THW[0] = [2, 4, 8] makes 16 video tokens but video 0 of the prompt has 12"),
        ("the clip's grid sent as the image's", with_tensors(image_grid_thw=np.array([[2, 4, 6]]),
                                                             video_grid_thw=np.array([[1, 4, 4]])),
         "IMAGE_GRID_THW[0] = [2, 4, 6] makes 12 image tokens but image 0 of the prompt has 4"),
        ("two grids for one clip", with_tensors(video_grid_thw=np.array([[2, 4, 6], [2, 4, 6]])),
         "VIDEO_GRID_THW describes 2 video(s) but the prompt holds 1 run(s) of video tokens"),
        ("no video tensors", replace(good, language_tensors=without),
         "VIDEO_GRID_THW describes 0 video(s) but the prompt holds 1 run(s) of video tokens"),
        ("a grid of odd patches", with_tensors(video_grid_thw=np.array([[2, 3, 8]])), "is not a grid of patches"),
        ("a grid of another shape", with_tensors(video_grid_thw=np.array([2, 4, 6])),
         "VIDEO_GRID_THW must be [videos, 3] integers, got int64 of shape [3]"),
        ("no seconds per temporal patch", with_tensors(second_per_grid_ts=np.zeros(0, np.float32)),
         "SECOND_PER_GRID_TS describes 0 video(s) but the prompt holds 1 run(s) of video tokens"),
        ("zero seconds per temporal patch", with_tensors(second_per_grid_ts=np.array([0.0], np.float32)),
         "SECOND_PER_GRID_TS[0] = 0.0 is not a positive number of seconds"),
        ("NaN seconds per temporal patch", with_tensors(second_per_grid_ts=np.array([np.nan], np.float32)),
         "SECOND_PER_GRID_TS[0] = nan is not a positive number of seconds"),
        ("seconds as integers", with_tensors(second_per_grid_ts=np.array([1], np.int64)),
         "SECOND_PER_GRID_TS must be [videos] floats, got int64 of shape [1]"),
    ]


def test_malformed_video_inputs_are_refused_at_submission_with_what_to_fix(qwen):
    engine = InflightEngine(qwen.generator)
    for what, request, message in malformed(qwen):
        with pytest.raises(ValueError, match=re.escape(message)):
            engine.submit(request, Caller().sink())
        with pytest.raises(ValueError, match=re.escape(message)):  # the static scheduler's check is the same
            qwen.generator.check_request(request)
    assert engine.idle, "nothing refused reached the engine"
    media, text = CASES["an image then a clip"]
    assert run_alone(engine, qwen.request(media, text)).final.token_ids == qwen.reference(media, text)


# ----- the Triton adapter -----


@pytest.fixture
def generate_model(checkpoints, tmp_path):
    """The generate model's adapter, initialized in-process (tests/unit/fake_pb_utils.py)."""
    with fake_pb_utils.installed():
        text = render_family("qwen2_5_vl", replace(PROFILES["cpu"], checkpoints_dir=checkpoints))["qwen2_5_vl_generate"]
        config = json_format.MessageToDict(text_format.Parse(text, model_config_pb2.ModelConfig()),
                                           preserving_proto_field_name=True)
        model = importlib.import_module("vlm_serving.backend.generate_model").TritonPythonModel()
        model.initialize({"model_config": json.dumps(config), "model_name": "qwen2_5_vl_generate",
                          "model_version": "1", "model_instance_name": "qwen2_5_vl_generate_0_0",
                          "model_instance_kind": "CPU", "model_instance_device_id": "0",
                          "model_repository": str(tmp_path / "qwen2_5_vl_generate")})
        try:
            yield model
        finally:
            model.finalize()


def test_the_generate_model_reads_the_video_tensors_and_does_without_them(qwen, generate_model):
    """VIDEO_GRID_THW and SECOND_PER_GRID_TS reach the engine beside IMAGE_GRID_THW; a request
    from a config rendered before video input (no such tensors) holds no clip and still runs."""
    request = qwen.request([still(3), clip(2, seconds_per_patch=0.5)], "Compare them")
    tensors = {"INPUT_IDS": request.input_ids[None], "IMAGE_EMBEDS": request.image_embeds[None],
               "MAX_TOKENS": np.array([[12]], np.int32)}
    tensors.update({name.upper(): value[None] for name, value in request.language_tensors.items()})
    read = generate_model._read(fake_pb_utils.ReceivedRequest(tensors))
    assert sorted(read.language_tensors) == ["image_grid_thw", "second_per_grid_ts", "video_grid_thw"]
    for name, value in request.language_tensors.items():
        np.testing.assert_array_equal(read.language_tensors[name], value)
    image_only = qwen.request([still(3)], "Describe it.")
    older = {"INPUT_IDS": image_only.input_ids[None], "IMAGE_EMBEDS": image_only.image_embeds[None],
             "IMAGE_GRID_THW": image_only.language_tensors["image_grid_thw"][None]}
    assert list(generate_model._read(fake_pb_utils.ReceivedRequest(older)).language_tensors) == ["image_grid_thw"]

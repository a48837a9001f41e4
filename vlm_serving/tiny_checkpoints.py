"""Build tiny random-weight checkpoints of the real architectures, fully offline.

    python -m vlm_serving.tiny_checkpoints build/models [--seed N] [--family qwen2_5_vl]

writes `build/models/qwen2_5_vl` (Qwen2_5_VLForConditionalGeneration) and `build/models/pixtral`
(LlavaForConditionalGeneration with a Pixtral vision tower and a Mistral text model), each with its
image processor, a byte-level BPE tokenizer trained here with `tokenizers`, and the family's chat
template. They load through the same `from_pretrained(path, local_files_only=True)` code as real
weights, so tests and the demo exercise the production path. Fixed seed: same files every run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

SEED = 1234

# Enough text for a few hundred merges; the output of a random model is gibberish either way.
_CORPUS = [
    "A photo of a cat sitting on a red chair next to the window.",
    "Describe the image in one sentence. What colour is the car?",
    "The quick brown fox jumps over the lazy dog; 0123456789.",
    "Vision language models answer questions about pictures, charts and documents.",
    "There are three apples, two bananas and one orange on the wooden table.",
    "Hello! How can I help you today? Please look at this picture carefully.",
] * 20

QWEN_SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
]
PIXTRAL_SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"]

# Qwen2-VL's chat template (as shipped with Qwen2.5-VL checkpoints).
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Pixtral's chat template ([INST] turns, one [IMG] placeholder per image).
PIXTRAL_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}{{- '[INST]' + system_message + '\\n\\n' }}"
    "{%- else %}{{- '[INST]' }}{%- endif %}"
    "{%- if message['content'] is not string %}{%- for chunk in message['content'] %}"
    "{%- if chunk['type'] == 'text' %}{{- chunk['text'] }}{%- elif chunk['type'] == 'image' %}{{- '[IMG]' }}"
    "{%- else %}{{- raise_exception('Unrecognized content type!') }}{%- endif %}{%- endfor %}"
    "{%- else %}{{- message['content'] }}{%- endif %}{{- '[/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- if message['content'] is not string %}{%- for chunk in message['content'] %}"
    "{{- chunk['text'] }}{%- endfor %}{%- else %}{{- message['content'] }}{%- endif %}{{- eos_token }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported after the system message') }}"
    "{%- endif %}{%- endfor %}"
)


# Both text models: 2 layers, 64 wide, 4 query heads of 16 over 2 key/value heads, untied embeddings.
TINY_TEXT_MODEL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)


def train_tokenizer(special_tokens: list[str], vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    return tokenizer


# Weight spread of the text model and of the vision encoder (tower + projector).
TEXT_STD = 0.35
VISION_STD = 0.15
VISION_PARAMETERS = ("visual.", "vision_tower.", "multi_modal_projector.")


def _spread_init(model: torch.nn.Module, seed: int) -> None:
    """Re-draw weights with a wide spread so that different inputs give different tokens.

    A default-initialized tiny model tends to emit one token forever, which would make
    token-equality tests pass for the wrong reason. The vision encoder gets a narrower spread:
    its outputs then stay in the single digits, as real encoders' do, where float32 rounding
    differences between runtimes stay near 1e-6 (at the text model's spread they reach 1e-3).
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() >= 2:
                std = VISION_STD if any(part in name for part in VISION_PARAMETERS) else TEXT_STD
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
            elif name.endswith("bias"):
                parameter.zero_()


def _save(out: Path, model_class, config, tokenizer, image_processor, seed: int) -> None:
    """Draw the weights, take the special tokens from the tokenizer, save all three parts."""
    torch.manual_seed(seed)
    model = model_class(config).eval()
    _spread_init(model, seed)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tokenizer, name) is not None:
            setattr(model.generation_config, name, getattr(tokenizer, name))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    image_processor.save_pretrained(out)
    # safetensors writes the weights owner-only (0600): a Triton running as another user (the
    # Kubernetes pods run it as uid 1000) must be able to read them, as it reads the rest.
    for weights in out.glob("*.safetensors"):
        weights.chmod(0o644)


def build_qwen2_5_vl(out: Path, seed: int = SEED) -> None:
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2TokenizerFast,
        Qwen2VLImageProcessorPil,
    )

    from tokenizers import Regex, normalizers, pre_tokenizers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    trained = train_tokenizer(QWEN_SPECIAL)
    # Saved with the normalizer and pre-tokenizer that transformers' Qwen2 tokenizer rebuilds around the
    # vocabulary when it loads, as released Qwen checkpoints ship them: the file alone (what
    # preprocessing reads, vlm_serving/preprocessing/prompt.py) then tokenizes as transformers does.
    trained.normalizer = normalizers.NFC()
    trained.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=trained,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        additional_special_tokens=QWEN_SPECIAL[1:],
    )
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(
            **TINY_TEXT_MODEL,
            vocab_size=len(tokenizer),
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
            bos_token_id=ids("<|endoftext|>"),
            eos_token_id=ids("<|im_end|>"),
            pad_token_id=ids("<|endoftext|>"),
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[1],
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"),
        tie_word_embeddings=False,
    )
    # Small bounds keep a tiny image at a few dozen tokens; real checkpoints bring their own.
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 64)
    _save(out, Qwen2_5_VLForConditionalGeneration, config, tokenizer, image_processor, seed)


# Image limits of the real checkpoints (Qwen2.5-VL-*-Instruct, pixtral-12b), for copies of the tiny
# ones that resize images as the real models do (benchmarks, resolution preset tests).
REAL_IMAGE_LIMITS = {
    "qwen2_5_vl": {"min_pixels": 3136, "max_pixels": 12845056, "size": {"shortest_edge": 3136, "longest_edge": 12845056}},
    "pixtral": {"size": {"longest_edge": 1024}},
}


def with_real_image_limits(checkpoint: Path, target: Path, family: str) -> Path:
    """A copy of `checkpoint` at `target` whose image processor has the real model's limits."""
    import json
    import shutil

    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(checkpoint, target)
    config = json.loads((target / "preprocessor_config.json").read_text())
    config.update(REAL_IMAGE_LIMITS[family])
    (target / "preprocessor_config.json").write_text(json.dumps(config))
    return target


def build_pixtral(out: Path, seed: int = SEED) -> None:
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        MistralConfig,
        PixtralImageProcessorPil,
        PixtralVisionConfig,
        PreTrainedTokenizerFast,
    )

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(PIXTRAL_SPECIAL),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=PIXTRAL_SPECIAL[4:],
    )
    tokenizer.chat_template = PIXTRAL_CHAT_TEMPLATE
    ids = tokenizer.convert_tokens_to_ids
    config = LlavaConfig(
        vision_config=PixtralVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            head_dim=16,
            image_size=128,
            patch_size=16,
        ),
        text_config=MistralConfig(
            **TINY_TEXT_MODEL,
            vocab_size=len(tokenizer),
            head_dim=16,
            bos_token_id=ids("<s>"),
            eos_token_id=ids("</s>"),
            pad_token_id=ids("<pad>"),
        ),
        image_token_index=ids("[IMG]"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        multimodal_projector_bias=True,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    image_processor = PixtralImageProcessorPil(size={"longest_edge": 128}, patch_size={"height": 16, "width": 16})
    _save(out, LlavaForConditionalGeneration, config, tokenizer, image_processor, seed)


def write_example_image(path: Path) -> None:
    """A small picture for the demo command (a sun over the sea)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (320, 240), (120, 180, 240))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 150, 320, 240), fill=(20, 70, 160))
    draw.ellipse((120, 50, 200, 130), fill=(250, 200, 30))
    image.save(path)


def write_example_chart(path: Path) -> None:
    """A bar chart for the demo of model auto, which sends diagrams to Pixtral."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = plt.figure(figsize=(6, 4), dpi=100)
    axes = figure.add_subplot()
    axes.bar(["Mon", "Tue", "Wed", "Thu", "Fri"], [12, 19, 7, 15, 22], color="#4c72b0")
    axes.set(title="Requests per day (thousands)", ylabel="requests")
    figure.savefig(path)
    plt.close(figure)


def write_example_clip(path: Path) -> None:
    """A 4-second clip for the video demo (the sun of the example picture rising, 8 fps, H.264 in MP4)."""
    import av
    from PIL import Image, ImageDraw

    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        for index in range(32):
            image = Image.new("RGB", (320, 240), (120, 180, 240))
            draw = ImageDraw.Draw(image)
            top = 140 - 3 * index
            draw.ellipse((120, top, 200, top + 80), fill=(250, 200, 30))
            draw.rectangle((0, 150, 320, 240), fill=(20, 70, 160))
            container.mux(stream.encode(av.VideoFrame.from_image(image)))
        container.mux(stream.encode())


BUILDERS = {"qwen2_5_vl": build_qwen2_5_vl, "pixtral": build_pixtral}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder to write one checkpoint folder per family into")
    parser.add_argument("--force", action="store_true", help="rebuild checkpoints that already exist")
    parser.add_argument("--seed", type=int, default=SEED, help="weight seed (another seed: same shapes, other answers)")
    parser.add_argument("--family", action="append", choices=sorted(BUILDERS), help="only these families")
    args = parser.parse_args(argv)
    for family in args.family or BUILDERS:
        build = BUILDERS[family]
        target = args.out_dir / family
        if (target / "config.json").is_file() and not args.force:
            print(f"{target}: exists (use --force to rebuild)")
            continue
        start = time.perf_counter()
        target.mkdir(parents=True, exist_ok=True)
        build(target, args.seed)
        print(f"{target}: built in {time.perf_counter() - start:.1f}s")
    write_example_image(args.out_dir / "example.png")
    write_example_chart(args.out_dir / "example_chart.png")
    write_example_clip(args.out_dir / "example.mp4")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A tiny checkpoint's served path without Triton (preprocess -> ONNX encoder -> generator), for the
generation tests of both schedulers."""

import json

import numpy as np

from tests.conftest import encode
from vlm_serving.encoding.encoder import OnnxEncoder
from vlm_serving.generation.batch import BatchGenerator, GenerationRequest
from vlm_serving.generation.loading import load_model, load_tokenizer
from vlm_serving.generation.sampling import SamplingParams
from vlm_serving.preprocessing.preprocess import load_preprocessor


# Prompts whose greedy answers end with the end-of-sequence token within 40 tokens.
ENDING_PROMPTS = {"qwen2_5_vl": "Say it", "pixtral": "Why?"}


def joined_text(logprobs: list[dict]) -> str:
    """The text of log-probability entries' bytes, joined."""
    return b"".join(bytes(entry["bytes"]) for entry in logprobs).decode("utf-8", errors="replace")


class Family:
    def __init__(self, name, checkpoint):
        self.name, self.checkpoint = name, checkpoint
        self.preprocessor = load_preprocessor(name, checkpoint)
        self.model = load_model(checkpoint)
        self.generator = BatchGenerator(name, self.model, load_tokenizer(checkpoint))
        self.encoder = OnnxEncoder(name, checkpoint / "onnx")  # fp32, as served by default
        self.eos = self.generator.eos_ids

    def request(self, messages, pictures, **params) -> GenerationRequest:
        """Preprocess -> ONNX encoder -> a generation request: the served path without Triton."""
        pre = self.preprocessor([encode(p) for p in pictures], json.dumps(messages))
        embeddings = self.encoder.encode(pre.images)
        return GenerationRequest(
            pre.input_ids, SamplingParams(**params),
            image_embeds=np.concatenate(embeddings) if embeddings else None,
            language_tensors=pre.language_tensors, image_tokens=pre.image_tokens,
        )

    def run(self, requests, is_cancelled=lambda index: False):
        updates = {}
        self.generator.generate(requests, lambda i, u: updates.setdefault(i, []).append(u), is_cancelled)
        return [updates[i] for i in range(len(requests))]

    def until_eos(self, tokens):
        for i, token in enumerate(tokens):
            if token in self.eos:
                return tokens[:i]
        return tokens


def ask(text, images=0):
    return [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}]

"""Ask a served model about images, straight through Triton (no gateway).

    python -m vlm_serving.ask --model qwen2_5_vl --image build/models/example.png "What is this?" --stream
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tritonclient.utils import InferenceServerException

from vlm_serving.ensemble_client import generate, user_message


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("prompt")
    parser.add_argument("--model", default="qwen2_5_vl", help="ensemble name: qwen2_5_vl or pixtral")
    parser.add_argument("--image", action="append", default=[], type=Path, help="image file (repeatable)")
    parser.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC address")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stream", action="store_true", help="print text as it is generated")
    args = parser.parse_args(argv)
    images = [path.read_bytes() for path in args.image]
    printer = (lambda delta: print(delta, end="", flush=True)) if args.stream else None
    try:
        result = generate(
            args.url,
            args.model,
            user_message(args.prompt, len(images)),
            images,
            on_delta=printer,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            seed=args.seed,
            stream=args.stream,
        )
    except InferenceServerException as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("" if args.stream else result.text)
    print(
        f"[finish_reason={result.finish_reason} prompt_tokens={result.prompt_tokens} "
        f"completion_tokens={result.completion_tokens} image_tokens={result.image_tokens} "
        f"confidence={result.confidence:.3f}]",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""vlm: the command-line client.

    VLM_API_KEY=dev-local-key vlm generate --model qwen2.5-vl --image photo.jpg "What is this?" --stream
    VLM_API_KEY=dev-local-key vlm generate --model qwen2.5-vl --video clip.mp4 --fps 1 "What happens?"
    VLM_API_KEY=dev-local-key vlm models
    VLM_API_KEY=dev-admin-key vlm load qwen2.5-vl     # put new versions/configs live (admin key)
    VLM_API_KEY=dev-admin-key vlm backends            # the Triton servers behind the gateway
    VLM_ADDRESS=gateway.internal:50051 vlm models     # another gateway (or --address)
    vlm keys --file keys.jsonl add ci-bot --requests-per-second 5 --max-concurrent 4   # prints the key once
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Sequence

import grpc
from vlm.v1 import vlm_pb2

from vlm_client.client import (DEFAULT_ADDRESS, DETAILS, TASKS, GatewayUnreachable, VLMClient, response_format,
                               tls_credentials, to_dict)
from vlm_client.images import stored_orientation, upright_box
from vlm_client.videos import to_video

# What vlm_serving.preprocessing.video.SUPPORTED says; not imported, as PyAV would load at every start.
VIDEO_KINDS = "MP4 (H.264), WebM (VP8, VP9), animated GIF"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlm", description="Call the vision-language model service.",
                                     epilog="Exit codes: 0 done, 1 failed (the error on stderr), 2 some batch "
                                            "items failed, 130 interrupted (Ctrl-C).")
    parser.add_argument("--address", help=f"gateway host:port (default: $VLM_ADDRESS, else {DEFAULT_ADDRESS})")
    parser.add_argument("--api-key", help="API key (default: $VLM_API_KEY)")
    parser.add_argument("--ca-file", help="TLS: the authority that signed the gateway's certificate, PEM "
                                          "(default: $VLM_CA_FILE; plain text unless this or --cert-file is set)")
    parser.add_argument("--cert-file", help="mutual TLS: this client's certificate, PEM (default: $VLM_CERT_FILE)")
    parser.add_argument("--key-file", help="mutual TLS: the client certificate's private key (default: $VLM_KEY_FILE)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="deadline in seconds for the whole call, retries included (default: %(default)g)")
    parser.add_argument("--connect-timeout", type=float, default=5.0,
                        help="seconds to wait for a connection to the gateway before failing, within the "
                             "deadline (default: %(default)g)")
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="ask about images and videos")
    generate.add_argument("prompt")
    generate.add_argument("--model", required=True, help="qwen2.5-vl, pixtral, or auto: Pixtral for diagrams, "
                          "else Qwen2.5-VL with a fallback to Pixtral when it is unsure (see `vlm models`)")
    generate.add_argument("--confidence-threshold", type=float,
                          help="model auto: the confidence (mean log-probability per token, -100 to 0) below "
                               "which Pixtral answers again (default: the server's, ln 0.85 = -0.16)")
    generate.add_argument("--no-fallback", action="store_true", help="model auto: keep Qwen2.5-VL's answer, "
                          "streamed at once")
    generate.add_argument("--image", action="append", default=[], help="image path or http(s) URL (repeatable)")
    generate.add_argument("--video", action="append", default=[], help=f"video path or http(s) URL: {VIDEO_KINDS}; "
                          "at most 4, after the images (repeatable)")
    generate.add_argument("--fps", type=float, help="frames each --video is sampled at per second, greater than 0 "
                          "and at most 30 (default: the service's, 2)")
    generate.add_argument("--max-frames", type=int, help="the most frames sampled of each --video, 2 to 256; "
                          "where --fps would take more, they are spread over the whole clip (default: the "
                          "service's, 32)")
    generate.add_argument("--stream", action="store_true", help="print text as it is generated")
    generate.add_argument("--max-tokens", type=int, help="tokens to generate: at least 1, at most the model's "
                          "max_tokens, and with the prompt and image tokens within its context_tokens (both in "
                          "`vlm models`) (default: the deployment's, else until the answer or the context ends)")
    generate.add_argument("--temperature", type=float, help="0 to 2; 0 = greedy (default: the model's, see `vlm models`)")
    generate.add_argument("--top-p", type=float, help="in (0, 1] (default: the model's)")
    generate.add_argument("--top-k", type=int, help="0 to 1000; 0 = off (default: the model's)")
    generate.add_argument("--repetition-penalty", type=float, help="in (0, 2]; 1 = off (default: the model's)")
    generate.add_argument("--seed", type=int, help="the same seed repeats the same sample (default: a fresh one)")
    generate.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable, up to 8)")
    generate.add_argument("--detail", choices=DETAILS,
                          help="image detail: auto sizes each image by its kind (photo, document, diagram), "
                               "low and high force the smallest and largest size (default: the model's)")
    generate.add_argument("--task", choices=TASKS,
                          help="ask for a task's typed result: grounding (boxes of the objects the prompt names), "
                               "ocr (text lines with boxes), document (Markdown), chart (a table), caption, vqa "
                               "(with a video: caption and vqa only)")
    generate.add_argument("--json", action="store_true",
                          help="print the whole answer as JSON, every field included (machine output; with "
                               "--stream: each message as it comes, one JSON object a line)")
    generate.add_argument("--tool", action="append", default=[], metavar="FILE",
                          help='a function the model may call: a JSON file {"name", "description", "parameters": '
                               "a JSON Schema} (repeatable)")
    generate.add_argument("--tool-choice", help="auto (default), none, required, or a tool's name")
    shape = generate.add_mutually_exclusive_group()
    shape.add_argument("--json-schema", metavar="FILE", help="the answer is JSON valid under this JSON Schema file")
    shape.add_argument("--json-object", action="store_true", help="the answer is a JSON object")
    shape.add_argument("--regex", help="the answer matches this regular expression as a whole")
    shape.add_argument("--choice", action="append", help="the answer is exactly one of these (repeatable)")
    batch = commands.add_parser(
        "batch", help="run a folder of images and videos or a JSONL manifest, results as JSONL (resumable)",
        description="One result line per item in --output. Rerunning the same command goes on where it "
                    "stopped: the items answered are skipped, those that failed run again (unless "
                    "--no-retry-failed). A manifest line that is not a JSON object with an id, or an id used "
                    "twice (ids compare as text: 1 and \"1\" are one id), stops the job before anything runs; "
                    "any other bad line (an unknown field, a value of the wrong type) is that item's error line.")
    batch.add_argument("source", help="a folder (its images and .mp4/.webm videos, recursively: one item each; a "
                       '.gif is an image there) or a .jsonl manifest: one {"id", "images": [paths or URLs] (or '
                       '"image": one), "videos": [paths or URLs] (or "video": one), "fps", "max_frames", "prompt", '
                       '"model", "task", parameters} per line')
    batch.add_argument("--output", required=True, help="JSONL results, one line per item (rewritten whole, "
                       "never cut, when a rerun drops a line)")
    batch.add_argument("--retry-failed", action=argparse.BooleanOptionalAction, default=True,
                       help="whether a rerun runs the items whose line is an error again (default: it does)")
    batch.add_argument("--model", help="the model for every item (a manifest line may name its own)")
    batch.add_argument("--prompt", default="", help="the prompt for every item (a manifest line may give its own)")
    batch.add_argument("--task", choices=TASKS)
    batch.add_argument("--max-tokens", type=int)
    batch.add_argument("--temperature", type=float)
    batch.add_argument("--fps", type=float, help="frames each video is sampled at per second (default: a manifest "
                       "line's, else the service's, 2)")
    batch.add_argument("--max-frames", type=int, help="the most frames sampled of each video (default: a manifest "
                       "line's, else the service's, 32)")
    batch.add_argument("--concurrency", type=int, default=8, help="requests in flight at once (default: %(default)s)")
    batch.add_argument("--no-progress", action="store_true", help="no progress bar")
    commands.add_parser("models", help="list served models", description="One line per model: its versions, "
                        "context_tokens (prompt, images and answer together), max_tokens (the most one request "
                        "may ask for), and the sampling defaults a request gets for what it leaves unset "
                        "('-': the models auto routes to differ, or not known)")
    commands.add_parser("backends", help="list the inference servers behind the gateway and their state (admin key)")
    for name, text in (("load", "load or reload a model from the repository (admin key)"),
                       ("unload", "unload a model (admin key)")):
        commands.add_parser(name, help=text).add_argument("model")
    keys = commands.add_parser("keys", help="create and list the gateway's named API keys (its VLM_API_KEYS_FILE)",
                               description="Works on the key file itself, not through the gateway: the gateway "
                                           "reloads the file when it changes. Revoke a key by deleting its line.")
    keys.add_argument("--file", help="the key file (default: $VLM_API_KEYS_FILE)")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    add = key_commands.add_parser("add", help="create a key: prints it once, appends its hashed entry to the file")
    add.add_argument("name", help="the key's name in logs and metrics (letters, digits, '.', '_', '-'); a rotation's "
                     "new key takes the old one's name, and its limits unless limits are given")
    add.add_argument("--scope", choices=("user", "admin"), default="user", help="admin: may also load and unload "
                     "models (default: %(default)s)")
    add.add_argument("--requests-per-second", type=float, help="sustained request rate (default: unlimited)")
    add.add_argument("--burst", type=int, help="requests at once beyond the rate (default: one second's worth)")
    add.add_argument("--max-concurrent", type=int, help="requests in flight at once (default: unlimited)")
    add.add_argument("--tokens-per-minute", type=int, help="generated tokens per minute (default: unlimited)")
    key_commands.add_parser("list", help="the entries: names, scopes, limits (never keys)")
    args = parser.parse_args(argv)
    if args.command == "keys":  # the key file, no gateway call
        return _keys(args)
    try:
        tls_credentials(args.ca_file, args.cert_file, args.key_file)  # a bad file is named before any call
    except ValueError as error:
        parser.error(str(error))
    if args.command == "batch":
        return _batch(args)
    with VLMClient(args.address, api_key=args.api_key, timeout=args.timeout, connect_timeout=args.connect_timeout,
                   ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file) as client:
        try:
            return _run(client, args)
        except KeyboardInterrupt:  # the call is cancelled as the client closes
            print("\ninterrupted", file=sys.stderr)
            return 130
        except grpc.RpcError as error:
            print(f"error: {error.code().name}: {error.details()}{hint(error, client.address)}", file=sys.stderr)
        except IsADirectoryError as error:
            print(f"error: {error.filename} is a directory; {what_takes(args, error.filename)}", file=sys.stderr)
        except FileNotFoundError as error:
            print(f"error: no such file: {error.filename} ({what_takes(args, error.filename)})", file=sys.stderr)
        except (OSError, ValueError) as error:  # ValueError: a file that is not a video (vlm_client.videos)
            print(f"error: {error}", file=sys.stderr)
    return 1


def _keys(args) -> int:
    """`vlm keys add` / `vlm keys list` on the key file (the gateway's format: gateway/keys.py)."""
    import os

    from gateway import keys

    path = args.file or os.environ.get("VLM_API_KEYS_FILE")
    if not path:
        print("error: name the key file: --file PATH or VLM_API_KEYS_FILE", file=sys.stderr)
        return 1
    try:
        if args.keys_command == "list":
            for entry in keys.load_key_file(path) if os.path.exists(path) else []:
                limits = " ".join(f"{name}={getattr(entry.limits, name):g}" for name in keys.LIMITS
                                  if getattr(entry.limits, name) is not None)
                print(f"{entry.name}\tscope={entry.scope}\tid={entry.key_id}\t{limits or 'unlimited'}")
            return 0
        # Never append to a file the gateway would refuse.
        entries = keys.load_key_file(path) if os.path.exists(path) else []
        key_id, key = keys.new_key()
        limits = keys.Limits(args.requests_per_second, args.burst, args.max_concurrent, args.tokens_per_minute)
        same_name = [entry for entry in entries if entry.name == args.name]
        if same_name and limits == keys.Limits():  # a rotation: the new key keeps the name's limits
            limits = same_name[-1].limits
        line = keys.entry_line(keys.KeyEntry(args.name, args.scope, limits, key_id, keys.hash_key(key)))
        keys.parse_entry(line, "the new entry")  # the checks the gateway makes, before the file is touched
        with open(path, "a", encoding="utf-8") as file:
            os.chmod(path, 0o600)
            file.write(line + "\n")
    except keys.KeyFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(key)
    print(f"key {args.name!r} ({args.scope}) added to {path}; it is shown only now", file=sys.stderr)
    return 0


def what_takes(args, filename: str) -> str:
    """What the option that named `filename` takes."""
    if filename in getattr(args, "video", ()):
        return f"--video takes a video file ({VIDEO_KINDS}) or an http(s) URL"
    return "--image takes an image file or an http(s) URL"


def sampling_problem(args) -> str | None:
    """Why --fps or --max-frames cannot be sent as given (0 would mean the service's default, silently)."""
    for option, value in (("--fps", args.fps), ("--max-frames", args.max_frames)):
        if value is not None and not value > 0:
            return f"{option} must be greater than 0 (leave it out for the service's default)"
    return None


def _run(client: VLMClient, args) -> int:
    if args.command == "backends":
        for backend in client.list_backends():
            state = "retired" if backend.retired else "healthy" if backend.healthy else "ejected"
            print(f"{backend.address}\t{state}\tin_flight={backend.outstanding_requests}\t"
                  f"ready={','.join(backend.ready_models) or '-'}"
                  + (f"\tlast_error={backend.last_error}" if backend.last_error else ""))
        return 0
    if args.command in ("models", "load", "unload"):
        if args.command == "load":
            reply = client.load_model(args.model)
            print(f"loaded in {reply.load_seconds:.1f}s on " + ", ".join(b.address for b in reply.backends),
                  file=sys.stderr)
            models = [reply.model]
        elif args.command == "unload":
            reply = client.unload_model(args.model)
            print("unloaded on " + ", ".join(b.address for b in reply.backends), file=sys.stderr)
            models = [reply.model]
        else:
            models = client.list_models()
        for model in models:
            versions = ", ".join(f"{v.version}:{v.state}" + (f" ({v.reason})" if v.reason else "")
                                 for v in model.versions) or "none loaded"
            defaults = ",".join(f"{name}:{getattr(model.defaults, name):g}" if model.defaults.HasField(name)
                                else f"{name}:-" for name in ("temperature", "top_p", "top_k", "repetition_penalty"))
            print(f"{model.name}\tfamily={model.family}\tready={model.ready}\t"
                  f"quantization={model.quantization}\tversions={versions}\t"
                  f"context_tokens={model.context_tokens}\tmax_tokens={model.max_tokens}\tdefaults={defaults}")
        return 0
    problem = sampling_problem(args)
    if (args.fps is not None or args.max_frames is not None) and not args.video:
        problem = "--fps and --max-frames sample the --video clips; give a --video"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    videos = [to_video(video, args.fps or 0.0, args.max_frames or 0) for video in args.video]
    config = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                  top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop,
                  detail=args.detail)
    config = {name: value for name, value in config.items() if value is not None}  # unset: the model's
    if args.json_schema or args.json_object or args.regex is not None or args.choice:
        schema = None
        if args.json_schema:
            with open(args.json_schema, encoding="utf-8") as file:
                schema = file.read()
        config["response_format"] = response_format(json_schema=schema, json_object=args.json_object,
                                                    regex=args.regex, choices=args.choice)
    routing = {"confidence_threshold": args.confidence_threshold, "disable_fallback": args.no_fallback or None}
    if any(value is not None for value in routing.values()):
        config["routing"] = {name: value for name, value in routing.items() if value is not None}
    if args.task:
        config["task"] = args.task
    if args.tool:
        config["tools"] = []
        for path in args.tool:
            with open(path, encoding="utf-8") as file:
                config["tools"].append(json.load(file))
    if args.tool_choice:
        config["tool_choice"] = args.tool_choice
    if args.stream:
        last = None
        for message in client.stream(args.model, args.prompt, args.image, videos=videos, **config):
            if args.json:
                print(json.dumps(to_dict(message), ensure_ascii=False), flush=True)
            else:
                print(message.text, end="", flush=True)
            last = message
        if not args.json:
            print()
    else:
        last = client.generate(args.model, args.prompt, args.image, videos=videos, **config)
        if args.json:
            print(json.dumps(to_dict(last), ensure_ascii=False, indent=2))
        else:
            print(last.text)
    if not args.json:
        if last.WhichOneof("result") or last.result_error:
            print(describe_result(last, args.image))
        for tool_call in last.tool_calls:
            print(f"--- tool call\n{tool_call.name}({tool_call.arguments})")
    images = " ".join(f"{vlm_pb2.ImageKind.Name(image.kind).removeprefix('IMAGE_KIND_').lower()}@{image.width}x{image.height}"
                      for image in last.route.images)
    route = ""
    if last.route.reason not in (vlm_pb2.ROUTE_REASON_UNSPECIFIED, vlm_pb2.ROUTE_REASON_REQUESTED):
        reason = vlm_pb2.RouteReason.Name(last.route.reason).removeprefix("ROUTE_REASON_").lower()
        # An attempt with an error gave no answer (model auto kept another): its confidence means nothing.
        route = f" route={reason}:" + ">".join(
            f"{a.model}(failed: {textwrap.shorten(a.error, 60, placeholder='…')})" if a.error
            else f"{a.model}({a.confidence:.2f})" for a in last.route.attempts)
    print(f"[model={last.model} version={last.model_version} finish_reason={vlm_pb2.FinishReason.Name(last.finish_reason)} "
          f"prompt_tokens={last.usage.prompt_tokens} completion_tokens={last.usage.completion_tokens} "
          f"image_tokens={last.usage.image_tokens} cached_tokens={last.usage.cached_tokens} confidence={last.confidence:.3f}"
          + (f" images={images}" if images else "") + route + "]", file=sys.stderr)
    return 0


def _batch(args) -> int:
    """Exit 0 when every item succeeded, 2 when some failed (their lines say why), 1 when none ran."""
    import asyncio
    from pathlib import Path

    from vlm_client.batch import ManifestError, OutputError, folder_items, manifest_items, run_batch
    from vlm_client.client import AsyncVLMClient

    source = Path(args.source)
    params = {name: value for name, value in (("max_tokens", args.max_tokens), ("temperature", args.temperature))
              if value is not None}
    problem = sampling_problem(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    video_options = {name: value for name, value in (("fps", args.fps), ("max_frames", args.max_frames))
                     if value is not None}
    try:
        if source.is_dir():
            if not args.model:
                print("error: --model is needed for a folder", file=sys.stderr)
                return 1
            items = folder_items(source, args.prompt, args.model, args.task, params, video_options)
        elif source.is_file():
            items = manifest_items(source, args.prompt, args.model, args.task, params, video_options)
        else:
            print(f"error: no such folder or manifest: {source}", file=sys.stderr)
            return 1
    except ManifestError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1

    async def go():
        async with AsyncVLMClient(args.address, api_key=args.api_key, timeout=args.timeout,
                                  connect_timeout=args.connect_timeout, ca_file=args.ca_file,
                                  cert_file=args.cert_file, key_file=args.key_file) as client:
            return await run_batch(client, items, Path(args.output), args.concurrency,
                                   retry_failed=args.retry_failed, progress=not args.no_progress)

    try:
        summary = asyncio.run(go())
    except KeyboardInterrupt:
        print(f"interrupted: {args.output} holds every finished item; rerun the same command to go on", file=sys.stderr)
        return 130
    except GatewayUnreachable as error:
        print(f"error: {error.code().name}: {error.details()}; the job stopped, rerun the same command to go on"
              f"{hint(error, error.address)}", file=sys.stderr)
        return 1
    except OutputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(summary.line(), file=sys.stderr)
    return 2 if summary.failed else 0


def describe_result(answer, images: Sequence = ()) -> str:
    """A task's typed result, readably. Boxes are in pixels of each image file as stored (the API's
    frame); for an image of `images` (what was sent, in order) stored turned by its EXIF orientation,
    each box is also given on the upright picture that viewers show."""
    kind = answer.WhichOneof("result")
    if kind is None:
        return f"[no result: {answer.result_error}]"
    result = getattr(answer, kind)
    turned = {}  # image index: (stored size, orientation) of the images stored turned
    if kind in ("detections", "text_lines"):
        found = [stored_orientation(source) for source in images]
        turned = {index: geometry for index, geometry in enumerate(found) if geometry and geometry[1] != 1}

    def box(b, image_index: int) -> str:
        stored = f"[{b.x_min:.0f}, {b.y_min:.0f}, {b.x_max:.0f}, {b.y_max:.0f}]"
        if image_index not in turned:
            return stored
        return stored + " upright [{:.0f}, {:.0f}, {:.0f}, {:.0f}]".format(*upright_box(b, *turned[image_index]))

    frame = "box x_min y_min x_max y_max in pixels of the file as stored"
    if kind == "detections":
        lines = [f"{d.label}\t{box(d.box, d.image_index)}\timage {d.image_index}" for d in result.detections]
        if result.boxes_outside:
            lines.append(f"({result.boxes_outside} box(es) outside the image left out)")
        return "\n".join([f"--- detections (label, {frame}, image)", *lines])
    if kind == "text_lines":
        lines = [f"{line.text}\t{box(line.box, line.image_index) if line.HasField('box') else '-'}"
                 f"\timage {line.image_index}" for line in result.lines]
        if result.boxes_outside:
            lines.append(f"({result.boxes_outside} box(es) outside the image: their lines show none)")
        return "\n".join([f"--- text lines (text, {frame}, image)", *lines])
    if kind == "table":
        rows = [list(result.header)] + [list(row.cells) for row in result.rows]
        widths = [max(len(row[i]) if i < len(row) else 0 for row in rows) for i in range(len(result.header))]
        return "\n".join(["--- table"] + ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows])
    if kind == "document":
        return "--- document (Markdown)\n" + result.markdown
    return "--- caption\n" + result.text


def hint(error: grpc.RpcError, address: str) -> str:
    """What a CLI user can do about the error (from the gateway at `address`), where the status
    alone does not say."""
    code = error.code()
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return "\n  set VLM_API_KEY or pass --api-key (`make run` accepts dev-local-key)"
    if isinstance(error, GatewayUnreachable):
        return (f"\n  no gateway answered at {address}; is it running? `make up` starts it "
                "(another address: --address or $VLM_ADDRESS)")
    if code == grpc.StatusCode.INVALID_ARGUMENT and "allowlist" in (error.details() or ""):
        return "\n  pass a local image path instead, or add the host to the gateway's VLM_IMAGE_URL_ALLOWLIST"
    return ""


if __name__ == "__main__":
    sys.exit(main())

import asyncio
import threading
import time
from concurrent import futures

import grpc
import pytest
from PIL import Image
from vlm.v1 import vlm_pb2, vlm_pb2_grpc

from tests.integration.conftest import free_ports
from vlm_client import AsyncVLMClient, VLMClient, build_request, to_image
from vlm_client.cli import main as cli


def test_images_from_paths_bytes_pil_and_urls(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (4, 4), (255, 0, 0)).save(path)
    assert to_image(path).data == path.read_bytes() == to_image(str(path)).data
    assert to_image(b"\x89PNG...").data == b"\x89PNG..."
    assert to_image("https://cdn.internal/x.png").url == "https://cdn.internal/x.png"
    from_pil = to_image(Image.new("RGB", (4, 4)))
    assert from_pil.data.startswith(b"\x89PNG")
    with pytest.raises(TypeError, match="cannot send int"):
        to_image(42)


def test_build_request_puts_images_before_the_prompt():
    request = build_request("pixtral", "What?", [b"\x89PNG"], max_tokens=7, seed=3, request_id="r1")
    parts = request.messages[0].parts
    assert [p.WhichOneof("kind") for p in parts] == ["image", "text"] and parts[1].text == "What?"
    assert request.config.max_tokens == 7 and request.config.seed == 3 and request.request_id == "r1"


class _Models(vlm_pb2_grpc.VisionLanguageServiceServicer):
    def __init__(self):
        self.metadata = []

    def ListModels(self, request, context):
        self.metadata.append(dict(context.invocation_metadata()))
        return vlm_pb2.ListModelsResponse(models=[vlm_pb2.ModelInfo(name="pixtral", ready=True)])

    def GenerateStream(self, request, context):
        yield vlm_pb2.GenerateStreamResponse(text="a")
        yield vlm_pb2.GenerateStreamResponse(text="b", finish_reason=vlm_pb2.FINISH_REASON_STOP)


def serve_later(port: int, delay: float, servicer) -> list:
    holder = []

    def run():
        time.sleep(delay)
        server = grpc.server(futures.ThreadPoolExecutor(2))
        vlm_pb2_grpc.add_VisionLanguageServiceServicer_to_server(servicer, server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        holder.append(server)

    threading.Thread(target=run, daemon=True).start()
    return holder


def test_sync_client_retries_unavailable_until_the_server_is_up():
    [port] = free_ports(1)
    servicer = _Models()
    holder = serve_later(port, 0.6, servicer)
    try:
        with VLMClient(f"127.0.0.1:{port}", api_key="k", retries=6, backoff=0.2, timeout=5) as client:
            assert [m.name for m in client.list_models()] == ["pixtral"]
        assert servicer.metadata[0]["authorization"] == "Bearer k"
    finally:
        for server in holder:
            server.stop(0)


def test_client_without_retries_surfaces_unavailable():
    [port] = free_ports(1)
    with VLMClient(f"127.0.0.1:{port}", api_key="k", retries=0, timeout=2) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.list_models()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_async_client_streams_and_lists():
    [port] = free_ports(1)
    holder = serve_later(port, 0.0, _Models())

    async def main():
        async with AsyncVLMClient(f"127.0.0.1:{port}", api_key="k", retries=5, backoff=0.1) as client:
            texts = [m.text async for m in client.stream("pixtral", "hi")]
            models = await client.list_models()
        return texts, models

    try:
        texts, models = asyncio.run(main())
        assert texts == ["a", "b"] and models[0].name == "pixtral"
    finally:
        for server in holder:
            server.stop(0)


def test_cli_reports_errors_with_their_code(capsys):
    [port] = free_ports(1)
    assert cli(["--address", f"127.0.0.1:{port}", "--api-key", "k", "--timeout", "1", "models"]) == 1
    assert "error: UNAVAILABLE" in capsys.readouterr().err


class _Scripted(vlm_pb2_grpc.VisionLanguageServiceServicer):
    """Answers each call with the next outcome of `script`: an ApiError to refuse with, or None to answer."""

    def __init__(self, script, delay=0.0):
        self.script, self.delay, self.calls = list(script), delay, 0

    def _next(self, context):
        self.calls += 1
        time.sleep(self.delay)
        outcome = self.script[min(self.calls, len(self.script)) - 1]
        if outcome is not None:
            context.abort_with_status(outcome.to_status())

    def Generate(self, request, context):
        self._next(context)
        return vlm_pb2.GenerateResponse(text="ok")

    def GenerateStream(self, request, context):
        yield vlm_pb2.GenerateStreamResponse(text="first")
        self._next(context)


def refused(code, retry_after_s=None):
    from gateway.errors import ApiError

    return ApiError(code, "refused", retry_after_s=retry_after_s)


def serving(servicer, delay=0.0):
    """A server on a free port, started after `delay` seconds; with no delay, started when this returns
    (a client that found no server would wait out gRPC's reconnect backoff, longer than its timeout)."""
    [port] = free_ports(1)
    holder = serve_later(port, delay, servicer)
    while not delay and not holder:
        time.sleep(0.01)
    return f"127.0.0.1:{port}", holder


def test_generate_is_not_retried_when_it_may_have_run():
    servicer = _Scripted([refused(grpc.StatusCode.UNAVAILABLE)])
    address, holder = serving(servicer)
    try:
        with VLMClient(address, api_key="k", retries=3, backoff=0.01, timeout=5) as client:
            with pytest.raises(grpc.RpcError) as caught:
                client.generate("pixtral", "hi")
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and servicer.calls == 1
    finally:
        holder[0].stop(0)


def test_a_refusal_that_did_no_work_is_retried_as_its_retry_info_asks():
    servicer = _Scripted([refused(grpc.StatusCode.RESOURCE_EXHAUSTED, 0.05)] * 2 + [None])
    address, holder = serving(servicer)
    try:
        with VLMClient(address, api_key="k", retries=3, backoff=0.01, timeout=5) as client:
            assert client.generate("pixtral", "hi").text == "ok"
        assert servicer.calls == 3
    finally:
        holder[0].stop(0)


def test_a_call_that_raced_a_servers_shutdown_is_retried():
    # gRPC answers CANCELLED to a call that arrives as a server shuts down, before any of it ran;
    # the gateway itself never ends a call it ran with CANCELLED.
    servicer = _Scripted([refused(grpc.StatusCode.CANCELLED), None])
    address, holder = serving(servicer)
    try:
        with VLMClient(address, api_key="k", retries=3, backoff=0.01, timeout=5) as client:
            assert client.generate("pixtral", "hi").text == "ok"
        assert servicer.calls == 2
    finally:
        holder[0].stop(0)


def test_a_stream_is_never_retried_after_its_first_message():
    servicer = _Scripted([refused(grpc.StatusCode.RESOURCE_EXHAUSTED, 0.01)])
    address, holder = serving(servicer)
    try:
        with VLMClient(address, api_key="k", retries=3, backoff=0.01, timeout=5) as client:
            received = []
            with pytest.raises(grpc.RpcError):
                for message in client.stream("pixtral", "hi"):
                    received.append(message.text)
        assert received == ["first"] and servicer.calls == 1
    finally:
        holder[0].stop(0)


def test_retries_share_one_deadline():
    servicer = _Scripted([refused(grpc.StatusCode.RESOURCE_EXHAUSTED, 0.2)], delay=0.3)
    address, holder = serving(servicer)
    try:
        with VLMClient(address, api_key="k", retries=10, backoff=0.01, timeout=1.0) as client:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError):
                client.generate("pixtral", "hi")
            # Each attempt got a fresh 1 s before: 10 retries ran for about 5 s.
            assert time.monotonic() - started < 1.8 and servicer.calls <= 3
    finally:
        holder[0].stop(0)


def test_generate_waits_for_a_gateway_that_is_still_starting():
    servicer = _Scripted([None])
    address, holder = serving(servicer, delay=0.6)
    try:
        with VLMClient(address, api_key="k", retries=0, timeout=10) as client:
            assert client.generate("pixtral", "hi").text == "ok"
    finally:
        for server in holder:
            server.stop(0)


def test_async_client_built_outside_a_loop_works_in_every_loop():
    address, holder = serving(_Scripted([None]))
    client = AsyncVLMClient(address, api_key="k", timeout=10)  # as at module level
    try:
        for _ in range(2):  # two asyncio.run calls: two loops
            assert asyncio.run(client.generate("pixtral", "hi")).text == "ok"
    finally:
        holder[0].stop(0)


@pytest.mark.parametrize("mode", ["CMYK", "YCbCr", "F", "LAB", "I;16", "LA"])
def test_pil_images_of_every_mode_are_sent(mode):
    import io

    image = Image.new("RGB", (6, 4), (200, 100, 50)).convert(mode) if mode != "F" else Image.new("F", (6, 4), 300.5)
    data = to_image(image).data
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == "PNG" and decoded.size == (6, 4)
    if mode == "F":
        assert decoded.getpixel((0, 0)) == 255  # clipped to 8 bits, as the service does


def test_cli_explains_itself(capsys, tmp_path):
    with pytest.raises(SystemExit):
        cli(["generate", "-h"])
    help_text = " ".join(capsys.readouterr().out.split())  # as argparse wraps it for any width
    for option in ("--repetition-penalty", "--max-tokens", "--top-k", "0 to 1000", "in (0, 2]",
                   "until the answer or the context ends"):
        assert option in help_text, option
    assert cli(["--api-key", "k", "generate", "--model", "pixtral", "--image", str(tmp_path / "missing.png"), "hi"]) == 1
    assert f"no such file: {tmp_path / 'missing.png'}" in capsys.readouterr().err
    assert cli(["--api-key", "k", "generate", "--model", "pixtral", "--image", str(tmp_path), "hi"]) == 1
    assert "is a directory" in capsys.readouterr().err
    [port] = free_ports(1)
    assert cli(["--address", f"127.0.0.1:{port}", "--api-key", "k", "--timeout", "1", "models"]) == 1
    assert "`make up` starts it" in capsys.readouterr().err
    # Generate waits for a connection, at most the deadline: then UNAVAILABLE, saying why.
    assert cli(["--address", f"127.0.0.1:{port}", "--api-key", "k", "--timeout", "1", "generate", "--model", "pixtral", "hi"]) == 1
    error = capsys.readouterr().err
    assert f"UNAVAILABLE: no connection to the gateway at 127.0.0.1:{port} within 1s" in error
    assert f"no gateway answered at 127.0.0.1:{port}" in error


def test_cli_blames_the_gateway_only_when_it_was_never_reached(capsys):
    address, holder = serving(_Scripted([None], delay=2.0))
    try:
        assert cli(["--address", address, "--api-key", "k", "--timeout", "1", "generate", "--model", "pixtral", "hi"]) == 1
        error = capsys.readouterr().err
        assert "DEADLINE_EXCEEDED" in error and "no gateway answered" not in error
    finally:
        holder[0].stop(0)


def test_cli_tells_an_unauthenticated_user_where_the_key_goes(capsys):
    from gateway.errors import ApiError

    address, holder = serving(_Scripted([ApiError(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown API key")]))
    try:
        assert cli(["--address", address, "--api-key", "wrong", "generate", "--model", "pixtral", "hi"]) == 1
        assert "set VLM_API_KEY or pass --api-key" in capsys.readouterr().err
    finally:
        holder[0].stop(0)


def test_vlm_models_shows_why_a_version_failed(capsys):
    class _FailedVersion(vlm_pb2_grpc.VisionLanguageServiceServicer):
        def ListModels(self, request, context):
            versions = [vlm_pb2.ModelVersion(version="1", state="READY"),
                        vlm_pb2.ModelVersion(version="2", state="UNAVAILABLE", reason="model.py raised: no weights")]
            return vlm_pb2.ListModelsResponse(models=[
                vlm_pb2.ModelInfo(name="pixtral", ready=True, versions=versions, context_tokens=4096, max_tokens=4095),
                vlm_pb2.ModelInfo(name="qwen2.5-vl", ready=False)])

    address, holder = serving(_FailedVersion())
    try:
        assert cli(["--address", address, "--api-key", "k", "models"]) == 0
        pixtral, qwen = capsys.readouterr().out.splitlines()
        assert "2:UNAVAILABLE (model.py raised: no weights)" in pixtral
        assert "context_tokens=4096" in pixtral and "max_tokens=4095" in pixtral
        assert "versions=none loaded" in qwen
    finally:
        holder[0].stop(0)


def test_the_cli_prints_each_kind_of_typed_result_readably():
    from vlm.v1 import vlm_pb2

    from vlm_client.cli import describe_result

    box = vlm_pb2.Box(x_min=1, y_min=2, x_max=30.4, y_max=40.6)
    answer = vlm_pb2.GenerateResponse(detections=vlm_pb2.Detections(detections=[
        vlm_pb2.Detection(label="cat", box=box, image_index=1)]))
    assert describe_result(answer).splitlines()[1] == "cat\t[1, 2, 30, 41]\timage 1"
    answer = vlm_pb2.GenerateResponse(text_lines=vlm_pb2.TextLines(lines=[
        vlm_pb2.TextLine(text="TOTAL 9.99", box=box), vlm_pb2.TextLine(text="thanks")]))
    assert describe_result(answer).splitlines()[1:] == ["TOTAL 9.99\t[1, 2, 30, 41]\timage 0", "thanks\t-\timage 0"]
    answer = vlm_pb2.GenerateResponse(table=vlm_pb2.Table(header=["year", "sales"], rows=[
        vlm_pb2.Table.Row(cells=["2023", "5"]), vlm_pb2.Table.Row(cells=["2024", "17"])]))
    assert describe_result(answer).splitlines()[1:] == ["year  sales", "2023  5    ", "2024  17   "]
    assert describe_result(vlm_pb2.GenerateResponse(result_error="max_tokens cut it")) == "[no result: max_tokens cut it]"


def test_the_cli_gives_boxes_of_a_turned_photo_also_where_the_object_is_upright(tmp_path):
    """A phone photo stored landscape, shown portrait (EXIF orientation 6): the service's box is in
    the stored grid; the CLI adds the box on the upright picture, around the object there."""
    import numpy as np
    from PIL import ImageOps

    from vlm_client.cli import describe_result

    pixels = np.full((80, 120, 3), 255, dtype=np.uint8)
    pixels[5:30, 10:45] = (0, 0, 255)  # the object: x 10-45, y 5-30 of the stored grid
    exif = Image.Exif()
    exif[0x0112] = 6
    photo = tmp_path / "phone.jpg"
    Image.fromarray(pixels).save(photo, "JPEG", exif=exif.tobytes(), quality=95)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(photo))).astype(int)
    ys, xs = np.nonzero((upright[:, :, 2] > 160) & (upright[:, :, 0] < 100))
    where = f"[{xs.min()}, {ys.min()}, {xs.max() + 1}, {ys.max() + 1}]"
    assert where == "[50, 10, 75, 45]"
    stored_box = vlm_pb2.Box(x_min=10, y_min=5, x_max=45, y_max=30)
    answer = vlm_pb2.GenerateResponse(detections=vlm_pb2.Detections(detections=[
        vlm_pb2.Detection(label="cup", box=stored_box)], boxes_outside=2))
    header, line, outside = describe_result(answer, [str(photo)]).splitlines()
    assert "in pixels of the file as stored" in header
    assert line == f"cup\t[10, 5, 45, 30] upright {where}\timage 0"
    assert outside == "(2 box(es) outside the image left out)"
    plain = tmp_path / "plain.png"
    Image.fromarray(pixels).save(plain)
    assert describe_result(answer, [str(plain)]).splitlines()[1] == "cup\t[10, 5, 45, 30]\timage 0"


def test_batch_items_from_a_folder_and_a_manifest_and_a_torn_output_line_is_cut(tmp_path):
    from vlm_client.batch import folder_items, manifest_items, resume

    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/x.PNG", "a/b/y.jpg", "a/z.txt"):
        (tmp_path / name).write_bytes(b"...")
    items = folder_items(tmp_path / "a", "Describe", "pixtral", "caption", {"max_tokens": 8})
    assert [(i.id, i.model, i.task, i.params) for i in items] == [
        ("b/y.jpg", "pixtral", "caption", {"max_tokens": 8}), ("x.PNG", "pixtral", "caption", {"max_tokens": 8})]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"id": "1", "image": "a/x.PNG", "temperature": 0.5}\n\n'
                        '{"id": "2", "images": ["https://h/i.png"], "prompt": "own", "model": "auto", "task": "ocr"}\n')
    first, second = manifest_items(manifest, "default prompt", "pixtral", None, {"max_tokens": 8})
    assert (first.images, first.prompt, first.model, first.params) == (
        [str(tmp_path / "a/x.PNG")], "default prompt", "pixtral", {"max_tokens": 8, "temperature": 0.5})
    assert (second.images, second.prompt, second.model, second.task) == (["https://h/i.png"], "own", "auto", "ocr")
    manifest.write_text('{"id": "1", "colour": "red", "model": "pixtral"}\n')
    [item] = manifest_items(manifest, "", None, None, {})
    assert item.problem.startswith(f'{manifest}:1: unknown field "colour"') and item.as_input() == {
        "colour": "red", "model": "pixtral"}
    output = tmp_path / "out.jsonl"
    output.write_text('{"id": "1", "input": {}}\n{"id": "2", "inp')
    assert resume(output, rerun_if_failed={"1", "2"}) == ({"1"}, set()) and output.read_text() == '{"id": "1", "input": {}}\n'
    # Only the error lines of items to run again leave: another manifest's stay as they are.
    failed = '{"id": "other", "input": {}, "error": {"code": "INTERNAL", "message": "m"}}\n'
    output.write_text(failed + '{"id": "2", "input": {}, "error": {"code": "INTERNAL", "message": "m"}}\n')
    assert resume(output, rerun_if_failed={"1", "2"}) == ({"other"}, {"2"}) and output.read_text() == failed


# --- vlm batch: reruns, bad lines, ids, atomic rewrites -------------------------------------------


class _Answering(vlm_pb2_grpc.VisionLanguageServiceServicer):
    """Answers each Generate with its prompt, or refuses every call with INTERNAL while `failing`."""

    def __init__(self, failing=False):
        self.failing, self.prompts = failing, []

    def Generate(self, request, context):
        self.prompts.append(request.messages[0].parts[-1].text)
        if self.failing:
            context.abort(grpc.StatusCode.INTERNAL, "the model crashed")
        return vlm_pb2.GenerateResponse(text=f"answer to {self.prompts[-1]}", model=request.model)


def write_manifest(path, *entries) -> None:
    import json

    path.write_text("".join((entry if isinstance(entry, str) else json.dumps(entry)) + "\n" for entry in entries))


def results(path) -> dict:
    import json

    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == len({line["id"] for line in lines}), "one line per id"
    return {line["id"]: line for line in lines}


def batch(address, manifest, output, *options, connect_timeout="5"):
    return cli(["--address", address, "--api-key", "k", "--connect-timeout", connect_timeout, "batch", str(manifest),
                "--output", str(output), "--model", "pixtral", "--no-progress", *options])


def test_a_batch_rerun_retries_the_items_that_failed(tmp_path, capsys):
    servicer = _Answering(failing=True)
    address, holder = serving(servicer)
    manifest, output = tmp_path / "items.jsonl", tmp_path / "out.jsonl"
    write_manifest(manifest, *({"id": f"item-{i}", "prompt": f"q{i}"} for i in range(3)))
    try:
        assert batch(address, manifest, output) == 2
        assert {record["error"]["code"] for record in results(output).values()} == {"INTERNAL"}
        servicer.failing = False
        assert batch(address, manifest, output) == 0  # the default: what failed runs again
        assert {id: record.get("text") for id, record in results(output).items()} == {
            f"item-{i}": f"answer to q{i}" for i in range(3)}
        assert "done 3, failed 0, skipped 0" in capsys.readouterr().err
        assert batch(address, manifest, output) == 0 and len(servicer.prompts) == 6  # all done: nothing sent
        # --no-retry-failed resumes only: an error line stays the item's answer.
        servicer.failing, kept = True, tmp_path / "kept.jsonl"
        assert batch(address, manifest, kept) == 2
        servicer.failing = False
        assert batch(address, manifest, kept, "--no-retry-failed") == 0 and len(servicer.prompts) == 9
        assert "skipped 3" in capsys.readouterr().err and all("error" in r for r in results(kept).values())
    finally:
        holder[0].stop(0)


def test_a_bad_manifest_value_is_that_items_error_line_and_the_rest_runs(tmp_path, capsys):
    servicer = _Answering()
    address, holder = serving(servicer)
    (tmp_path / "photo.png").write_bytes(b"not needed: never sent")
    manifest, output = tmp_path / "items.jsonl", tmp_path / "out.jsonl"
    write_manifest(manifest,
                   {"id": "good", "prompt": "fine"},
                   {"id": "typed", "prompt": "p", "max_tokens": "10"},
                   {"id": "one-path", "prompt": "p", "images": "photo.png"},
                   {"id": "stop-text", "prompt": "p", "stop": "END"},
                   {"id": "typo", "prompt": "p", "temprature": 0.5})
    try:
        for _ in range(2):  # the same on every run: never an abort
            assert batch(address, manifest, output) == 2
            records = results(output)
            assert records["good"]["text"] == "answer to fine" and servicer.prompts[-1] == "fine"
            errors = {id: record["error"] for id, record in records.items() if "error" in record}
            assert set(errors) == {"typed", "one-path", "stop-text", "typo"}
            assert {error["code"] for error in errors.values()} == {"INVALID_ARGUMENT"}
            for id, (line, field, fix) in {"typed": (2, '"max_tokens"', 'e.g. 64 (not "64")'),
                                           "one-path": (3, '"images"', '"image": "a.png"'),
                                           "stop-text": (4, '"stop"', '["END"]'),
                                           "typo": (5, 'unknown field "temprature"', "temperature")}.items():
                message = errors[id]["message"]
                assert f"items.jsonl:{line}:" in message and field in message and fix in message, message
        assert servicer.prompts == ["fine"]  # a bad line is never sent (and "good" was done)
        assert "Traceback" not in capsys.readouterr().err
    finally:
        holder[0].stop(0)


def test_ids_are_compared_as_text_and_repeats_are_refused_naming_their_lines(tmp_path):
    from vlm_client.batch import ManifestError, manifest_items

    manifest = tmp_path / "items.jsonl"
    write_manifest(manifest, {"id": 1}, {"id": "2"}, {"id": "1"}, {"id": 2}, {"id": 3})
    with pytest.raises(ManifestError) as caught:
        manifest_items(manifest, "p", "pixtral", None, {})
    message = str(caught.value)
    assert "'1' on lines 1 and 3" in message and "'2' on lines 2 and 4" in message and "as text" in message
    write_manifest(manifest, {"id": True}, {"id": 1.5})
    with pytest.raises(ManifestError, match=r'items.jsonl:1: each line needs an "id": a string or an integer'):
        manifest_items(manifest, "p", "pixtral", None, {})


def test_a_rerun_rewrites_the_output_atomically(tmp_path, monkeypatch):
    """Dropping a torn line or a failed item's line rewrites the file: a kill at any point of it
    leaves either the old file or the new one, never a cut one."""
    import os

    servicer = _Answering()
    address, holder = serving(servicer)
    manifest, output = tmp_path / "items.jsonl", tmp_path / "out.jsonl"
    write_manifest(manifest, *({"id": f"item-{i}", "prompt": f"q{i}"} for i in range(3)))
    before = ('{"id": "item-0", "input": {}, "text": "kept"}\n'
              '{"id": "item-1", "input": {}, "error": {"code": "INTERNAL", "message": "crashed"}}\n'
              '{"id": "item-2", "inp').encode()
    output.write_bytes(before)

    def killed(*_):
        raise KeyboardInterrupt  # as a kill at the moment the new file would take the old one's place

    try:
        with monkeypatch.context() as patch:
            patch.setattr(os, "replace", killed)
            assert batch(address, manifest, output) == 130
        assert output.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [
            "items.jsonl", "out.jsonl"]
        assert servicer.prompts == []
        assert batch(address, manifest, output) == 0
        records = results(output)
        assert records["item-0"]["text"] == "kept" and sorted(servicer.prompts) == ["q1", "q2"]
    finally:
        holder[0].stop(0)


# --- vlm: the address, an unreachable gateway, Ctrl-C, JSON output, models -------------------------


def test_generate_fails_within_seconds_when_no_gateway_listens():
    import subprocess
    import sys

    [port] = free_ports(1)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "vlm_client.cli", "--address", f"127.0.0.1:{port}", "--api-key", "k",
                           "generate", "--model", "pixtral", "hi"], capture_output=True, text=True, timeout=60)
    assert time.monotonic() - started < 15 and done.returncode == 1
    assert "error: UNAVAILABLE" in done.stderr and f"no gateway answered at 127.0.0.1:{port}" in done.stderr


def test_the_address_comes_from_vlm_address_and_the_flag_wins(monkeypatch, capsys):
    address, holder = serving(_Models())
    [nobody] = free_ports(1)
    try:
        monkeypatch.setenv("VLM_ADDRESS", address)
        assert cli(["--api-key", "k", "models"]) == 0 and capsys.readouterr().out.startswith("pixtral")
        assert cli(["--address", f"127.0.0.1:{nobody}", "--api-key", "k", "--connect-timeout", "1", "models"]) == 1
        assert f"no gateway answered at 127.0.0.1:{nobody}" in capsys.readouterr().err
    finally:
        holder[0].stop(0)
    with pytest.raises(SystemExit):
        cli(["-h"])
    assert "$VLM_ADDRESS" in capsys.readouterr().out


class _SlowStream(vlm_pb2_grpc.VisionLanguageServiceServicer):
    def __init__(self):
        self.cancelled = threading.Event()

    def GenerateStream(self, request, context):
        # Set when the call ends, which, before the 60 s below, only the client's cancel does. (Code
        # after the yield is not reached when the cancel lands before the server resumes this
        # generator: gRPC then closes it at the yield.)
        context.add_callback(self.cancelled.set)
        yield vlm_pb2.GenerateStreamResponse(text="first")
        deadline = time.monotonic() + 60
        while context.is_active() and time.monotonic() < deadline:
            time.sleep(0.05)


def test_ctrl_c_during_a_stream_exits_130_without_a_traceback():
    import signal
    import subprocess
    import sys

    servicer = _SlowStream()
    address, holder = serving(servicer)
    try:
        process = subprocess.Popen([sys.executable, "-m", "vlm_client.cli", "--address", address, "--api-key", "k",
                                    "generate", "--model", "pixtral", "--stream", "hi"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert process.stdout.read(5) == "first"
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=20)
        assert process.returncode == 130 and "Traceback" not in err, err
        assert "interrupted" in err and servicer.cancelled.wait(10)  # the stream was cancelled, not abandoned
    finally:
        holder[0].stop(0)


class _Typed(vlm_pb2_grpc.VisionLanguageServiceServicer):
    """Answers whose fields hold proto3 defaults (0, "", an empty list): JSON must keep them."""

    def Generate(self, request, context):
        return vlm_pb2.GenerateResponse(text="", model="pixtral", usage=vlm_pb2.Usage(prompt_tokens=3),
                                        detections=vlm_pb2.Detections(detections=[
            vlm_pb2.Detection(label="cat", box=vlm_pb2.Box(x_min=0, y_min=0, x_max=5, y_max=5), image_index=0)]))

    def GenerateStream(self, request, context):
        yield vlm_pb2.GenerateStreamResponse(text="a", model="pixtral")
        yield vlm_pb2.GenerateStreamResponse(text="", model="pixtral", finish_reason=vlm_pb2.FINISH_REASON_STOP)


def test_json_output_keeps_every_field(capsys):
    import json

    address, holder = serving(_Typed())
    try:
        assert cli(["--address", address, "--api-key", "k", "generate", "--model", "pixtral", "--json", "hi"]) == 0
        answer = json.loads(capsys.readouterr().out)
        assert (answer["text"], answer["confidence"], answer["usage"]["completion_tokens"], answer["tool_calls"]) == (
            "", 0, 0, [])
        [detection] = answer["detections"]["detections"]
        assert detection == {"label": "cat", "box": {"x_min": 0, "y_min": 0, "x_max": 5, "y_max": 5},
                             "image_index": 0}
        # A stream as JSON: one whole message a line, none left out.
        assert cli(["--address", address, "--api-key", "k", "generate", "--model", "pixtral", "--stream", "--json",
                    "hi"]) == 0
        messages = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [m["text"] for m in messages] == ["a", ""] and messages[0]["finish_reason"] == "FINISH_REASON_UNSPECIFIED"
    finally:
        holder[0].stop(0)


QUEUE_FULL = ("Exceeds maximum queue size: 64 requests already wait for this model's generation rows; "
              "retry later or raise the queue")


class _Routed(vlm_pb2_grpc.VisionLanguageServiceServicer):
    """Model auto's answer whose Pixtral fallback failed: Qwen2.5-VL's held answer, the failed attempt listed."""

    route = vlm_pb2.Route(reason=vlm_pb2.ROUTE_REASON_FALLBACK_FAILED, attempts=[
        vlm_pb2.RouteAttempt(model="qwen2.5-vl", model_version="1", confidence=-2.0, completion_tokens=4),
        vlm_pb2.RouteAttempt(model="pixtral", error=QUEUE_FULL)])

    def Generate(self, request, context):
        return vlm_pb2.GenerateResponse(text="a cat", model="qwen2.5-vl", confidence=-2.0, route=self.route)


def test_the_cli_shows_a_failed_route_attempt_as_failed_with_its_error(capsys):
    address, holder = serving(_Routed())
    try:
        assert cli(["--address", address, "--api-key", "k", "generate", "--model", "auto", "hi"]) == 0
        status = capsys.readouterr().err
        route = status[status.index(" route="):].removesuffix("]\n")
        assert route.startswith(" route=fallback_failed:qwen2.5-vl(-2.00)>pixtral(failed: Exceeds maximum queue size")
        assert route.endswith("…)") and len(route) < len(QUEUE_FULL), "a long error is cut short"
    finally:
        holder[0].stop(0)


def test_batch_lines_keep_every_field_of_a_typed_result(tmp_path):
    address, holder = serving(_Typed())
    manifest, output = tmp_path / "items.jsonl", tmp_path / "out.jsonl"
    write_manifest(manifest, {"id": "a", "prompt": "find the cat", "task": "grounding"})
    try:
        assert batch(address, manifest, output) == 0
        record = results(output)["a"]
        assert record["result"]["detections"]["detections"][0]["image_index"] == 0
        assert record["usage"] == {"prompt_tokens": 3, "completion_tokens": 0, "image_tokens": 0, "cached_tokens": 0}
    finally:
        holder[0].stop(0)


def test_vlm_models_numbers_agree_with_each_other_and_with_what_the_service_accepts(capsys):
    """ListModels (gateway.servicer.model_info) as `vlm models` shows it: "auto" reports the sampling
    defaults both models share, never zeros that no model uses; max_tokens is the limit the service
    validates, cut to the context only where the context is smaller."""
    from gateway.servicer import model_info
    from vlm_serving.generation.sampling import SamplingDefaults
    from vlm_serving.pipelines import pipeline

    class Backend:
        async def model_parameters(self, name):
            context, temperature = {"pixtral_generate": ("8192", 0.7), "qwen2_5_vl_generate": ("4096", 0.0)}[name]
            return {"quantization": "none", "context_tokens": context, "max_tokens_limit": "4096",
                    "sampling_defaults": SamplingDefaults(temperature, 1.0, 0, 1.0).to_json()}

    index = [{"name": name, "version": "1", "state": "READY"} for name in pipeline("auto")]
    infos = [asyncio.run(model_info(Backend(), name, ensemble, index))
             for name, ensemble in (("auto", "auto"), ("pixtral", "pixtral"), ("qwen2.5-vl", "qwen2_5_vl"))]
    assert [(info.context_tokens, info.max_tokens) for info in infos] == [(4096, 4096), (8192, 4096), (4096, 4096)]

    class Listing(vlm_pb2_grpc.VisionLanguageServiceServicer):
        def ListModels(self, request, context):
            return vlm_pb2.ListModelsResponse(models=infos)

    address, holder = serving(Listing())
    try:
        assert cli(["--address", address, "--api-key", "k", "models"]) == 0
        auto, pixtral, qwen = capsys.readouterr().out.splitlines()
        # The models differ in temperature only: auto's is theirs, so it says neither 0 nor 0.7.
        assert "defaults=temperature:-,top_p:1,top_k:0,repetition_penalty:1" in auto
        assert "defaults=temperature:0.7,top_p:1,top_k:0,repetition_penalty:1" in pixtral
        assert "context_tokens=4096\tmax_tokens=4096" in qwen and "context_tokens=8192\tmax_tokens=4096" in pixtral
    finally:
        holder[0].stop(0)


@pytest.mark.timeout(60)
def test_a_batch_with_no_gateway_stops_at_once_and_leaves_the_output_as_it_was(tmp_path, capsys):
    [port] = free_ports(1)
    manifest, output = tmp_path / "items.jsonl", tmp_path / "out.jsonl"
    write_manifest(manifest, *({"id": f"item-{i}", "prompt": f"q{i}"} for i in range(20)))
    output.write_text('{"id": "item-0", "input": {}, "error": {"code": "INTERNAL", "message": "m"}}\n{"id": "item-1"')
    before = output.read_bytes()
    started = time.monotonic()
    assert batch(f"127.0.0.1:{port}", manifest, output, connect_timeout="1") == 1
    assert time.monotonic() - started < 10 and output.read_bytes() == before
    error = capsys.readouterr().err
    assert f"no connection to the gateway at 127.0.0.1:{port}" in error and "rerun the same command" in error

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
    [port] = free_ports(1)
    return f"127.0.0.1:{port}", serve_later(port, delay, servicer)


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
    help_text = capsys.readouterr().out
    for option in ("--repetition-penalty", "--max-tokens", "--top-k", "0 to 1000", "in (0, 2]", "(default: 64)"):
        assert option in help_text, option
    assert cli(["--api-key", "k", "generate", "--model", "pixtral", "--image", str(tmp_path / "missing.png"), "hi"]) == 1
    assert f"no such file: {tmp_path / 'missing.png'}" in capsys.readouterr().err
    assert cli(["--api-key", "k", "generate", "--model", "pixtral", "--image", str(tmp_path), "hi"]) == 1
    assert "is a directory" in capsys.readouterr().err
    [port] = free_ports(1)
    assert cli(["--address", f"127.0.0.1:{port}", "--api-key", "k", "--timeout", "1", "models"]) == 1
    assert "`make up` starts it" in capsys.readouterr().err
    # Generate waits for a connection (wait_for_ready), so it ends in DEADLINE_EXCEEDED, not UNAVAILABLE.
    assert cli(["--address", f"127.0.0.1:{port}", "--api-key", "k", "--timeout", "1", "generate", "--model", "pixtral", "hi"]) == 1
    error = capsys.readouterr().err
    assert "DEADLINE_EXCEEDED" in error and f"no gateway answered at 127.0.0.1:{port}" in error


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


def test_batch_items_from_a_folder_and_a_manifest_and_a_torn_output_line_is_cut(tmp_path):
    from vlm_client.batch import ManifestError, finished_ids, folder_items, manifest_items

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
    with pytest.raises(ManifestError, match="m.jsonl:1: unknown field"):
        manifest_items(manifest, "", None, None, {})
    output = tmp_path / "out.jsonl"
    output.write_text('{"id": "1", "input": {}}\n{"id": "2", "inp')
    assert finished_ids(output) == {"1"} and output.read_text() == '{"id": "1", "input": {}}\n'

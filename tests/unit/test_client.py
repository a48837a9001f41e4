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

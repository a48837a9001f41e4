"""The gateway's own cost per call, apart from Triton's and the machine's noise (issue 28 item 6).

    .venv/bin/python -m perf.gateway_overhead [--calls N]

Rows 1a and 1b of `make bench` measure the gateway against direct Triton on the whole stack, where a
shared 2-core machine's load moves them by more than the gateway's own cost. This script serves
calls in this process with the real gateway (`gateway.server.start`: interceptor, servicer, pool,
metrics, logs) over an instant stand-in for each Triton server (it answers one token at once), and
beside it a bare grpc.aio server whose handler answers at once: the difference is the gateway's own
work per call. A client process sends trivial requests one at a time (c=1); rows: p50 latency and
this process's CPU time per call, printed as each is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from unittest import mock

import grpc
from vlm.v1 import vlm_pb2, vlm_pb2_grpc

from vlm_serving.ensemble_client import ResponseChunk

KEY = "overhead-key"
WARM_CALLS = 200
CLIENT = r"""
import sys, time
import grpc
from vlm.v1 import vlm_pb2, vlm_pb2_grpc
from perf.workload import workload

address, calls, with_image, key = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "image", sys.argv[4]
parts = [vlm_pb2.Part(text="Say hello.")]
if with_image:
    parts.insert(0, vlm_pb2.Part(image=vlm_pb2.Image(data=workload(1)[0].image)))
request = vlm_pb2.GenerateRequest(model="pixtral", messages=[vlm_pb2.Message(role="user", parts=parts)],
                                  config=vlm_pb2.GenerationConfig(max_tokens=1))
metadata = (("authorization", f"Bearer {key}"),)
with grpc.insecure_channel(address) as channel:
    generate = vlm_pb2_grpc.VisionLanguageServiceStub(channel).Generate
    for _ in range(%d):
        generate(request, metadata=metadata)
    took = []
    for _ in range(calls):
        started = time.perf_counter()
        generate(request, metadata=metadata)
        took.append(time.perf_counter() - started)
took.sort()
print(took[len(took) // 2])
""" % WARM_CALLS


class InstantTriton:
    """Stands in for one Triton server: every model ready, every request answered with one token at once."""

    def __init__(self, url: str, **_):
        self.url = url

    async def server_live(self) -> bool:
        return True

    async def repository_index(self) -> list[dict]:
        from vlm_serving.pipelines import FAMILIES, ROUTER, serving_models

        return [{"name": name, "version": "1", "state": "READY"}
                for ensemble in (*FAMILIES, ROUTER) for name in serving_models(ensemble)]

    async def generate(self, ensemble, *args, **kwargs):
        yield ResponseChunk(text="Hi", token_ids=[1], finished=True, finish_reason="length", prompt_tokens=8,
                            completion_tokens=1, model_version="1")

    async def close(self) -> None:
        pass


class AnswerAtOnce(vlm_pb2_grpc.VisionLanguageServiceServicer):
    async def Generate(self, request, context):
        return vlm_pb2.GenerateResponse(model=request.model, text="Hi")


async def measure(address: str, calls: int, with_image: bool) -> tuple[float, float]:
    """(p50 seconds seen by the client, this process's CPU seconds per call)."""
    cpu = time.process_time()
    client = await asyncio.create_subprocess_exec(sys.executable, "-c", CLIENT, address, str(calls),
                                                  "image" if with_image else "text", KEY, stdout=subprocess.PIPE)
    out, _ = await client.communicate()
    if client.returncode:
        raise RuntimeError(f"the client failed ({client.returncode})")
    return float(out), (time.process_time() - cpu) / (calls + WARM_CALLS)


async def bare_server(calls: int) -> tuple[float, float]:
    server = grpc.aio.server()
    vlm_pb2_grpc.add_VisionLanguageServiceServicer_to_server(AnswerAtOnce(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        return await measure(f"127.0.0.1:{port}", calls, with_image=False)
    finally:
        await server.stop(0)


async def gateway_server(calls: int, with_image: bool) -> tuple[float, float]:
    from gateway import server as gateway_server_module
    from gateway.settings import Settings

    settings = Settings.from_env({"VLM_API_KEYS": KEY, "VLM_TRITON_URL": "127.0.0.1:1",
                                  "VLM_LISTEN_ADDRESS": "127.0.0.1:0", "VLM_HTTP_ADDRESS": "off",
                                  "VLM_METRICS_PORT": "0", "VLM_METRICS_ADDRESS": "127.0.0.1"})
    with mock.patch.object(gateway_server_module, "TritonBackend", InstantTriton):
        gateway = await gateway_server_module.start(settings)
    try:
        return await measure(f"127.0.0.1:{gateway.port}", calls, with_image)
    finally:
        await gateway.stop(0)


async def main(calls: int) -> None:
    from gateway.observability import configure_logging

    configure_logging("WARNING")  # the gateway's line per request is measured by rows 1a and 1b
    print("| measure | p50 (c=1) | CPU per call |\n| --- | --- | --- |", flush=True)
    bare_p50, bare_cpu = await bare_server(calls)
    print(f"| bare grpc.aio server answering at once | {bare_p50 * 1e3:.3f} ms | {bare_cpu * 1e3:.3f} ms |",
          flush=True)
    for with_image in (False, True):
        p50, cpu = await gateway_server(calls, with_image)
        what = "text + a 158 KB JPEG" if with_image else "text"
        print(f"| gateway over an instant stand-in for Triton, {what} | {p50 * 1e3:.3f} ms "
              f"(+{(p50 - bare_p50) * 1e3:.3f}) | {cpu * 1e3:.3f} ms (+{(cpu - bare_cpu) * 1e3:.3f}) |", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    os.environ.setdefault("PYTHONPATH", os.getcwd())
    asyncio.run(main(parser.parse_args().calls))

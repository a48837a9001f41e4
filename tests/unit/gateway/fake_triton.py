"""A Triton stand-in that misbehaves on demand, for the gateway's stream handling.

The real server is used everywhere else (tests/integration); it cannot be made to drop a stream,
stall a connection or flood a slow reader at a chosen moment. This one speaks Triton's gRPC
protocol (`GRPCInferenceService`) and answers each request as its prompt says, a JSON object:
`{"n": 3, "delay": 0.05}` (n text responses, the last one final, `delay` seconds apart),
`{"hangup": true}` (end the whole stream), `{"abort": true}` (fail the whole stream). The
`cancel` model's calls are recorded in `cancelled`.

`ThrottledProxy` sits between the gateway and the server: per TCP connection it forwards at most
`rate` bytes per second, and `freeze()` stops it forwarding without closing anything (a
half-open connection).
"""

from __future__ import annotations

import asyncio
import json

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from vlm_serving.generation.sampling import SamplingParams


def _tensor(name: str, datatype: str, array: np.ndarray):
    output = service_pb2.ModelInferResponse.InferOutputTensor(name=name, datatype=datatype, shape=list(array.shape))
    raw = serialize_byte_tensor(array).item() if datatype == "BYTES" else array.tobytes()
    return output, raw


def response(request_id: str, text: str, final: bool, index: int = 0) -> service_pb2.ModelStreamInferResponse:
    tensors = [_tensor("TEXT", "BYTES", np.array([[text.encode()]], dtype=np.object_)),
               _tensor("TOKEN_IDS", "INT32", np.array([[index]], dtype=np.int32))]
    if final:
        tensors += [
            _tensor("FINISH_REASON", "BYTES", np.array([[b"stop"]], dtype=np.object_)),
            _tensor("PROMPT_TOKENS", "INT32", np.array([[3]], dtype=np.int32)),
            _tensor("COMPLETION_TOKENS", "INT32", np.array([[index + 1]], dtype=np.int32)),
            _tensor("IMAGE_TOKENS", "INT32", np.array([[0]], dtype=np.int32)),
            _tensor("CONFIDENCE", "FP32", np.array([[-0.5]], dtype=np.float32)),
            _tensor("MODEL_VERSION", "BYTES", np.array([[b"1"]], dtype=np.object_)),
            _tensor("IMAGE_INFO", "BYTES", np.array([[b"[]"]], dtype=np.object_)),
        ]
    infer = service_pb2.ModelInferResponse(model_name="pixtral", id=request_id,
                                           outputs=[t for t, _ in tensors], raw_output_contents=[r for _, r in tensors])
    infer.parameters["triton_final_response"].bool_param = final
    return service_pb2.ModelStreamInferResponse(infer_response=infer)


def prompt_of(request: service_pb2.ModelInferRequest) -> dict:
    for tensor, raw in zip(request.inputs, request.raw_input_contents):
        if tensor.name == "MESSAGES":
            messages = json.loads(deserialize_bytes_tensor(raw)[0])
            return json.loads(messages[-1]["content"][-1]["text"])
    raise AssertionError("no MESSAGES input")


class FakeTriton(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self):
        self.cancelled: list[str] = []
        self.received: list[str] = []  # request ids, in arrival order
        self.streams_opened = 0

    async def ModelStreamInfer(self, request_iterator, context):
        self.streams_opened += 1
        outgoing: asyncio.Queue = asyncio.Queue()
        tasks = set()

        async def answer(request, command):
            for index in range(command.get("n", 2)):
                await asyncio.sleep(command.get("delay", 0.0))
                await outgoing.put(response(request.id, f"t{index} ", index == command.get("n", 2) - 1, index))

        async def consume():
            async for request in request_iterator:
                self.received.append(request.id)
                command = prompt_of(request)
                if command.get("hangup") or command.get("abort"):
                    await outgoing.put(command)
                    return
                task = asyncio.get_running_loop().create_task(answer(request, command))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        consumer = asyncio.get_running_loop().create_task(consume())
        try:
            while True:
                item = await outgoing.get()
                if isinstance(item, dict):
                    if item.get("abort"):
                        await context.abort(grpc.StatusCode.INTERNAL, "stream aborted on request")
                    return
                await context.write(item)
        finally:
            consumer.cancel()
            for task in list(tasks):
                task.cancel()

    async def ModelInfer(self, request, context):
        assert request.model_name == "cancel"
        ids = deserialize_bytes_tensor(request.raw_input_contents[0])
        self.cancelled += [value.decode() for value in ids]
        output, raw = _tensor("CANCELLED", "INT32", np.array([len(ids)], dtype=np.int32))
        return service_pb2.ModelInferResponse(model_name="cancel", id=request.id, outputs=[output],
                                              raw_output_contents=[raw])


async def start_fake_triton(port: int = 0, credentials: grpc.ServerCredentials | None = None
                            ) -> tuple[grpc.aio.Server, FakeTriton, int]:
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", 256 << 20),
        # Accept the gateway's keepalive pings at any rate (as Triton started by our launcher does).
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.keepalive_permit_without_calls", 1),
    ])
    fake = FakeTriton()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(fake, server)
    port = (server.add_secure_port(f"127.0.0.1:{port}", credentials) if credentials
            else server.add_insecure_port(f"127.0.0.1:{port}"))
    await server.start()
    return server, fake, port


class ThrottledProxy:
    """A TCP proxy on loopback: per connection at most `rate` bytes/s each way; `freeze()` stalls all."""

    def __init__(self, target_port: int, rate: float | None = None):
        self.target_port = target_port
        self.rate = rate
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.connections = 0
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._connect, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _connect(self, client_reader, client_writer):
        self.connections += 1
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        for reader, writer in ((client_reader, server_writer), (server_reader, client_writer)):
            task = asyncio.get_running_loop().create_task(self._pump(reader, writer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, reader, writer):
        try:
            while True:
                await self.flowing.wait()
                data = await reader.read(16384)
                if not data:
                    break
                await self.flowing.wait()
                writer.write(data)
                await writer.drain()
                if self.rate:
                    await asyncio.sleep(len(data) / self.rate)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    def freeze(self) -> None:
        self.flowing.clear()

    async def close(self) -> None:
        self.server.close()
        for task in list(self._tasks):
            task.cancel()


def command(**fields) -> list[dict]:
    """Messages whose prompt tells the fake server what to do."""
    return [{"role": "user", "content": [{"type": "text", "text": json.dumps(fields)}]}]


PARAMS = SamplingParams(max_tokens=8, stream=True)

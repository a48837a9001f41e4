"""Exit 0 when the gateway reports SERVING (for container health checks).

    python -m gateway.healthcheck [host:port]     # default: the port of VLM_LISTEN_ADDRESS on localhost
"""

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main() -> int:
    port = os.environ.get("VLM_LISTEN_ADDRESS", "localhost:50051").rsplit(":", 1)[-1]
    address = sys.argv[1] if len(sys.argv) > 1 else f"localhost:{port}"
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
        except grpc.RpcError as error:
            print(f"unhealthy: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    print("serving" if serving else "not serving")
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())

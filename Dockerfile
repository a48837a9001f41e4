# The gateway: the public vlm.v1 gRPC API in front of Triton (see docker-compose.yml).
FROM python:3.11-slim
WORKDIR /app
COPY requirements-gateway.txt .
RUN pip install --no-cache-dir -r requirements-gateway.txt
COPY protos protos
RUN python -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. --grpc_python_out=. protos/vlm/v1/vlm.proto
# The gateway uses the light modules of vlm_serving only (parameter bounds, image sniffing, video headers, tensors,
# model names, error prefixes, model auto's route records); tests/unit/test_deployment.py imports the gateway from
# these alone.
COPY vlm_serving/__init__.py vlm_serving/errors.py vlm_serving/ensemble_client.py vlm_serving/pipelines.py vlm_serving/routing.py vlm_serving/tasks.py vlm_serving/tools.py vlm_serving/
COPY vlm_serving/generation/__init__.py vlm_serving/generation/sampling.py vlm_serving/generation/structured.py vlm_serving/generation/
COPY vlm_serving/preprocessing/__init__.py vlm_serving/preprocessing/chat.py vlm_serving/preprocessing/image_kind.py vlm_serving/preprocessing/images.py vlm_serving/preprocessing/video.py vlm_serving/preprocessing/
COPY gateway gateway
ENV VLM_LISTEN_ADDRESS=0.0.0.0:50051 \
    VLM_HTTP_ADDRESS=0.0.0.0:8080 \
    VLM_METRICS_ADDRESS=0.0.0.0 \
    PYTHONUNBUFFERED=1
EXPOSE 50051 8080 9090
USER 65532:65532
HEALTHCHECK --interval=10s --timeout=5s --retries=3 CMD ["python", "-m", "gateway.healthcheck"]
CMD ["python", "-m", "gateway"]

# The web UI (python -m vlm_client.webui) over the gateway's gRPC API, for the Kubernetes component
# deploy/kubernetes/components/webui:
#   docker build -f deploy/webui.Dockerfile -t vlm-serving/webui .
FROM python:3.11-slim
WORKDIR /app
COPY deploy/webui-requirements.txt .
RUN pip install --no-cache-dir -r webui-requirements.txt
COPY protos protos
RUN python -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. --grpc_python_out=. protos/vlm/v1/vlm.proto
# The client samples a video's frames for its preview as the server does (vlm_serving.preprocessing.video).
COPY vlm_serving/__init__.py vlm_serving/
COPY vlm_serving/preprocessing/__init__.py vlm_serving/preprocessing/video.py vlm_serving/preprocessing/
COPY clients/python/vlm_client vlm_client
ENV PYTHONUNBUFFERED=1
EXPOSE 7860
USER 65532:65532
ENTRYPOINT ["python", "-m", "vlm_client.webui"]

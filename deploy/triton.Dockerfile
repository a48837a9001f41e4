# Triton: NVIDIA's image plus the Python packages the model repository's Python models import.
# docker-compose mounts the checkout's model repository at /models; on Kubernetes the pods copy the one
# this image was built with (/opt/vlm/model_repository: each model's code, configs are rendered at start)
# and place the checkpoints with vlm_serving.deploy.fill_volumes (deploy/fill-requirements.txt: the object store).
# No USER: docker-compose runs it as the base image's default (root), as it renders configs into the
# bind-mounted checkout; Kubernetes runs it as the base image's user triton-server (uid 1000,
# deploy/kubernetes/triton/triton.yaml), which reads everything installed here.
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3
FROM ${TRITON_IMAGE}
WORKDIR /opt/vlm
COPY requirements-triton.txt .
RUN pip install --no-cache-dir -r requirements-triton.txt
COPY deploy/fill-requirements.txt .
RUN pip install --no-cache-dir -r fill-requirements.txt
COPY pyproject.toml .
COPY vlm_serving vlm_serving
RUN pip install --no-cache-dir --no-deps .
COPY model_repository model_repository
COPY deploy/vlm-dont-write-bytecode.pth .
RUN python3 -c "import shutil, sysconfig; shutil.copy('vlm-dont-write-bytecode.pth', sysconfig.get_paths()['purelib'])"
ENV PYTHONDONTWRITEBYTECODE=1

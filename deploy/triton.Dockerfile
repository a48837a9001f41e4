# Triton: NVIDIA's image plus the Python packages the model repository's Python models import.
# The model repository itself is mounted at /models (see docker-compose.yml), not baked in.
# No USER: docker-compose runs it as the base image's default (root), as it renders configs into the
# bind-mounted checkout; Kubernetes runs it as the base image's user triton-server (uid 1000,
# deploy/kubernetes/base/triton.yaml), which reads everything installed here.
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3
FROM ${TRITON_IMAGE}
WORKDIR /opt/vlm
COPY requirements-triton.txt .
RUN pip install --no-cache-dir -r requirements-triton.txt
COPY pyproject.toml .
COPY vlm_serving vlm_serving
RUN pip install --no-cache-dir --no-deps .
COPY deploy/vlm-dont-write-bytecode.pth .
RUN python3 -c "import shutil, sysconfig; shutil.copy('vlm-dont-write-bytecode.pth', sysconfig.get_paths()['purelib'])"
ENV PYTHONDONTWRITEBYTECODE=1

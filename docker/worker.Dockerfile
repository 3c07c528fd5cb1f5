# A CPU worker: the engines (torch's CPU build, ONNX Runtime), the embedded index and the store clients. Also runs
# beat, flower and ingest workers. Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t imgsearch-worker .
# BASE_IMAGE: any Debian-like image with Python 3.11 and pip (a local one where no registry is reachable).
# TORCH_INDEX: where torch's CPU build comes from (PyPI's default Linux wheel is the multi-GB CUDA build);
# TORCH_FIND_LINKS: a folder or URL of wheels pip looks in first (a torch CPU wheel already downloaded).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_FIND_LINKS=

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 IMGSEARCH_DATA_DIR=/data
WORKDIR /app
# the packages are the build context's (.dockerignore lists them, the same list for every image)
COPY . .
# this repository's own package: its dependencies' versions are set in pyproject.toml
# hadolint ignore=DL3013
RUN pip install -c docker/constraints.txt ".[worker,cpu,pinecone,gcs,postgres]" --extra-index-url "${TORCH_INDEX}" \
        ${TORCH_FIND_LINKS:+--find-links "${TORCH_FIND_LINKS}"} \
    && useradd --create-home --uid 10001 imgsearch \
    && mkdir -p /data && chown imgsearch /data
USER imgsearch
VOLUME ["/data"]
HEALTHCHECK --interval=15s --timeout=15s --start-period=120s --retries=3 CMD ["imgsearch", "health", "--worker"]
CMD ["imgsearch", "worker"]

# A CPU worker: the engines (torch's CPU build, ONNX Runtime), the embedded index and the store clients. Also runs
# beat, flower and ingest workers. Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t imgsearch-worker .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 IMGSEARCH_DATA_DIR=/data
WORKDIR /app
COPY pyproject.toml README.md ./
COPY api api
COPY workers workers
COPY pipeline pipeline
COPY engines engines
# torch's CPU wheel: PyPI's default Linux wheel is the multi-GB CUDA build
# this repository's own package: its dependencies' versions are set in pyproject.toml
# hadolint ignore=DL3013
RUN --mount=type=bind,source=docker/constraints.txt,target=/tmp/constraints.txt \
    pip install -c /tmp/constraints.txt --extra-index-url https://download.pytorch.org/whl/cpu ".[worker,cpu,pinecone,gcs,postgres]" \
    && useradd --create-home --uid 10001 imgsearch \
    && mkdir -p /data && chown imgsearch /data
USER imgsearch
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 CMD ["imgsearch", "health", "--worker"]
CMD ["imgsearch", "worker"]

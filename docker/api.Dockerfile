# The API: FastAPI and the queue's client, no model and no index (no torch), so it is small and starts in a
# second. Build from the repository root: docker build -f docker/api.Dockerfile -t imgsearch-api .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 IMGSEARCH_DATA_DIR=/data
WORKDIR /app
COPY pyproject.toml README.md ./
COPY api api
COPY workers workers
COPY pipeline pipeline
COPY engines engines
# the core (API) dependencies and the blob stores' clients; no `worker` extra: no torch, transformers, faiss
# this repository's own package: its dependencies' versions are set in pyproject.toml
# hadolint ignore=DL3013
RUN --mount=type=bind,source=docker/constraints.txt,target=/tmp/constraints.txt pip install -c /tmp/constraints.txt ".[gcs]" \
    && useradd --create-home --uid 10001 imgsearch \
    && mkdir -p /data && chown imgsearch /data
USER imgsearch
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 CMD ["imgsearch", "health"]
CMD ["imgsearch", "api", "--host", "0.0.0.0", "--port", "8000"]

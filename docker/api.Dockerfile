# The API: FastAPI and the queue's client, no model and no index (no torch), so it is small and starts in a
# second. Build from the repository root: docker build -f docker/api.Dockerfile -t imgsearch-api .
# BASE_IMAGE: any Debian-like image with Python 3.11 and pip (a local one where no registry is reachable).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 IMGSEARCH_DATA_DIR=/data
WORKDIR /app
# the packages are the build context's (.dockerignore lists them, the same list for every image)
COPY . .
# the core (API) dependencies and the blob stores' clients; no `worker` extra: no torch, transformers, faiss
# this repository's own package: its dependencies' versions are set in pyproject.toml
# hadolint ignore=DL3013
RUN pip install -c docker/constraints.txt ".[gcs]" \
    && useradd --create-home --uid 10001 imgsearch \
    && mkdir -p /data && chown imgsearch /data
USER imgsearch
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=10s --start-period=10s --retries=3 CMD ["imgsearch", "health"]
CMD ["imgsearch", "api", "--host", "0.0.0.0", "--port", "8000"]

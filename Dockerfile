# One image for the API and the CPU worker (the deployment issue splits them: a slim API image, CPU and GPU workers).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY api api
COPY workers workers
COPY pipeline pipeline
COPY engines engines
# the CPU build of torch: PyPI's default linux wheel is the multi-GB CUDA build
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu .
ENV IMGSEARCH_DATA_DIR=/data
CMD ["imgsearch", "api", "--host", "0.0.0.0", "--port", "8000"]

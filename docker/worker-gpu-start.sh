#!/bin/sh
# Build the engines for this GPU if they are not in the data volume yet (each GPU model gets its own plans),
# then serve. Extra arguments go to `imgsearch worker` (e.g. --queue).
set -eu
imgsearch engines build --backend "${IMGSEARCH_ENGINE_BACKEND:-tensorrt}" --precision "${IMGSEARCH_ENGINE_PRECISION:-fp16}"
exec imgsearch worker "$@"

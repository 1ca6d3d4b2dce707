#!/usr/bin/env bash
# Regenerate the Python code for proto/cvm/v1/*.proto (messages, gRPC stubs, type stubs).
# The generated files are committed; tests/test_proto_fresh.py fails when they are stale.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
out="${1:-proto}"
PATH="$(dirname "$PY"):$PATH" "$PY" -m grpc_tools.protoc -I proto \
    --python_out="$out" --grpc_python_out="$out" --mypy_out="$out" --mypy_grpc_out="$out" \
    proto/cvm/v1/*.proto

#!/usr/bin/env bash
# Regenerate the Python code for proto/cvm/v1/*.proto (messages, gRPC stubs, type stubs).
# The generated files are committed; tests/spine/test_proto_fresh.py fails when they are stale.
#
# The generators are pinned. Generated code refuses a runtime older than its generator
# (protobuf's ValidateProtobufRuntimeVersion, the stubs' GRPC_GENERATED_VERSION), so the
# grpcio-tools below sets cvmctl's floors: grpcio and grpcio-health-checking >= it, protobuf
# >= the protoc it bundles (tests/packaging/test_pyproject.py holds pyproject.toml to that).
# It is the oldest we support; newer runtimes (protobuf 5.x to 7.x) accept its code.
# Changing it means changing those floors.
#
# They run from virtualenvs of their own under .cache/gen-proto/ (git-ignored), made from
# PyPI on first use: grpcio-tools 1.66 wants protobuf < 6, mypy-protobuf's own generated
# code wants protobuf >= 6.32, so each has its own.
#
# Usage: scripts/gen-proto.sh [OUT_DIR]   (default: proto, i.e. in place)
# Environment: PYTHON, the interpreter the tool virtualenvs are made with (default .venv's).
set -euo pipefail
cd "$(dirname "$0")/.."

GRPCIO_TOOLS_VERSION=1.66.2 # bundles protoc 27.2: "Protobuf Python Version: 5.27.2"
MYPY_PROTOBUF_VERSION=5.1.0
MYPY_PROTOBUF_RUNTIME=6.33.6 # the protobuf mypy-protobuf runs on (its own gencode is 6.32.1)

PY="${PYTHON:-.venv/bin/python}"
out="${1:-proto}"
tools=.cache/gen-proto
mkdir -p "$tools"

# tool_venv NAME REQUIREMENT...: make (once) a virtualenv with exactly these requirements.
tool_venv() {
    local dir=$tools/$1
    shift
    [[ -f $dir/.complete ]] && return 0
    rm -rf "$dir"
    "$PY" -m venv "$dir"
    "$dir/bin/python" -m pip install -q --disable-pip-version-check "$@" >&2
    touch "$dir/.complete"
}

# One generator set-up at a time (tests may run this concurrently with a developer).
exec 9>"$tools/.lock"
flock 9
protoc_env=grpcio-tools-$GRPCIO_TOOLS_VERSION
mypy_env=mypy-protobuf-$MYPY_PROTOBUF_VERSION-protobuf-$MYPY_PROTOBUF_RUNTIME
tool_venv "$protoc_env" "grpcio-tools==$GRPCIO_TOOLS_VERSION"
tool_venv "$mypy_env" "mypy-protobuf==$MYPY_PROTOBUF_VERSION" "protobuf==$MYPY_PROTOBUF_RUNTIME"
flock -u 9

# protoc finds the protoc-gen-mypy / protoc-gen-mypy_grpc plugins on PATH.
PATH="$PWD/$tools/$mypy_env/bin:$PATH" "$tools/$protoc_env/bin/python" -m grpc_tools.protoc -I proto \
    --python_out="$out" --grpc_python_out="$out" --mypy_out="$out" --mypy_grpc_out="$out" \
    proto/cvm/v1/*.proto

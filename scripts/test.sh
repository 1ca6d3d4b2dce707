#!/usr/bin/env bash
# Run every check the project has: set-up (idempotent), lint, types, the wheel as users
# install it (scripts/test-wheel.sh), tests.
# Extra arguments go to pytest, e.g. scripts/test.sh -k relay -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check . >/dev/null || { .venv/bin/ruff format --check .; exit 1; }
echo "== mypy"
.venv/bin/mypy
echo "== wheel"
scripts/test-wheel.sh
echo "== pytest"
set +e
.venv/bin/pytest "$@"
status=$?
set -e
if ((status == 5)); then
    echo "pytest collected no tests" >&2
    exit 1
fi
exit "$status"

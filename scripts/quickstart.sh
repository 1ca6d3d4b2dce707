#!/usr/bin/env bash
# The main job on a fresh machine: set up, then `cvmctl bench nginx` on the built-in dev guest
# (booted through a cvm-hostd started for the run), printing the statistics and storing the
# run. Extra arguments go to cvmctl bench, e.g. scripts/quickstart.sh --duration 10.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/cvmctl bench nginx "$@"
echo
echo "stored: .venv/bin/cvmctl results ls; figures: .venv/bin/cvmctl report RUN -o figures/"

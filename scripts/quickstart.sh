#!/usr/bin/env bash
# The first thing to run: set up, start a guest agent on a local unix socket, ask it
# for its health and its view of the machine, and stop it again.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

tmp=$(mktemp -d)
trap 'kill "$agent" 2>/dev/null; wait "$agent" 2>/dev/null; rm -rf "$tmp"' EXIT
.venv/bin/cvm-agent --listen "unix://$tmp/agent.sock" --log-format json --no-mount-debugfs --state-dir "$tmp/state" 2>"$tmp/agent.log" &
agent=$!
for _ in $(seq 100); do [[ -S $tmp/agent.sock ]] && break; sleep 0.05; done

set -x
.venv/bin/cvmctl agent health --connect "unix://$tmp/agent.sock"
.venv/bin/cvmctl agent info --connect "unix://$tmp/agent.sock"

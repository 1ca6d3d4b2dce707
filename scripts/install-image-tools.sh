#!/usr/bin/env bash
# Install what `cvmctl image build debian` runs, idempotently (Debian 12, bookworm):
#   mmdebstrap   lays down the Debian tree from Debian's packages (its customize hook installs
#                cvmctl's wheel, the unit and the man pages)
#   e2fsprogs    mkfs.ext4 -d turns the tree into the root file system image
# The packages come from the mirror apt already uses; nothing else is downloaded.
set -euo pipefail

log() { printf 'install-image-tools: %s\n' "$*" >&2; }

if command -v mmdebstrap >/dev/null && command -v mkfs.ext4 >/dev/null; then
    log "already installed: $(mmdebstrap --version)"
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    log "must run as root (apt-get)"
    exit 1
fi

# Another apt-get (a parallel set-up) may hold the lock: wait for it rather than fail.
install() {
    local attempt
    for attempt in 1 2 3 4 5 6 7 8 9 10; do
        if DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends mmdebstrap e2fsprogs; then
            return 0
        fi
        log "apt-get failed (attempt $attempt; lock busy?): retrying in 15 s"
        sleep 15
    done
    return 1
}
if ! install; then
    apt-get update -q
    install
fi
log "done: $(mmdebstrap --version)"

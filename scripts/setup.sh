#!/usr/bin/env bash
# Set up everything cvmctl needs on a Debian 12 (bookworm) machine, idempotently:
#   - Debian packages: Python, the tools the tests and benchmarks drive (QEMU 10 from
#     bookworm-backports, the dev guest's kernel and busybox, vhost-device-vsock, promtool);
#   - a virtualenv in .venv with cvmctl installed in editable mode with its dev extras and
#     every optional one (all: verify, report, host).
# A second run does nothing that is already done (it checks before it installs), so every
# entry point (scripts/quickstart.sh, scripts/test.sh, .ci/run) starts by calling it.
#
# Environment: CVM_SKIP_SYSTEM=1 skips the Debian packages (no root, or already set up).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

log() { printf 'setup: %s\n' "$*" >&2; }

# Packages installed from bookworm itself. Service packages (prometheus) must not start
# their daemons at install time: tests start what they need, on loopback.
APT_PACKAGES=(
    python3 python3-venv python3-dev gcc
    prometheus         # promtool, and the server the metrics tests scrape with
    zsh                # the completion tests check `cvmctl completion zsh` with zsh -n
    ovmf               # /usr/share/ovmf/OVMF.fd: the firmware both arms of a CVM comparison boot
    numactl            # [pinning] numa_node starts QEMU under numactl
    iproute2           # ip netns / ip tuntap: the tap network path's namespace
    passt              # the rootless network path with UDP ([network] mode = "passt")
    chromium           # the HTML report test renders the page in headless Chromium
)

apt_updated=0
apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    ((${#missing[@]})) || return 0
    if ((apt_updated == 0)); then
        apt-get update -q
        apt_updated=1
    fi
    log "installing ${missing[*]}"
    # policy-rc.d 101 = "do not start services" for the duration of this install only.
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && created_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" || {
        ((created_policy)) && rm -f "$policy"
        return 1
    }
    ((created_policy)) && rm -f "$policy"
    return 0
}

if [[ ${CVM_SKIP_SYSTEM:-0} != 1 ]]; then
    if [[ $(id -u) -ne 0 ]]; then
        log "not root: skipping Debian packages (run as root once, or set CVM_SKIP_SYSTEM=1)"
    else
        apt_install "${APT_PACKAGES[@]}"
        for script in install-qemu.sh install-guest-kernel.sh install-vhost-device-vsock.sh \
            install-workload-tools.sh install-monitoring.sh install-libvirt.sh; do
            if [[ -f scripts/$script ]]; then
                bash "scripts/$script" >&2
            fi
        done
        # mmdebstrap for `cvmctl image build debian` (the Debian guest)
        bash scripts/install-image-tools.sh >&2
    fi
fi

# The virtualenv, rebuilt only when pyproject.toml changed (or the venv is broken).
python=${CVM_PYTHON:-/usr/bin/python3}
[[ -x $python ]] || python=$(command -v python3)
stamp=.venv/.cvmctl-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ ! -x .venv/bin/python ]] || ! .venv/bin/python -c 'import sys' 2>/dev/null; then
    log "creating .venv with $($python --version)"
    rm -rf .venv
    "$python" -m venv .venv
    rm -f "$stamp"
fi
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]] || ! .venv/bin/python -c 'import cvmctl' 2>/dev/null; then
    log "installing cvmctl and its dependencies into .venv"
    .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
    .venv/bin/python -m pip install -q --disable-pip-version-check -e "$repo[dev,all]"
    echo "$want" >"$stamp"
fi
# The optional libvirt binding (`cvm-hostd --libvirt`) builds against libvirt-dev: added
# only where pkg-config finds libvirt (scripts/install-libvirt.sh installs it).
if ! .venv/bin/python -c 'import libvirt' 2>/dev/null && pkg-config --exists libvirt 2>/dev/null; then
    log "installing the libvirt extra into .venv"
    .venv/bin/python -m pip install -q --disable-pip-version-check -e "$repo[libvirt]"
fi
# benchmarks/fuzz.py's fuzzer, optional: only a prebuilt wheel (a source build needs clang and
# libFuzzer); without one, fuzz.py says how to get it and everything else works.
if ! .venv/bin/python -c 'import atheris' 2>/dev/null; then
    .venv/bin/python -m pip install -q --disable-pip-version-check --only-binary=atheris -e "$repo[fuzz]" \
        || log "no atheris wheel for this platform: benchmarks/fuzz.py will not run"
fi
log "ready: $(.venv/bin/cvmctl --version)"

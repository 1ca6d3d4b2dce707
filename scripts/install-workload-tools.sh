#!/usr/bin/env bash
# Install the Debian packages that `cvmctl bench` drives, idempotently (Debian 12, bookworm).
#
# Each workload in workloads/catalogue.py names the binaries it needs and the package that
# ships them (Workload.guest_tools / Workload.host_tools); this is the union, kept in step
# by tests/workloads/test_install_script.py. A missing tool makes `cvmctl bench` fail
# with one line naming the package and this script.
#
#   package            binaries           used by
#   nginx              nginx              nginx (server, in the guest)
#   wrk                wrk                nginx (client, on the host)
#   iperf3             iperf3             iperf-tcp, iperf-udp (server and client)
#   iputils-ping       ping               ping
#   memcached          memcached          memcached (server)
#   libmemcached-tools memcslap           memcached (client; memtier_benchmark is not packaged)
#   fio                fio                fio
#   sysbench           sysbench           sysbench, memory
#   stress-ng          stress-ng          sysbench
#   mbw                mbw                memory
#   msr-tools          rdmsr, wrmsr       (by hand: cross-checking the vmexit rdmsr path)
#   cpuid              cpuid              (by hand: what the vmexit leaves return)
#   kmod               modprobe           vmexit (modprobe msr for /dev/cpu/N/msr)
#   blender            blender            blender (Cycles on the CPU; with its 153 dependencies
#                                         about 640 MB installed, 170 MB of archives - the
#                                         price of the study's rendering item)
#
# Service packages (nginx, memcached) must not start their daemons at install time: the
# benchmarks start their own instance with a private config on a chosen port. policy-rc.d
# returning 101 ("action forbidden") is how Debian's invoke-rc.d is told so; it is in place
# only while apt-get runs, and only if no policy existed before.
#
# Environment: CVM_APT_OPTS adds options to apt-get install (e.g. "-t bookworm-backports").
set -euo pipefail

PACKAGES=(
    nginx wrk iperf3 iputils-ping memcached libmemcached-tools fio
    sysbench stress-ng mbw msr-tools cpuid kmod
    blender
)

log() { printf 'install-workload-tools: %s\n' "$*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
    log "must run as root (apt-get)"
    exit 1
fi

# /dev/cpu/N/msr for the vmexit workload's rdmsr timing: best effort (a kernel without the
# msr module, like this project's CI machine, reports rdmsr as unavailable instead).
load_msr() { [[ -e /dev/cpu/0/msr ]] || modprobe msr 2>/dev/null || log "no msr module: vmexit will skip rdmsr"; }

missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]} == 0)); then
    log "all installed"
    load_msr
    exit 0
fi

policy=/usr/sbin/policy-rc.d
created_policy=0
cleanup() { ((created_policy)) && rm -f "$policy"; return 0; }
trap cleanup EXIT
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    created_policy=1
fi

log "installing ${missing[*]}"
apt-get update -q
# shellcheck disable=SC2086  # CVM_APT_OPTS is a list of words on purpose
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends ${CVM_APT_OPTS:-} "${missing[@]}"
load_msr
log "done"

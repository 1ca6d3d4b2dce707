#!/usr/bin/env bash
# Install the monitoring stack cvmctl is tested with, from Debian: `prometheus` (the server
# and promtool) and `prometheus-node-exporter`. Grafana is not packaged by Debian; the
# dashboard in deploy/grafana/ is checked by the tests against a real Prometheus instead.
#
# Idempotent: packages already installed are not touched; nothing at all happens when both
# are. No service is started by the install: an /usr/sbin/policy-rc.d that answers 101
# ("action forbidden", invoke-rc.d(8) and Debian Policy's policy-rc.d interface) is in
# place while apt runs, and whatever policy-rc.d was there before is put back afterwards.
# Tests and benchmarks start their own Prometheus on loopback with a private config.
#
# Called by scripts/setup.sh. Environment: CVM_APT_OPTS, extra words for apt-get install;
# CVM_POLICY_RC_D, where policy-rc.d is (tests point it elsewhere).
set -euo pipefail

log() { printf 'install-monitoring: %s\n' "$*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
    log "must run as root (apt-get)"
    exit 1
fi

PACKAGES=(prometheus prometheus-node-exporter)
missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]} == 0)); then
    log "already installed: ${PACKAGES[*]}"
    exit 0
fi

# shellcheck source=scripts/lib/apt.sh
. "$(dirname "$0")/lib/apt.sh"
forbid_service_starts scripts/install-monitoring.sh

log "installing ${missing[*]} (services are not started)"
apt-get update -q
# shellcheck disable=SC2086  # CVM_APT_OPTS is a list of words on purpose
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends ${CVM_APT_OPTS:-} "${missing[@]}"
prometheus --version 2>&1 | head -n1 >&2
log "done"

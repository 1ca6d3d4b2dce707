# Shared by the set-up scripts that add Debian suites (source it; bash only).
#
# debian_mirror: print the mirror URI of the machine's own bookworm entry, from the deb822
#   /etc/apt/sources.list.d/debian.sources or the classic /etc/apt/sources.list, falling back
#   to deb.debian.org; proxied or snapshot set-ups keep working because new suites use it too.
# ensure_bookworm_backports: add the bookworm-backports suite unless some sources file names
#   it already (scripts/install-qemu.sh writes the same line to the same file, so whichever
#   runs first wins and the other leaves it alone).

debian_mirror() {
    local mirror=""
    if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
        # The URIs: line of the stanza whose Suites: lists bookworm.
        mirror=$(awk '
            /^URIs:/   { uri = $2 }
            /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == "bookworm") { print uri; exit } }
            /^$/       { uri = "" }
        ' /etc/apt/sources.list.d/debian.sources)
    fi
    if [[ -z "$mirror" && -f /etc/apt/sources.list ]]; then
        mirror=$(awk '$1 == "deb" && $3 == "bookworm" { print $2; exit }' /etc/apt/sources.list)
    fi
    echo "${mirror:-http://deb.debian.org/debian}"
}

ensure_bookworm_backports() {
    local list=/etc/apt/sources.list.d/bookworm-backports.list mirror
    if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
        mirror=$(debian_mirror)
        echo "deb ${mirror} bookworm-backports main" >"$list"
        echo "added ${list} (${mirror})"
    fi
}

# forbid_service_starts WHO: until the calling script exits, /usr/sbin/policy-rc.d (or
#   $CVM_POLICY_RC_D) answers 101 ("action forbidden", invoke-rc.d(8) and Debian Policy's
#   policy-rc.d interface), so packages installed meanwhile do not start their daemons; the
#   policy-rc.d that was there before is put back by an EXIT trap. WHO names the script in
#   the file it writes.
forbid_service_starts() {
    _cvm_policy=${CVM_POLICY_RC_D:-/usr/sbin/policy-rc.d}
    _cvm_policy_saved=""
    if [[ -e $_cvm_policy ]]; then
        _cvm_policy_saved=$(mktemp "$_cvm_policy.cvmctl.XXXXXX")
        cp -p "$_cvm_policy" "$_cvm_policy_saved"
    fi
    trap _cvm_restore_policy EXIT
    printf '#!/bin/sh\n# written by cvmctl %s for the duration of one install\nexit 101\n' "$1" >"$_cvm_policy"
    chmod 0755 "$_cvm_policy"
}

_cvm_restore_policy() {
    if [[ -n $_cvm_policy_saved ]]; then
        mv -f "$_cvm_policy_saved" "$_cvm_policy"
    else
        rm -f "$_cvm_policy"
    fi
}

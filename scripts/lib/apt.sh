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

#!/usr/bin/env bash
# Build cvmctl's wheel and install it, not editable, into fresh virtualenvs, as users do:
#   guest   pip install cvmctl                          the agent's set: no cryptography
#   full    pip install 'cvmctl[host,verify,report]'   everything
#   floors  both sets again at the oldest versions pyproject.toml allows (oldest Python only)
# with the oldest Python cvmctl supports (3.11, Debian 12's) and the newest this machine has
# (Debian 12 packages nothing newer; pyenv's are looked for). In each: cvm-agent --help, an
# agent on a unix socket answering `cvmctl agent health` with SERVING, cvmctl --version,
# and what the set's extras are for (attest verify with the wheel's pinned AMD roots,
# completion, figures) or, without them, the one-line error naming the extra.
#
# Wheels only (--only-binary :all:): "installs anywhere" means no compiler needed. Network:
# PyPI only, through pip's own cache. Needs .venv (scripts/setup.sh) to build the wheel.
#
# Environment: CVM_WHEEL_PYTHONS="PY..." tests exactly these interpreters (the first gets
# the floors too).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
started=$SECONDS

log() { printf 'test-wheel: %s\n' "$*" >&2; }
fail() {
    printf 'test-wheel: FAILED: %s\n' "$*" >&2
    exit 1
}

work=$(mktemp -d /tmp/cvm-wheel.XXXXXX)
agent_pid=
cleanup() {
    if [[ -n $agent_pid ]]; then
        kill "$agent_pid" 2>/dev/null || true
        wait "$agent_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

# -- interpreters --------------------------------------------------------------------------

py_version() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null; }
usable() { "$1" -c 'import ensurepip, ssl, sqlite3, venv' 2>/dev/null; }

pythons=()
if [[ -n ${CVM_WHEEL_PYTHONS:-} ]]; then
    read -r -a pythons <<<"$CVM_WHEEL_PYTHONS"
else
    oldest=/usr/bin/python3.11
    [[ -x $oldest ]] || oldest=$(command -v python3.11 || true)
    [[ -n $oldest ]] && usable "$oldest" || fail "no usable Python 3.11 (the oldest supported)"
    pythons=("$oldest")
    newest= newest_version=3.11
    # Real interpreters only (pyenv's shims answer for whichever version is selected).
    for candidate in /usr/bin/python3.1[2-9] /usr/local/bin/python3.1[2-9] \
        "${PYENV_ROOT:-${HOME:-/root}/.pyenv}"/versions/3.1[1-9]*/bin/python3 \
        /root/.pyenv/versions/3.1[1-9]*/bin/python3; do
        [[ -x $candidate ]] || continue
        version=$(py_version "$candidate") || continue
        if [[ $(printf '%s\n%s\n' "$newest_version" "$version" | sort -V | tail -1) != "$newest_version" ]] \
            && usable "$candidate"; then
            newest=$candidate newest_version=$version
        fi
    done
    if [[ -n $newest ]]; then
        pythons+=("$newest")
    else
        log "NOTE: no Python newer than 3.11 on this machine (Debian 12 has only 3.11; apt offers"
        log "      python3.13 and 3.14 only from unstable, which needs unstable's libc): testing 3.11 only"
    fi
fi
for py in "${pythons[@]}"; do
    usable "$py" || fail "$py: not a Python with venv and ensurepip"
    log "python: $py ($("$py" --version 2>&1))"
done

# -- the wheel -----------------------------------------------------------------------------

[[ -x .venv/bin/python ]] || fail ".venv is missing: run scripts/setup.sh first"
# From a copy holding what a clone would (tracked and new files, nothing git ignores), so
# that neither a stale build/ nor anything else lying in the working tree reaches the wheel.
src=$work/src
mkdir -p "$src"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' f; do [[ -e $f ]] && printf '%s\0' "$f"; done \
        | tar --null -T - -cf - | tar -xf - -C "$src"
else
    tar --exclude=./.venv --exclude=./.git --exclude=./.cache --exclude=./build --exclude=./dist \
        --exclude='*.egg-info' --exclude=__pycache__ -cf - . | tar -xf - -C "$src"
fi
.venv/bin/python -m pip wheel -q --disable-pip-version-check --no-deps -w "$work/dist" "$src" >&2
wheels=("$work"/dist/cvmctl-*-py3-none-any.whl)
[[ -f ${wheels[0]} ]] || fail "no pure-Python wheel built"
wheel=${wheels[0]}
log "built $(basename "$wheel") in $((SECONDS - started)) s"

# Every file of every shipped package is in the wheel (pem trust roots, py.typed, stubs),
# nothing else of the repository is, and the licence is.
.venv/bin/python - "$wheel" "$src" <<'EOF'
import fnmatch, sys, tomllib, zipfile
from pathlib import Path

wheel, src = sys.argv[1], Path(sys.argv[2])
names = set(zipfile.ZipFile(wheel).namelist())
find = tomllib.loads((src / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
missing, tops = [], set()
for where in find["where"]:
    for top in sorted((src / where).iterdir()):
        if not (top.is_dir() and top.name.isidentifier()):
            continue  # cvmctl.egg-info, made by the build
        if not any(fnmatch.fnmatchcase(top.name, p) for p in find["include"]):
            continue
        tops.add(top.name)
        for path in top.rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                name = path.relative_to(src / where).as_posix()
                if name not in names:
                    missing.append(name)
stray = sorted(n for n in names if n.split("/")[0] not in tops and ".dist-info/" not in n)
licence = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
problems = [f"missing from the wheel: {missing}"] * bool(missing)
problems += [f"in the wheel but not a package: {stray}"] * bool(stray)
problems += ["no LICENSE in the wheel's dist-info"] * (not licence)
if problems:
    sys.exit("test-wheel: FAILED: " + "; ".join(problems))
print(f"test-wheel: wheel holds {len(names)} files: packages {sorted(tops)}, LICENSE", file=sys.stderr)
EOF

# The floors as constraints: every `name>=X` of the base set and the user-facing extras, as
# `name==X` (the [dev] extra is for working on cvmctl, not a user's install).
.venv/bin/python - "$wheel" >"$work/floors.txt" <<'EOF'
import re, sys, zipfile
from email.parser import Parser

with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    message = Parser().parsestr(z.read(meta).decode())
floors = {}
for requirement in message.get_all("Requires-Dist") or []:
    spec, _, marker = requirement.partition(";")
    if 'extra == "dev"' in marker:
        continue
    match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9.]*)\s*", spec)
    if not match:
        sys.exit(f"test-wheel: FAILED: no plain >= floor in {requirement!r}")
    floors[match.group(1).lower()] = match.group(2)
print("\n".join(f"{name}=={version}" for name, version in sorted(floors.items())))
EOF
log "floors: $(tr '\n' ' ' <"$work/floors.txt")"

# -- the checks ----------------------------------------------------------------------------

fixtures=$repo/tests/fixtures/attestation/snp

# install DIR PYTHON PIP-ARGS...: a fresh virtualenv with the wheel installed as given.
install() {
    local dir=$1 py=$2
    shift 2
    "$py" -m venv "$dir"
    "$dir/bin/python" -m pip install -q --disable-pip-version-check --only-binary=:all: "$@" >&2 \
        || fail "$(basename "$dir"): pip install $*"
}

# check DIR SET: what every installed set must do, then what SET (guest or full) adds.
check() {
    local dir=$1 set=$2 label
    label=$(basename "$dir")
    local bin=$dir/bin sock=$work/$label.sock state=$work/$label-state out rc
    local t0=$SECONDS
    cd "$work" # nothing of the checkout on sys.path

    "$bin/python" -c 'import cvmctl, sys; sys.exit("site-packages" not in cvmctl.__file__)' \
        || fail "$label: cvmctl is not imported from the venv's site-packages"
    out=$("$bin/cvmctl" --version) || fail "$label: cvmctl --version"
    [[ $out == "cvmctl "* ]] || fail "$label: cvmctl --version printed '$out'"
    "$bin/cvmctl" --help >/dev/null || fail "$label: cvmctl --help"
    "$bin/cvm-agent" --help >/dev/null || fail "$label: cvm-agent --help"
    "$bin/cvm-hostd" --help >/dev/null || fail "$label: cvm-hostd --help"

    # An agent as the README runs one without a VM (and without mounting debugfs here).
    "$bin/cvm-agent" --listen "unix://$sock" --state-dir "$state" --no-mount-debugfs \
        >"$work/$label-agent.log" 2>&1 &
    agent_pid=$!
    for _ in $(seq 150); do
        [[ -S $sock ]] && break
        kill -0 "$agent_pid" 2>/dev/null || fail "$label: cvm-agent exited: $(tail -3 "$work/$label-agent.log")"
        sleep 0.1
    done
    out=$("$bin/cvmctl" agent health --connect "unix://$sock" --timeout 20) \
        || fail "$label: cvmctl agent health: $out; agent log: $(tail -3 "$work/$label-agent.log")"
    [[ $out == SERVING ]] || fail "$label: health said '$out', not SERVING"
    kill -TERM "$agent_pid"
    rc=0
    wait "$agent_pid" || rc=$?
    agent_pid=
    ((rc == 0)) || fail "$label: cvm-agent exited $rc on SIGTERM: $(tail -3 "$work/$label-agent.log")"

    case $set in
        guest)
            if "$bin/python" -c 'import cryptography' 2>/dev/null; then
                fail "$label: the guest set installed cryptography"
            fi
            rc=0
            out=$("$bin/cvmctl" attest verify report.bin 2>&1) || rc=$?
            [[ $rc == 2 && $out == "cvmctl: error: cvmctl attest verify needs the verify extra: pip install 'cvmctl[verify]'" ]] \
                || fail "$label: attest without cryptography: exit $rc, '$out'"
            ;;
        full)
            "$bin/python" -c 'import cryptography, matplotlib, shtab' || fail "$label: extras missing"
            "$bin/cvmctl" attest verify "$fixtures/genoa_v3_msft_report.bin" \
                --certs "$fixtures/genoa_v3_msft_vcek.pem" --at 2026-11-26T00:00:00Z >/dev/null \
                || fail "$label: attest verify of a Genoa report against the wheel's pinned AMD roots"
            "$bin/cvmctl" completion bash | bash -n || fail "$label: cvmctl completion bash"
            "$bin/python" -c 'import matplotlib; matplotlib.use("Agg"); from matplotlib.figure import Figure
f = Figure(); f.subplots().bar([1, 2], [3, 4]); f.savefig("'"$work/$label"'.png")' \
                || fail "$label: matplotlib cannot draw"
            ;;
    esac
    cd "$repo"
    local versions
    versions=$("$bin/python" -c 'from importlib.metadata import version, PackageNotFoundError
def v(name):
    try:
        return f"{name} {version(name)}"
    except PackageNotFoundError:
        return f"no {name}"
print(", ".join(v(n) for n in ("grpcio", "protobuf", "trio", "cryptography")))')
    log "ok: $label ($("$bin/python" --version); $versions) checked in $((SECONDS - t0)) s"
}

for i in "${!pythons[@]}"; do
    py=${pythons[$i]}
    tag=py$(py_version "$py")
    t0=$SECONDS
    install "$work/$tag-guest" "$py" "$wheel"
    log "installed $tag-guest in $((SECONDS - t0)) s"
    check "$work/$tag-guest" guest
    t0=$SECONDS
    install "$work/$tag-full" "$py" "$wheel[host,verify,report]"
    log "installed $tag-full in $((SECONDS - t0)) s"
    check "$work/$tag-full" full
    if ((i == 0)); then
        install "$work/$tag-floors-guest" "$py" -c "$work/floors.txt" "$wheel"
        check "$work/$tag-floors-guest" guest
        install "$work/$tag-floors-full" "$py" -c "$work/floors.txt" "$wheel[host,verify,report]"
        check "$work/$tag-floors-full" full
    fi
done

venvs=("$work"/py*/bin/python)
log "passed: ${#pythons[@]} Python(s), ${#venvs[@]} virtualenvs, in $((SECONDS - started)) s"

"""Can this host run a normal VM, an SEV-SNP guest or a TDX guest? Each requirement checked.

In the manner of libvirt's ``virt-host-validate`` and virtee's ``snphost ok``: one line per
requirement, ``ok``, ``missing`` or ``warn``, and for each that is not ``ok`` what to do.
A TEE is *ready* when none of its requirements is missing; a warning never blocks.

Two halves, as elsewhere in the daemon:

* :func:`gather` reads the host (under an injectable ``root``) and asks QEMU itself which
  object types it knows (``-object help``): the version string alone would mislead, since
  distributions backport and strip features;
* :func:`evaluate` is pure: facts in, a :class:`HostReport` out.

What each TEE needs (facts and sources in docs/platform.md, "Host requirements"):

normal    QEMU; KVM when ``/dev/kvm`` opens and the CPU shows ``vmx``/``svm``, else TCG
          (slower, never missing); an agent channel (vhost-vsock or vhost-device-vsock).
sev-snp   the CPU flag ``sev_snp`` (X86_FEATURE_SEV_SNP: firmware and BIOS enabled it),
          usable KVM with ``svm``, ``kvm_amd.sev_snp=Y``, ``/dev/sev`` readable and writable
          (QEMU issues the launch commands through it), SNP firmware >= 1.51 (read with the
          ``SEV_PLATFORM_STATUS`` ioctl; a warning when it cannot be read), QEMU with
          ``sev-snp-guest`` (9.1 and later), an SNP-capable OVMF.
tdx       the CPU flag ``tdx_host_platform``, usable KVM with ``vmx``, ``kvm_intel.tdx=Y``,
          QEMU with ``tdx-guest`` (10.1 and later), a TDVF (OVMF with TDX metadata); the
          Quote Generation Service that QEMU forwards the TD's quote requests to is a
          warning when missing (the TD runs, attestation fails).

For every TEE hugepages are reported for information: only the shared part of a
confidential guest's memory can use them (private memory comes from guest_memfd).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import re
import shutil
import stat
import struct
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

from cvmcore.cpuinfo import cpu_flags
from host_daemon.accel import KvmProbe, open_error, probe_channel, probe_kvm
from host_daemon.firmware import FirmwareCandidate, find_firmware, first_fit
from host_daemon.spec import QgsAddress

Status = Literal["ok", "missing", "warn"]
TeeName = Literal["normal", "sev-snp", "tdx"]
TEES: Final[tuple[TeeName, ...]] = ("normal", "sev-snp", "tdx")

#: The first QEMU release with each confidential-guest object (qapi/qom.json "Since:").
QEMU_SINCE: Final = {"sev-snp-guest": "9.1", "tdx-guest": "10.1"}
#: SEV-SNP firmware the KVM SNP host support requires (AMD's SNP setup guide: API 1.51).
MIN_SNP_FIRMWARE: Final = (1, 51)
#: Intel's Quote Generation Service: its unix socket (used when qgs.conf sets no port) and config.
QGS_SOCKET: Final = "var/run/tdx-qgs/qgs.socket"
QGS_CONFIG: Final = "etc/qgs.conf"
QEMU_PROBE_SECONDS: Final = 10.0

# linux/psp-sev.h: SEV_ISSUE_CMD = _IOWR('S', 0x0, struct sev_issue_cmd) with the packed
# struct {u32 cmd; u64 data; u32 error} (16 bytes); SEV_PLATFORM_STATUS = 1 fills the packed
# struct sev_user_data_status {u8 api_major, api_minor, state; u32 flags; u8 build; u32 guest_count}.
SEV_ISSUE_CMD: Final = (3 << 30) | (16 << 16) | (ord("S") << 8) | 0
SEV_PLATFORM_STATUS: Final = 1
_SEV_STATUS = struct.Struct("<BBBIBI")
_SEV_CMD = struct.Struct("<IQI")


@dataclass(frozen=True)
class Check:
    """One requirement: its state, what was found, and what to do when it is not ok."""

    name: str
    status: Status
    detail: str
    remedy: str = ""

    def to_json(self) -> dict[str, str]:
        data = {"name": self.name, "status": self.status, "detail": self.detail}
        if self.remedy:
            data["remedy"] = self.remedy
        return data


@dataclass(frozen=True)
class HostReport:
    """The checks for one TEE and the verdict."""

    tee: TeeName
    checks: tuple[Check, ...]
    accel: str = ""  # what a VM of this kind would run under: kvm or tcg

    @property
    def ready(self) -> bool:
        return not any(c.status == "missing" for c in self.checks)

    def missing(self) -> list[Check]:
        return [c for c in self.checks if c.status == "missing"]

    def reasons(self) -> str:
        """One line listing what is missing, with the remedies, for an error message."""
        parts = [f"{c.name}: {c.detail}" + (f" ({c.remedy})" if c.remedy else "") for c in self.missing()]
        return f"this host cannot run a {self.tee} guest: " + "; ".join(parts)

    def to_json(self) -> dict[str, object]:
        return {
            "tee": self.tee,
            "ready": self.ready,
            "accel": self.accel,
            "checks": [c.to_json() for c in self.checks],
        }


@dataclass(frozen=True)
class QemuCaps:
    """What QEMU says about itself."""

    binary: str
    found: bool
    version: tuple[int, ...] = ()
    version_text: str = ""
    object_types: frozenset[str] = frozenset()
    error: str = ""


@dataclass(frozen=True)
class DeviceAccess:
    path: str
    exists: bool
    readable_writable: bool = False
    error: str = ""


@dataclass(frozen=True)
class HostFacts:
    """Everything :func:`evaluate` needs, read once by :func:`gather`."""

    kvm: KvmProbe
    kvm_params: Mapping[str, str]  # "kvm_amd.sev_snp" -> "Y"
    dev_sev: DeviceAccess
    snp_firmware: tuple[int, int, int] | None  # api major, minor, build
    snp_firmware_note: str
    qemu: QemuCaps
    firmware: Mapping[str, tuple[FirmwareCandidate, ...]]  # tee -> candidates looked at
    qgs: QgsAddress | None
    qgs_note: str
    hugepages: Mapping[str, tuple[int, int]]  # "2048kB" -> (total, free)
    vhost_vsock: bool
    vhost_device_vsock: str | None
    cpu_flags: frozenset[str] = field(default_factory=frozenset)


# -- pure parsing ----------------------------------------------------------------------------


def parse_qemu_version(text: str) -> tuple[int, ...]:
    """``QEMU emulator version 10.0.2 (Debian ...)`` -> (10, 0, 2); () when not found."""
    m = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", text)
    if not m:
        return ()
    return tuple(int(g) for g in m.groups() if g is not None)


def parse_object_help(text: str) -> frozenset[str]:
    """The type names of ``qemu-system-x86_64 -object help`` (an indented list under a title)."""
    names = set()
    for line in text.splitlines():
        if line.startswith((" ", "\t")) and line.strip():
            names.add(line.split()[0])
    return frozenset(names)


def parse_sev_status(data: bytes) -> tuple[int, int, int]:
    """(api_major, api_minor, build) from a ``struct sev_user_data_status``."""
    major, minor, _state, _flags, build, _guests = _SEV_STATUS.unpack_from(data)
    return major, minor, build


def parse_qgs_config(text: str) -> int | None:
    """The vsock port ``qgs.conf`` sets (``port = 4050``), or None (then QGS uses its unix socket)."""
    for line in text.splitlines():
        m = re.fullmatch(r"\s*port\s*=\s*(\d+)\s*(?:#.*)?", line)
        if m:
            port = int(m.group(1))
            return port or None
    return None


def parse_hugepages(sizes: Mapping[str, tuple[str, str]]) -> dict[str, tuple[int, int]]:
    out = {}
    for size, (total, free) in sizes.items():
        with contextlib.suppress(ValueError):
            out[size] = (int(total), int(free))
    return out


# -- reading the host ------------------------------------------------------------------------


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None


#: QEMU's answers by (resolved binary, its mtime): a daemon asks before every CVM start, and
#: the answer changes only when the binary does.
_qemu_answers: dict[tuple[str, int], QemuCaps] = {}


def probe_qemu(binary: str = "qemu-system-x86_64") -> QemuCaps:
    """Ask QEMU its version and its user-creatable object types (two short runs, no guest),
    once per binary as long as it is not replaced."""
    resolved = shutil.which(binary)
    try:
        key = (resolved, os.stat(resolved).st_mtime_ns) if resolved else None
    except OSError:
        key = None
    if key is not None and key in _qemu_answers:
        return _qemu_answers[key]
    caps = _ask_qemu(binary)
    if key is not None and caps.found:
        _qemu_answers[key] = caps
    return caps


def _ask_qemu(binary: str) -> QemuCaps:
    try:
        version = subprocess.run(
            [binary, "-version"], capture_output=True, text=True, timeout=QEMU_PROBE_SECONDS, check=False
        )
        objects = subprocess.run(
            [binary, "-object", "help"],
            capture_output=True,
            text=True,
            timeout=QEMU_PROBE_SECONDS,
            check=False,
        )
    except FileNotFoundError:
        return QemuCaps(binary, found=False, error="not installed")
    except (OSError, subprocess.TimeoutExpired) as exc:
        return QemuCaps(binary, found=False, error=str(exc))
    first = version.stdout.splitlines()[0] if version.stdout else ""
    return QemuCaps(
        binary,
        found=True,
        version=parse_qemu_version(first),
        version_text=first,
        object_types=parse_object_help(objects.stdout),
    )


def _device(root: Path, relative: str) -> DeviceAccess:
    path = root / relative
    if not path.exists():
        return DeviceAccess(f"/{relative}", exists=False)
    error = open_error(path)
    return DeviceAccess(f"/{relative}", exists=True, readable_writable=error is None, error=error or "")


def read_snp_firmware(root: Path) -> tuple[tuple[int, int, int] | None, str]:
    """The SEV firmware API version from ``SEV_PLATFORM_STATUS``, or None and why not."""
    path = root / "dev" / "sev"
    if not path.exists():
        return None, "/dev/sev does not exist"
    if not stat.S_ISCHR(path.stat().st_mode):
        return None, "/dev/sev is not a character device (a test tree)"
    status = (ctypes.c_ubyte * _SEV_STATUS.size)()  # the firmware writes the status here
    command = bytearray(_SEV_CMD.pack(SEV_PLATFORM_STATUS, ctypes.addressof(status), 0))
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return None, f"/dev/sev: {exc.strerror}"
    try:
        fcntl.ioctl(fd, SEV_ISSUE_CMD, command)
    except OSError as exc:
        error = _SEV_CMD.unpack(bytes(command))[2]
        return None, f"SEV_PLATFORM_STATUS failed: {exc.strerror} (firmware error {error:#x})"
    finally:
        os.close(fd)
    return parse_sev_status(bytes(status)), ""


def find_qgs(root: Path) -> tuple[QgsAddress | None, str]:
    """Where QEMU can reach Intel's Quote Generation Service on this host, and how it was found."""
    socket_path = root / QGS_SOCKET
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(socket_path.stat().st_mode):
            return QgsAddress("unix", path=f"/{QGS_SOCKET}"), f"unix socket /{QGS_SOCKET}"
    config = _read(root / QGS_CONFIG)
    if config is not None:
        port = parse_qgs_config(config)
        if port is not None:
            return QgsAddress("vsock", cid=2, port=port), f"/{QGS_CONFIG} sets vsock port {port}"
        return None, f"/{QGS_CONFIG} sets no port and /{QGS_SOCKET} is not a socket (is qgsd running?)"
    return None, f"neither /{QGS_SOCKET} nor /{QGS_CONFIG} exists"


def gather(
    root: Path = Path("/"),
    qemu_binary: str = "qemu-system-x86_64",
    qemu: QemuCaps | None = None,
    *,
    search_firmware: bool = True,
) -> HostFacts:
    """Read this host (or the tree under ``root``); ``qemu`` skips asking QEMU (tests).

    ``search_firmware=False`` skips reading the host's firmware images: a spec that names its
    own (every confidential spec does) has that one checked instead.
    """
    params = {}
    for module, names in (("kvm_amd", ("sev", "sev_es", "sev_snp")), ("kvm_intel", ("tdx",))):
        for name in names:
            value = _read(root / "sys" / "module" / module / "parameters" / name)
            if value is not None:
                params[f"{module}.{name}"] = value
    hugepages: dict[str, tuple[str, str]] = {}
    hp_root = root / "sys" / "kernel" / "mm" / "hugepages"
    if hp_root.is_dir():
        for entry in sorted(hp_root.iterdir()):
            total = _read(entry / "nr_hugepages")
            free = _read(entry / "free_hugepages")
            if total is not None and free is not None:
                hugepages[entry.name.removeprefix("hugepages-")] = (total, free)
    firmware, note = read_snp_firmware(root)
    qgs, qgs_note = find_qgs(root)
    channel = probe_channel(root)
    kvm = probe_kvm(root)
    flags = cpu_flags(_read(root / "proc" / "cpuinfo") or "")
    return HostFacts(
        kvm=kvm,
        kvm_params=params,
        dev_sev=_device(root, "dev/sev"),
        snp_firmware=firmware,
        snp_firmware_note=note,
        qemu=qemu if qemu is not None else probe_qemu(qemu_binary),
        firmware={tee: tuple(find_firmware(tee, root)) for tee in ("sev-snp", "tdx")}
        if search_firmware
        else {},
        qgs=qgs,
        qgs_note=qgs_note,
        hugepages=parse_hugepages(hugepages),
        vhost_vsock=channel.have_vhost_vsock,
        vhost_device_vsock=channel.vhost_device_vsock,
        cpu_flags=flags,
    )


# -- the verdict (pure) ----------------------------------------------------------------------


def _enabled(value: str | None) -> bool:
    return value is not None and value.strip() in ("Y", "y", "1")


def _qemu_checks(facts: HostFacts, object_type: str | None) -> list[Check]:
    qemu = facts.qemu
    if not qemu.found:
        return [
            Check(
                "qemu",
                "missing",
                f"{qemu.binary}: {qemu.error or 'not found'}",
                "install qemu-system-x86 (scripts/install-qemu.sh installs QEMU 10 from bookworm-backports)",
            )
        ]
    checks = [Check("qemu", "ok", qemu.version_text or qemu.binary)]
    if object_type is not None:
        since = QEMU_SINCE[object_type]
        if object_type in qemu.object_types:
            checks.append(
                Check(f"qemu {object_type}", "ok", f"{qemu.binary} -object help lists {object_type}")
            )
        else:
            version = ".".join(map(str, qemu.version)) or "unknown"
            checks.append(
                Check(
                    f"qemu {object_type}",
                    "missing",
                    f"QEMU {version} does not know -object {object_type}",
                    f"use QEMU {since} or later",
                )
            )
    return checks


def _kvm_check(facts: HostFacts, flag: str | None) -> tuple[Check, str]:
    kvm = facts.kvm
    if not kvm.dev_kvm_opens:
        detail = f"/dev/kvm does not open ({kvm.dev_kvm_error or 'unknown error'})"
        if flag is None:
            return Check(
                "kvm", "warn", detail + ": normal VMs run under TCG", "load kvm_intel or kvm_amd"
            ), "tcg"
        return Check("kvm", "missing", detail, "load kvm_amd or kvm_intel and give the daemon access"), ""
    virt = kvm.virt_flags
    if flag is None:
        if virt:
            return Check("kvm", "ok", f"/dev/kvm opens; CPU flags show {', '.join(sorted(virt))}"), "kvm"
        return (
            Check(
                "kvm",
                "warn",
                "/dev/kvm opens but the CPU flags show neither vmx nor svm (nested or paravirtual KVM): "
                "normal VMs run under TCG",
                'set accel = "kvm" in a spec to try KVM anyway',
            ),
            "tcg",
        )
    if flag in virt:
        return Check("kvm", "ok", f"/dev/kvm opens; CPU flag {flag}"), "kvm"
    return (
        Check(
            "kvm", "missing", f"/dev/kvm opens but the CPU flags lack {flag}", "run on the host, not in a VM"
        ),
        "",
    )


#: The name of the firmware requirement of each TEE (the daemon's preflight checks a spec's own
#: image under the same name).
FIRMWARE_CHECK: Final = {"sev-snp": "firmware OVMF (SNP-capable)", "tdx": "firmware TDVF"}


def _firmware_check(facts: HostFacts, tee: str) -> Check:
    candidates = facts.firmware.get(tee, ())
    name = FIRMWARE_CHECK[tee]
    fitting = first_fit(list(candidates))
    if fitting is not None:
        return Check(name, "ok", str(fitting.path))
    looked = ", ".join(
        f"{c.path} ({'; '.join(c.problems)})" if c.exists else f"{c.path} (absent)" for c in candidates
    )
    return Check(
        name,
        "missing",
        f"none fits; looked at {looked or 'nothing'}",
        "install an edk2 OVMF build with "
        + (
            "SEV metadata (Debian: ovmf 2022.11 or later, /usr/share/ovmf/OVMF.fd)"
            if tee == "sev-snp"
            else "TDX metadata (Debian: ovmf, /usr/share/ovmf/OVMF.fd; not the secure-boot .ms build)"
        )
        + ", or set boot.firmware in the spec",
    )


def _hugepages_check(facts: HostFacts) -> Check:
    if not facts.hugepages:
        return Check(
            "hugepages", "warn", "no hugepage pools", "optional: only shared guest memory can use them"
        )
    text = ", ".join(
        f"{size}: {free}/{total} free" for size, (total, free) in sorted(facts.hugepages.items())
    )
    return Check("hugepages", "ok", text)


def _channel_check(facts: HostFacts) -> Check:
    if facts.vhost_vsock:
        return Check("agent channel", "ok", "/dev/vhost-vsock exists")
    if facts.vhost_device_vsock:
        return Check("agent channel", "ok", f"vhost-device-vsock at {facts.vhost_device_vsock}")
    return Check(
        "agent channel",
        "warn",
        "neither /dev/vhost-vsock nor vhost-device-vsock: the agent falls back to virtio-serial",
        "modprobe vhost_vsock, or scripts/install-vhost-device-vsock.sh",
    )


def evaluate(facts: HostFacts, tee: TeeName) -> HostReport:
    """Pure: the checks and verdict for ``tee`` on a host described by ``facts``."""
    checks: list[Check] = []
    if tee == "normal":
        kvm, accel = _kvm_check(facts, None)
        checks += [kvm, *_qemu_checks(facts, None), _channel_check(facts), _hugepages_check(facts)]
        return HostReport(tee, tuple(checks), accel)
    if tee == "sev-snp":
        flag, module, param, object_type = "sev_snp", "kvm_amd", "sev_snp", "sev-snp-guest"
        cpu_remedy = "needs an AMD EPYC 7003 (Milan) or later with SEV-SNP enabled in the BIOS"
    else:
        flag, module, param, object_type = "tdx_host_platform", "kvm_intel", "tdx", "tdx-guest"
        cpu_remedy = "needs a 4th/5th Gen Xeon Scalable or later with TDX enabled in the BIOS"
    if flag in facts.cpu_flags:
        checks.append(Check("cpu", "ok", f"CPU flag {flag}"))
    else:
        checks.append(Check("cpu", "missing", f"/proc/cpuinfo has no {flag} flag", cpu_remedy))
    kvm, accel = _kvm_check(facts, "svm" if tee == "sev-snp" else "vmx")
    checks.append(kvm)
    key = f"{module}.{param}"
    value = facts.kvm_params.get(key)
    if _enabled(value):
        checks.append(Check(f"{key}", "ok", f"/sys/module/{module}/parameters/{param} = {value}"))
    elif value is None:
        checks.append(
            Check(
                key,
                "missing",
                f"{module} is not loaded or has no {param} parameter",
                f"modprobe {module} {param}=1",
            )
        )
    else:
        checks.append(
            Check(key, "missing", f"{key} = {value}", f"add {key}=1 to the host kernel command line")
        )
    if tee == "sev-snp":
        sev = facts.dev_sev
        if not sev.exists:
            checks.append(
                Check(
                    "/dev/sev",
                    "missing",
                    "does not exist: SEV is disabled in firmware",
                    "enable SEV-SNP in the BIOS",
                )
            )
        elif not sev.readable_writable:
            checks.append(
                Check("/dev/sev", "missing", f"cannot be opened read-write: {sev.error}", "run as root")
            )
        else:
            checks.append(Check("/dev/sev", "ok", "opens read-write"))
        if facts.snp_firmware is None:
            checks.append(
                Check(
                    "snp firmware",
                    "warn",
                    f"version not read: {facts.snp_firmware_note}",
                    "needs API 1.51 or later",
                )
            )
        else:
            major, minor, build = facts.snp_firmware
            if (major, minor) >= MIN_SNP_FIRMWARE:
                checks.append(Check("snp firmware", "ok", f"API {major}.{minor} build {build}"))
            else:
                checks.append(
                    Check(
                        "snp firmware",
                        "missing",
                        f"API {major}.{minor} build {build}",
                        "update the SEV firmware (BIOS, or /lib/firmware/amd/amd_sev_fam*.sbin)"
                        " to 1.51 or later",
                    )
                )
    checks += _qemu_checks(facts, object_type)
    checks.append(_firmware_check(facts, tee))
    if tee == "tdx":
        if facts.qgs is not None:
            where = facts.qgs.path or f"vsock {facts.qgs.cid}:{facts.qgs.port}"
            checks.append(Check("quote generation service", "ok", f"{where} ({facts.qgs_note})"))
        else:
            checks.append(  # a TD runs without it; only its quotes (attestation) fail
                Check(
                    "quote generation service",
                    "warn",
                    f"{facts.qgs_note}: TDs run, their quote requests fail",
                    "start qgsd (Intel DCAP) for attestation",
                )
            )
    checks.append(_hugepages_check(facts))
    return HostReport(tee, tuple(checks), accel)


def check_host(
    tees: Iterable[TeeName] = TEES, root: Path = Path("/"), qemu_binary: str = "qemu-system-x86_64"
) -> list[HostReport]:
    """Gather once and evaluate each TEE."""
    facts = gather(root, qemu_binary)
    return [evaluate(facts, tee) for tee in tees]


def gather_host_facts(qemu_binary: str = "qemu-system-x86_64", *, search_firmware: bool = True) -> HostFacts:
    """:func:`gather` of this host with ``qemu_binary``: what the daemon asks before a CVM start."""
    return gather(Path("/"), qemu_binary, search_firmware=search_firmware)

"""Which trusted execution environment is this guest running in: ``sev-snp``, ``tdx`` or ``none``?

The verdict is reported in GetInfo and in the ``cvm_guest_info{tee=...}`` metric, so it must
be cheap: a handful of ``stat`` calls and two small reads, no ioctl, no configfs ``mkdir``,
no attestation request. Each signal the kernel offers is weighed:

* ``/proc/cpuinfo`` flags: ``sev_snp`` or ``tdx_guest`` (X86_FEATURE_TDX_GUEST, set only in a
  TD). An SNP-capable *host* lists ``sev_snp`` as well, so that flag counts only together
  with ``hypervisor`` (CPUID.1:ECX[31], set for guests);
* the configfs-tsm provider of a report entry: ``sev_guest`` or ``tdx_guest``;
* the guest device node: ``/dev/sev-guest`` or ``/dev/tdx_guest``;
* the boot messages: ``Memory Encryption Features active: AMD SEV SEV-ES SEV-SNP`` or
  ``tdx: Guest detected``.

Sources: arch/x86/include/asm/cpufeatures.h (flag names), Documentation/ABI/testing/configfs-tsm
(``/sys/kernel/config/tsm/report/$name/provider`` names the provider of a report entry),
Documentation/virt/coco/sev-guest.rst (``/dev/sev-guest``), Documentation/arch/x86/tdx.rst
(``/dev/tdx_guest`` and the boot message), arch/x86/mm/mem_encrypt.c (the SEV message).

configfs-tsm only names its provider inside a report entry, and creating one is a write, so
this module reads the ``provider`` of entries that already exist and otherwise relies on the
other signals. ``/dev/kmsg`` is hard to fake in tests and may be restricted
(``kernel.dmesg_restrict``), so the boot messages come from an injectable text;
:func:`read_boot_messages` reads them once from ``/dev/kmsg`` (a few kilobytes, read once): call
it at agent start and keep the text.

A verdict needs one strong signal (a CPU flag, a provider, a device node); the boot message
alone only counts when nothing contradicts it. Conflicting strong signals (SNP and TDX at
once) yield ``none`` with evidence saying why: the caller should not guess.
"""

from __future__ import annotations

import enum
import errno
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cvmcore.cpuinfo import cpu_flags


class TeeKind(enum.StrEnum):
    SEV_SNP = "sev-snp"
    TDX = "tdx"
    NONE = "none"


@dataclass(frozen=True)
class TeeVerdict:
    """The detected TEE and a short human-readable reason."""

    tee: TeeKind
    evidence: str


CPUINFO = "proc/cpuinfo"
TSM_REPORT_DIR = "sys/kernel/config/tsm/report"

_CPU_FLAG = {TeeKind.SEV_SNP: "sev_snp", TeeKind.TDX: "tdx_guest"}
_TSM_PROVIDER = {TeeKind.SEV_SNP: "sev_guest", TeeKind.TDX: "tdx_guest"}
_DEVICE = {TeeKind.SEV_SNP: "dev/sev-guest", TeeKind.TDX: "dev/tdx_guest"}
_BOOT_MESSAGE = {
    TeeKind.SEV_SNP: "Memory Encryption Features active: AMD SEV SEV-ES SEV-SNP",
    TeeKind.TDX: "tdx: Guest detected",
}


def _read_cpuinfo_head(path: Path, limit: int = 64 * 1024) -> str:
    """The first processor's block is enough; reading all of cpuinfo on a 256-vCPU guest is not cheap."""
    try:
        with path.open("rb") as handle:
            return handle.read(limit).decode("latin-1")
    except OSError:
        return ""


def tsm_providers(root: Path) -> frozenset[str]:
    """Provider names of existing configfs-tsm report entries (never creates one)."""
    report_dir = root / TSM_REPORT_DIR
    names: set[str] = set()
    try:
        entries = list(report_dir.iterdir())
    except OSError:
        return frozenset()
    for entry in entries[:16]:
        try:
            names.add((entry / "provider").read_text().strip())
        except OSError:
            continue
    return frozenset(names)


def classify(
    flags: frozenset[str],
    providers: frozenset[str],
    devices: Iterable[TeeKind],
    boot_messages: str,
) -> TeeVerdict:
    """Pure decision from the collected signals."""
    strong: dict[TeeKind, list[str]] = {TeeKind.SEV_SNP: [], TeeKind.TDX: []}
    for kind, flag in _CPU_FLAG.items():
        # An SNP-capable *host* shows sev_snp too; only a guest (hypervisor flag) counts.
        if flag in flags and (kind is TeeKind.TDX or "hypervisor" in flags):
            strong[kind].append(f"cpu flag {flag}")
    for kind, provider in _TSM_PROVIDER.items():
        if provider in providers:
            strong[kind].append(f"tsm provider {provider}")
    for kind in devices:
        strong[kind].append(f"/{_DEVICE[kind]}")
    weak = {kind: message in boot_messages for kind, message in _BOOT_MESSAGE.items()}

    found = [kind for kind, reasons in strong.items() if reasons]
    if len(found) > 1:
        listed = "; ".join(f"{kind}: {', '.join(strong[kind])}" for kind in found)
        return TeeVerdict(TeeKind.NONE, f"conflicting signals ({listed})")
    if found:
        kind = found[0]
        reasons = strong[kind] + (["boot message"] if weak[kind] else [])
        return TeeVerdict(kind, ", ".join(reasons))
    weak_found = [kind for kind, seen in weak.items() if seen]
    if len(weak_found) == 1:
        kind = weak_found[0]
        return TeeVerdict(kind, f"boot message {_BOOT_MESSAGE[kind]!r} only")
    if weak_found:
        return TeeVerdict(TeeKind.NONE, "conflicting boot messages (SNP and TDX)")
    return TeeVerdict(
        TeeKind.NONE, "no sev_snp/tdx_guest cpu flag, tsm provider, guest device or boot message"
    )


def parse_kmsg(raw: str) -> str:
    """The message text of ``/dev/kmsg`` records (``prio,seq,usec,flags;text``), one per line.

    Continuation lines (a leading space, ``KEY=value`` device metadata) are dropped
    (Documentation/ABI/testing/dev-kmsg).
    """
    lines = []
    for record in raw.splitlines():
        if not record or record.startswith(" "):
            continue
        _, sep, text = record.partition(";")
        if sep:
            lines.append(text)
    return "\n".join(lines)


def read_boot_messages(root: Path = Path("/"), max_bytes: int = 1 << 20) -> str:
    """The kernel log as text, read once from ``/dev/kmsg`` without blocking; ``""`` if denied.

    Each ``read`` returns one record; ``EAGAIN`` means the end; ``EPIPE`` means records were
    overwritten while reading (skip on). Call it once at agent start and keep the text: the
    boot messages the TEE verdict needs do not change, and the ring buffer may wrap later.
    """
    try:
        fd = os.open(root / "dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return ""
    chunks: list[bytes] = []
    total = 0
    try:
        while total < max_bytes:
            try:
                chunk = os.read(fd, 8192)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EPIPE:
                    continue
                break
            if not chunk:
                break
            chunks.append(chunk if chunk.endswith(b"\n") else chunk + b"\n")
            total += len(chunk)
    finally:
        os.close(fd)
    return parse_kmsg(b"".join(chunks).decode("utf-8", "replace"))


def detect_tee(root: Path = Path("/"), boot_messages: str = "") -> TeeVerdict:
    """Detect the TEE under ``root``; ``boot_messages`` is dmesg text if the caller has it."""
    flags = cpu_flags(_read_cpuinfo_head(root / CPUINFO))
    devices = [kind for kind, device in _DEVICE.items() if (root / device).exists()]
    return classify(flags, tsm_providers(root), devices, boot_messages)

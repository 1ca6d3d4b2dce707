"""The built-in VM targets of ``cvmctl bench``: the study's comparisons, one difference each.

Grammar: ``BASE[+MODIFIER...]`` with

    BASE       vm        the built-in dev guest, a normal VM
               sev-snp   the same guest as an AMD SEV-SNP confidential VM
               tdx       the same guest as an Intel TDX trust domain
    MODIFIER   swiotlb   bounce every DMA through swiotlb, as a CVM must (normal VM only:
                         the study's ablation of the CVM I/O path)
               haltpoll  the guest's cpuidle_haltpoll driver (the study's idle-polling fix)
               idle-poll idle=poll: idle vCPUs spin instead of halting

Every built-in target is the dev guest (same kernel, initramfs and agent, 2 vCPUs, 1 GiB,
a 2 GiB scratch disk for fio), so a comparison measures the one difference between its
arms. A ``vm`` arm compared with a confidential arm becomes that TEE's *baseline*: the same
firmware, CPU model, machine flags and console as the CVM arm, without the memory
encryption (``baseline_for`` in the spec), e.g. ``--compare vm,sev-snp`` compares an SNP
guest with its own baseline.

Each target has its own VM (``cvmctl-dev``, ``cvmctl-dev-swiotlb``, ``cvmctl-sev-snp``,
``cvmctl-vm-for-sev-snp``...), so arms never share state; all are defined in the daemon
the first time they are used and booted when needed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final, Literal, get_args

from cvmcore.errors import UsageError

Base = Literal["vm", "sev-snp", "tdx"]
Modifier = Literal["swiotlb", "haltpoll", "idle-poll"]
BASES: Final[tuple[Base, ...]] = get_args(Base)
MODIFIERS: Final[tuple[Modifier, ...]] = get_args(Modifier)
CONFIDENTIAL: Final = frozenset({"sev-snp", "tdx"})
#: swiotlb=<slabs>,force: 524288 slabs of 2 KiB = 1 GiB of bounce buffers, the study's size.
SWIOTLB_SLABS: Final = 524288
DEV_VCPUS: Final = 2
DEV_MEMORY: Final = "1G"
#: ``[scratch] size``: the catalogue's fio lays out a 1 GiB file (``size_mb`` 1024) in a file
#: system on this disk; 2 GiB leaves room for the file system and a larger ``size_mb``. The
#: daemon creates the disk at each boot (``cache=none``, ``aio=native`` where O_DIRECT works,
#: see host_daemon/scratch.py) and deletes it when the VM stops or is removed.
DEV_SCRATCH: Final = "2G"


@dataclass(frozen=True)
class BuiltinTarget:
    """A parsed built-in target; ``baseline_for`` is set on a ``vm`` arm paired with a CVM arm."""

    base: Base
    modifiers: tuple[Modifier, ...] = ()
    baseline_for: Literal["none", "sev-snp", "tdx"] = "none"

    @property
    def name(self) -> str:
        """As the user writes it (``sev-snp+haltpoll``)."""
        return "+".join([self.base, *self.modifiers])

    @property
    def confidential(self) -> bool:
        return self.base in CONFIDENTIAL

    @property
    def flavour(self) -> str:
        """The platform whose firmware and machine this target uses ("none" for a plain VM)."""
        return self.base if self.confidential else self.baseline_for

    @property
    def vm_name(self) -> str:
        """The daemon's VM for this target: one per distinct target."""
        if self.base == "vm" and self.baseline_for == "none":
            stem = "cvmctl-dev"
        elif self.base == "vm":
            stem = f"cvmctl-vm-for-{self.baseline_for}"
        else:
            stem = f"cvmctl-{self.base}"
        return "-".join([stem, *self.modifiers])

    def spec_toml(
        self, forwards: Mapping[int, int] | None, firmware: Path | None = None, *, passt: bool = False
    ) -> str:
        """The VM spec: the dev guest, this target's TEE or baseline, its modifiers.

        ``forwards`` maps guest ports to loopback host ports for a rootless network: passt
        (``passt``; each port forwarded for TCP and UDP, as iperf3's UDP test needs both) or
        else QEMU's user-mode network (TCP only). None gives the study's network path instead,
        a multi-queue tap in a namespace the daemon owns (it needs root). ``firmware`` is the
        image both arms of a confidential comparison boot (required when :attr:`flavour` is a
        TEE).
        """
        if self.flavour != "none" and firmware is None:
            raise UsageError(f"target {self.name}: a {self.flavour} guest needs a firmware image")
        lines = [
            f'name = "{self.vm_name}"',
            'image = "dev"',
            f"vcpus = {DEV_VCPUS}",
            f'memory = "{DEV_MEMORY}"',
        ]
        if self.confidential:
            lines.append(f'tee = "{self.base}"')
        elif self.baseline_for != "none":
            lines.append(f'baseline_for = "{self.baseline_for}"')
        if self.flavour != "none":
            lines += ["", "[boot]", f'firmware = "{firmware}"']
        lines += ["", "[scratch]", f'size = "{DEV_SCRATCH}"']
        if forwards is None:
            lines += ["", "[network]", 'mode = "tap"']
        else:
            protos = ("tcp", "udp") if passt else ("tcp",)
            rules = ", ".join(
                f'{{ host_port = {host}, guest_port = {guest}, proto = "{proto}" }}'
                for guest, host in sorted(forwards.items())
                for proto in protos
            )
            mode = "passt" if passt else "user"
            lines += ["", "[network]", f'mode = "{mode}"', f"forwards = [{rules}]"]
        knobs = []
        if "swiotlb" in self.modifiers:
            knobs.append(f"swiotlb_force = {SWIOTLB_SLABS}")
        if "haltpoll" in self.modifiers:
            knobs.append("haltpoll = true")
        if "idle-poll" in self.modifiers:
            knobs.append("idle_poll = true")
        if knobs:
            lines += ["", "[guest]", *knobs]
        return "\n".join(lines) + "\n"


def parse_target(text: str) -> BuiltinTarget | None:
    """The built-in target ``text`` names, None if it names none (``vm:NAME``, ``local``...).

    Raises :class:`UsageError` for a known base with a bad modifier.
    """
    base, *mods = text.split("+")
    if base not in BASES:
        return None
    seen: list[Modifier] = []
    for mod in mods:
        if mod not in MODIFIERS:
            raise UsageError(
                f"target {text!r}: unknown modifier {mod!r}"
                f" (available: {', '.join('+' + m for m in MODIFIERS)})"
            )
        if mod in seen:
            raise UsageError(f"target {text!r}: +{mod} twice")
        seen.append(mod)
    if "swiotlb" in seen and base != "vm":
        raise UsageError(
            f"target {text!r}: +swiotlb is for a normal VM (a confidential VM bounces every DMA already)"
        )
    if "haltpoll" in seen and "idle-poll" in seen:
        raise UsageError(
            f"target {text!r}: choose one of +haltpoll and +idle-poll (idle=poll bypasses cpuidle)"
        )
    order = {m: i for i, m in enumerate(MODIFIERS)}
    return BuiltinTarget(base, tuple(sorted(seen, key=order.__getitem__)))


def pair(a: BuiltinTarget, b: BuiltinTarget) -> tuple[BuiltinTarget, BuiltinTarget]:
    """Two arms of ``--compare``: a ``vm`` arm beside a confidential arm becomes its baseline.

    Two different TEEs (``sev-snp,tdx``) cannot share a host and are refused.
    """
    if a.confidential and b.confidential and a.base != b.base:
        raise UsageError(f"--compare {a.name},{b.name}: SEV-SNP and TDX never run on the same host")
    if a.base == "vm" and b.base != "vm":
        a = replace(a, baseline_for=b.base)
    if b.base == "vm" and a.base != "vm":
        b = replace(b, baseline_for=a.base)
    return a, b


def usage() -> str:
    return f"vm, sev-snp, tdx, each with +{', +'.join(MODIFIERS)}; vm:NAME; local; local:PORT"

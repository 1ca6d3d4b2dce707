"""``/proc/cpuinfo``: the one parser of its ``flags`` line (TEE detection, KVM checks)."""

from __future__ import annotations


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The flags of the first processor in ``/proc/cpuinfo`` text (all CPUs share them)."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()

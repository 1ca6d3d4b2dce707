"""swiotlb: the bounce-buffer pool that every DMA of a confidential VM goes through.

A CVM's memory is private to the guest; devices can only DMA into shared (decrypted)
memory, so the DMA API copies ("bounces") each buffer through the swiotlb pool. The study
found this copy dominates I/O overhead; a full pool makes mappings fail or stall.

Files, in debugfs (kernel/dma/swiotlb.c, ``swiotlb_create_debugfs_files``):
``swiotlb/io_tlb_nslabs`` (pool size in slabs), ``swiotlb/io_tlb_used`` (slabs in use) and
``swiotlb/io_tlb_used_hiwater`` (the most ever in use; mode 0600, writing resets it). One slab
is ``IO_TLB_SIZE`` = 1 << ``IO_TLB_SHIFT`` = 2048 bytes (include/linux/swiotlb.h).

The known bogus value: ``io_tlb_used`` and ``io_tlb_used_hiwater`` can read as
18446744073709551615 (all ones, -1 as a signed 64-bit number) because the counters were reset
in a late initcall after built-in drivers had already mapped buffers, so the first unmaps
drove them below zero (reported with a fix on LKML by Dexuan Cui, 29 March 2024, for the
debugfs readouts of io_tlb_used and io_tlb_used_hiwater; older kernels still show it).
Values are read as signed and clamped to ``[0, io_tlb_nslabs]`` (and the high-water mark to
at least the current use); :attr:`SwiotlbSnapshot.clamped` says whether that happened.

debugfs is often not mounted. If a ``mount`` function is given, the collector mounts it
read-only (once) through the injected function; otherwise, or if it still has no
``swiotlb/`` (no pool: ``swiotlb=noforce``; or kernel lockdown hides debugfs), the
collector is unavailable.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from guest_agent.collectors.base import CollectorUnavailable, SnapshotSource, read_kernel_file

IO_TLB_SHIFT = 11
IO_TLB_SIZE_BYTES = 1 << IO_TLB_SHIFT
SWIOTLB_DIR = "swiotlb"

MountFunction = Callable[[Path], None]
"""Mounts debugfs read-only on the given directory; raises ``OSError`` on failure."""


def mount_debugfs_readonly(target: Path) -> None:
    """The real :data:`MountFunction`: ``mount -t debugfs -o ro,nosuid,nodev,noexec``."""
    done = subprocess.run(
        ["mount", "-t", "debugfs", "-o", "ro,nosuid,nodev,noexec", "debugfs", str(target)],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    if done.returncode != 0:
        raise OSError(f"mount debugfs on {target}: {done.stderr.strip() or done.returncode}")


@dataclass(frozen=True)
class SwiotlbSnapshot:
    nslabs: int
    used_slabs: int
    used_hiwater_slabs: int | None
    clamped: bool = False

    @property
    def size_bytes(self) -> int:
        return self.nslabs * IO_TLB_SIZE_BYTES


def as_signed64(value: int) -> int:
    """Reinterpret an unsigned 64-bit reading as signed (all ones -> -1)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def parse_swiotlb(nslabs_text: str, used_text: str, hiwater_text: str | None) -> SwiotlbSnapshot:
    """Parse the three debugfs files, clamping counters to ``[0, nslabs]``."""
    nslabs = int(nslabs_text)
    clamped = False

    def clamp(text: str) -> int:
        nonlocal clamped
        raw = as_signed64(int(text))
        value = min(max(raw, 0), nslabs)
        clamped = clamped or value != raw
        return value

    used = clamp(used_text)
    hiwater = None
    if hiwater_text is not None:
        # A high-water mark below the current use is impossible: the current use bounds it.
        hiwater = max(clamp(hiwater_text), used)
    return SwiotlbSnapshot(nslabs=nslabs, used_slabs=used, used_hiwater_slabs=hiwater, clamped=clamped)


class SwiotlbCollector(SnapshotSource[SwiotlbSnapshot]):
    name = "swiotlb"

    def __init__(self, debugfs_root: Path, mount: MountFunction | None = None) -> None:
        """``debugfs_root`` is the debugfs mount point (``/sys/kernel/debug`` in production)."""
        self.debugfs_root = debugfs_root
        self._mount = mount
        self._mount_attempted = False
        self.mount_error = ""

    def read(self) -> SwiotlbSnapshot:
        directory = self.debugfs_root / SWIOTLB_DIR
        if not (directory / "io_tlb_nslabs").exists() and self._mount and not self._mount_attempted:
            self._mount_attempted = True
            try:
                self._mount(self.debugfs_root)
            except OSError as exc:
                self.mount_error = str(exc)
        try:
            nslabs = read_kernel_file(directory / "io_tlb_nslabs")
            used = read_kernel_file(directory / "io_tlb_used")
        except OSError as exc:
            why = f" (mount failed: {self.mount_error})" if self.mount_error else ""
            raise CollectorUnavailable(f"swiotlb statistics not readable in {directory}{why}: {exc}") from exc
        try:
            hiwater: str | None = read_kernel_file(directory / "io_tlb_used_hiwater")
        except OSError:
            hiwater = None  # before Linux 6.3 there is no high-water mark
        return parse_swiotlb(nslabs, used, hiwater)

    def families(self, snapshot: SwiotlbSnapshot) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            "cvm_guest_swiotlb_size_bytes",
            "Size of the default swiotlb bounce-buffer pool.",
            value=float(snapshot.size_bytes),
        )
        yield GaugeMetricFamily(
            "cvm_guest_swiotlb_used_bytes",
            "Bytes of the swiotlb pool in use.",
            value=float(snapshot.used_slabs * IO_TLB_SIZE_BYTES),
        )
        if snapshot.used_hiwater_slabs is not None:
            yield GaugeMetricFamily(
                "cvm_guest_swiotlb_used_max_bytes",
                "Most bytes of the swiotlb pool ever in use (since boot or the last reset).",
                value=float(snapshot.used_hiwater_slabs * IO_TLB_SIZE_BYTES),
            )
        yield GaugeMetricFamily(
            "cvm_guest_swiotlb_reading_clamped",
            "1 if the kernel reported an impossible counter (e.g. all ones) that was clamped.",
            value=1.0 if snapshot.clamped else 0.0,
        )

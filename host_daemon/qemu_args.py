"""From a VM spec to a QEMU command line: one pure function, :func:`build_qemu_argv`.

The spec (:mod:`host_daemon.spec`) says what the VM is; the :class:`Runtime` says what the
daemon decided for this boot: the QEMU binary, the resolved accelerator and agent channel
(:mod:`host_daemon.accel`), the TDX quote generation service the host check found, and where
QEMU's control socket, pidfile and console log go. Nothing here touches the file system or
the clock, so the same inputs always give the same argv; golden files under
``tests/host_daemon/golden`` pin it, case by case.

The argv is built in a fixed order: the NUMA prefix, identity and defaults, accelerator and
machine, CPU and memory, the TEE object, firmware and kernel, console and control, then
devices (the panic device, disks, the scratch disk, network, 9p shares, the agent channel).

Where each option comes from: docs/qemu-options.md has one row per option and sub-option of
the golden command lines, naming its reference and why it is there, and
``tests/host_daemon/test_option_table.py`` fails when a golden gains an option the table does
not explain. By group:

* every group: ``qemu-options.hx`` (docs/system/invocation.rst, ``qemu-system-x86_64 -help``),
  the reference of each command-line option;
* TEE object, machine options, firmware: QEMU's ``docs/system/i386/amd-memory-encryption.rst``
  and ``docs/system/i386/tdx.rst``, the QAPI schema ``qapi/qom.json`` (``sev-snp-guest``,
  ``tdx-guest`` with ``quote-generation-socket``), compared with AMD's ``AMDESE/AMDSEV``
  ``launch-qemu.sh``, ``canonical/tdx`` ``guest-tools`` and libvirt's
  ``launch-security-sev-snp`` fixture;
* CPU models, the baselines' mirrored machine flags (``vmport=off``; ``kernel_irqchip=split``,
  ``hpet=off``, ``pmu=off``), one ``-bios`` OVMF for both arms, the virtio console, the NUMA
  prefix, forced bounce buffers and idle polling: the study, docs/study.md ("QEMU command
  lines", "vCPU pinning", "Forcing bounce buffers in a normal VM", "Idle polling");
* memory backends and ``iothread``: ``qapi/qom.json``; vhost-user: QEMU's
  ``docs/system/devices/virtio/vhost-user.rst``; the panic device: ``docs/specs/pvpanic.rst``.

Quoting: in ``key=value,...`` option strings QEMU escapes a comma in a value by doubling it;
every path or user string placed in such a value goes through :func:`opt_value`. Options that
take a plain string (``-kernel``, ``-initrd``, ``-append``, ``-bios``, ``-pidfile``) are passed
as their own argv element, unquoted: QEMU is exec'd without a shell.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cvmcore.errors import UsageError

from .accel import ResolvedAccel, ResolvedChannel
from .spec import DEFAULT_TAP_NAME, SCRATCH_SERIAL, Aio, Cache, QgsAddress, VMSpec

MEMORY_BACKEND_ID = "ram1"
SEV_ID = "sev0"
TDX_ID = "tdx0"
SERIAL_CHARDEV_ID = "serial0"
"""The console's ``file`` chardev (the per-boot log the daemon reads), behind ttyS0 or hvc0."""
CONSOLE_BUS_ID = "vcon0"
SNP_CPU_MODEL = (
    "EPYC-v4,host-phys-bits=true,+avx512f,+avx512dq,+avx512cd,+avx512bw,+avx512vl,"
    "+avx512ifma,+avx512vbmi,+avx512vbmi2,+avx512vnni,+avx512bitalg"
)
"""The study's SNP CPU (docs/study.md, "QEMU command lines"): ``EPYC-v4`` hides AVX-512, so the
flags are listed again, and ``host-phys-bits`` gives the host's MAXPHYADDR. The SNP baseline
runs the same model, so the pair differs in SEV alone."""
VIRTIO_SERIAL_PORT_NAME = "org.cvmctl.agent.0"
"""The virtserialport name of the agent channel; the guest sees /dev/virtio-ports/<name>."""

RESTRICTED_VIRTIO = "iommu_platform=on,disable-modern=off,disable-legacy=on"
"""Virtio device flags that make the device honour the DMA API (VIRTIO_F_ACCESS_PLATFORM) and
be modern-only. A memory-encrypted Linux guest refuses virtio devices without
ACCESS_PLATFORM; on a normal VM these flags plus ``swiotlb=<slabs>,force`` reproduce the
CVM's bounce buffering (docs/study.md, "Forcing bounce buffers in a normal VM"). Properties as
listed by ``-device virtio-net-pci,help`` (hw/virtio/virtio-pci.c)."""

SCRATCH_DRIVE_ID = "scratch"
SCRATCH_DEVICE_ID = "scratch0"
"""The scratch disk's ``-drive`` id and ``-device`` id; QOM path ``/machine/peripheral/scratch0``."""
SCRATCH_IOTHREAD_ID = "iothread-scratch"
"""Its I/O thread, named ``IO iothread-scratch`` with ``debug-threads=on``."""

UNIX_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux


class ArgvError(UsageError):
    """The spec and runtime together cannot make a command line (e.g. a needed path is missing)."""


@dataclass(frozen=True)
class ScratchDrive:
    """The ``[scratch]`` disk as the daemon made it for this boot (:mod:`host_daemon.scratch`):
    the file it created in the run directory and the aio and cache modes it chose for the
    file system there (``auto`` resolved)."""

    path: Path
    aio: Aio
    cache: Cache


@dataclass(frozen=True)
class Runtime:
    """What the daemon decided for one boot of a VM."""

    accel: ResolvedAccel
    qmp_socket: Path
    pidfile: Path
    serial_log: Path
    qemu_binary: str = "qemu-system-x86_64"
    agent_channel: ResolvedChannel | None = None  # required when the spec says channel = "auto"
    agent_socket: Path | None = None  # vhost-user-vsock / virtio-serial socket, unless the spec names one
    guest_cid: int | None = None  # vhost-vsock guest CID, unless the spec sets one
    qgs: QgsAddress | None = None  # the host's TDX QGS, for [tdx] quote_generation_socket = "auto"
    numactl: str = "numactl"  # the program that binds QEMU to [pinning] numa_node
    scratch: ScratchDrive | None = None  # required when the spec has a [scratch] disk
    vhost_net: bool = False  # the host has /dev/vhost-net: [network] vhost = true turns it on
    passt_socket: Path | None = None  # mode = "passt": the socket of the passt the daemon started


def opt_value(value: str | Path) -> str:
    """Escape a value for a QEMU ``key=value,...`` option string: a comma becomes ``,,``."""
    return str(value).replace(",", ",,")


def kernel_cmdline(spec: VMSpec) -> str:
    """The guest kernel command line: the spec's, else the console's, plus the study's knobs.

    Without ``boot.cmdline`` it is ``console=hvc0`` for a virtio console (CVMs and their
    baselines, as the study booted them) and ``console=ttyS0`` for a serial one.

    * ``swiotlb=<slabs>,force`` bounces all DMA through swiotlb (kernel-parameters.txt), as a
      CVM must; used on a normal VM together with :data:`RESTRICTED_VIRTIO` devices.
    * ``cpuidle_haltpoll.force=Y`` loads the haltpoll cpuidle driver even without the KVM
      "realtime" hint, which CVMs do not advertise (Documentation/virt/guest-halt-polling.rst).
    * ``idle=poll`` makes idle CPUs spin instead of halting (kernel-parameters.txt).
    """
    default = "console=hvc0" if spec.console_device == "virtio" else "console=ttyS0"
    parts = [spec.boot.cmdline or default]
    if spec.guest.swiotlb_force is not None:
        parts.append(f"swiotlb={spec.guest.swiotlb_force},force")
    if spec.guest.haltpoll:
        parts.append("cpuidle_haltpoll.force=Y")
    if spec.guest.idle_poll:
        parts.append("idle=poll")
    return " ".join(parts)


def memory_backend_type(spec: VMSpec, channel: ResolvedChannel) -> str:
    """``ram``, ``memfd`` or ``file``: the spec's choice, or for ``auto`` what the VM needs.

    SEV-SNP (and its baseline) uses a shared memfd as in the upstream SNP examples and the
    study; a vhost-user backend must map guest RAM, so it needs memfd (or a shared file).
    """
    if spec.memory_backend != "auto":
        if channel == "vhost-user-vsock" and spec.memory_backend == "ram":
            raise ArgvError(
                'memory_backend: "ram" cannot be shared with the vhost-user-vsock backend; '
                'use "auto", "memfd" or "file"'
            )
        return spec.memory_backend
    if spec.flavour == "sev-snp" or channel == "vhost-user-vsock":
        return "memfd"
    return "ram"


def cpu_model(spec: VMSpec, accel: ResolvedAccel) -> str:
    """The ``-cpu`` value: the spec's, else per platform as the study ran it.

    SEV-SNP and its baseline: :data:`SNP_CPU_MODEL` (a named model keeps the CPUID page the SNP
    firmware validates stable; the same string on both arms). TDX and its baseline:
    ``host,pmu=off`` (tdx.rst launches with ``-cpu host``; the study turns the PMU off on both,
    matching the TD, whose PERFMON attribute is off by default). Otherwise ``host`` under KVM
    and ``max`` (every feature TCG emulates) under TCG.
    """
    if spec.cpu:
        return spec.cpu
    if spec.flavour == "sev-snp":
        return SNP_CPU_MODEL
    base = "host" if accel == "kvm" else "max"
    if spec.flavour == "tdx":
        return f"{base},pmu=off"
    return base


def accel_option(accel: ResolvedAccel) -> str:
    """The ``-accel`` value. TCG runs one host thread per vCPU (``thread=multi``, named
    ``CPU n/TCG``), so that each vCPU can be pinned like a KVM vCPU thread. QEMU 10.0 already
    defaults to it for an x86 guest on an x86 host; written out, QEMU refuses it where it
    cannot provide it (e.g. with ``-icount``) instead of quietly running all vCPUs on one thread."""
    return "tcg,thread=multi" if accel == "tcg" else "kvm"


def numa_prefix(spec: VMSpec, runtime: Runtime) -> list[str]:
    """``numactl --membind=N --cpunodebind=N --`` in front of QEMU when ``[pinning] numa_node`` is set.

    ``host-nodes``/``policy=bind`` on the memory backend bind only what the backend allocates.
    An SEV-SNP guest or a TD gets its private memory from guest_memfd, which the backend does
    not cover: until KVM applies a memory policy to guest_memfd itself, those pages follow the
    policy of the QEMU thread that faults them in (AMDSEV README: "Assigning NUMA affinities
    for private guest memory is not supported"). A process policy set by numactl covers both,
    as the study started QEMU (docs/study.md, "vCPU pinning"). Every flavour gets it, so both
    arms of a comparison are placed alike.
    """
    node = spec.pinning.numa_node
    if node is None:
        return []
    return [runtime.numactl, f"--membind={node}", f"--cpunodebind={node}", "--"]


def build_qemu_argv(spec: VMSpec, runtime: Runtime) -> list[str]:
    """The complete argv to start ``spec`` as ``runtime`` says: the QEMU binary and its options,
    behind ``numactl ... --`` when the spec binds a NUMA node (:func:`numa_prefix`).

    Pure. Raises :class:`ArgvError` when the two do not fit together (a TEE under TCG, a
    channel that needs a socket or CID nobody supplied, a socket path too long for AF_UNIX, a
    TD whose quote generation service is "auto" while the daemon found none).
    """
    if spec.tee != "none" and runtime.accel != "kvm":
        raise ArgvError(f'accel: a {spec.tee} guest needs KVM, but this boot resolved to "{runtime.accel}"')
    channel = _resolved_channel(spec, runtime)
    argv = [*numa_prefix(spec, runtime), runtime.qemu_binary]
    for group in (
        _identity(spec),
        _accel_and_machine(spec, runtime),
        _cpu_and_memory(spec, runtime, channel),
        _tee_object(spec, runtime),
        _firmware_and_kernel(spec),
        _console_and_control(spec, runtime),
        _panic_device(),
        _disks(spec),
        _scratch_disk(spec, runtime),
        _network(spec, runtime),
        _shares(spec),
        _agent_channel(spec, runtime, channel),
    ):
        argv.extend(group)
    return argv


def format_argv(argv: list[str]) -> str:
    """One argument per line (the golden-file format), ending in a newline."""
    return "".join(f"{arg}\n" for arg in argv)


# --------------------------------------------------------------------------------------------
# Groups. Each yields argv elements.


def _resolved_channel(spec: VMSpec, runtime: Runtime) -> ResolvedChannel:
    if spec.agent.channel != "auto":
        return spec.agent.channel
    if runtime.agent_channel is None:
        raise ArgvError('agent.channel: "auto" must be resolved by the daemon (Runtime.agent_channel)')
    return runtime.agent_channel


def _virtio(spec: VMSpec, device: str) -> str:
    """A virtio PCI device string, restricted (DMA API, modern only) on CVMs and forced-swiotlb VMs."""
    if spec.confidential or spec.guest.swiotlb_force is not None:
        return f"{device},{RESTRICTED_VIRTIO}"
    return device


def _unix_path(what: str, path: Path) -> str:
    if len(str(path).encode()) > UNIX_PATH_MAX:
        raise ArgvError(
            f"{what}: socket path {str(path)!r} is longer than {UNIX_PATH_MAX} bytes (AF_UNIX limit)"
        )
    return opt_value(path)


def _identity(spec: VMSpec) -> Iterator[str]:
    # qemu-options.hx: -name (debug-threads=on names vCPU threads "CPU n/KVM", handy when
    # pinning), -nodefaults (no default NIC, VGA, serial, parallel, monitor, CD-ROM, floppy),
    # -no-user-config (no qemu.conf from /etc), -display none, -no-reboot (a guest reboot
    # exits QEMU with a SHUTDOWN event: SEV-ES/SNP guests cannot be reset, see
    # amd-memory-encryption.rst, and every flavour behaves alike so baselines match).
    yield from ("-name", f"guest={spec.name},debug-threads=on")
    yield from ("-nodefaults", "-no-user-config", "-display", "none", "-no-reboot")


def _accel_and_machine(spec: VMSpec, runtime: Runtime) -> Iterator[str]:
    # qemu-options.hx: -accel (tcg,thread=multi: see accel_option); -machine q35 with
    # kernel_irqchip=, hpet=, vmport=, memory-backend= and confidential-guest-support=.
    # tdx.rst: a TD needs kernel-irqchip split and confidential-guest-support=<tdx-guest id>;
    # the study adds hpet=off and mirrors all three on the Intel baseline.
    # amd-memory-encryption.rst: confidential-guest-support=<sev-snp-guest id>; vmport=off and
    # memory-backend= as in the study's SNP line, mirrored on the AMD baseline.
    yield from ("-accel", accel_option(runtime.accel))
    machine = ["q35"]
    if spec.flavour == "tdx":
        machine += ["kernel_irqchip=split", "hpet=off"]
    if spec.tee == "sev-snp":
        machine.append(f"confidential-guest-support={SEV_ID}")
    elif spec.tee == "tdx":
        machine.append(f"confidential-guest-support={TDX_ID}")
    machine.append(f"memory-backend={MEMORY_BACKEND_ID}")
    if spec.flavour == "sev-snp":
        machine.append("vmport=off")
    yield from ("-machine", ",".join(machine))


def _cpu_and_memory(spec: VMSpec, runtime: Runtime, channel: ResolvedChannel) -> Iterator[str]:
    # qemu-options.hx: -cpu, -smp, -m. qapi/qom.json: memory-backend-ram / -memfd / -file with
    # size, share, prealloc, host-nodes + policy=bind (a host NUMA node), mem-path (file).
    # vhost-user.rst ("Shared memory object"): a vhost-user daemon maps guest RAM, so the
    # backend is memfd (or file) with share=on and sized like -m. For SNP and TDX the backend
    # holds only shared memory; private memory comes from guest_memfd (see numa_prefix).
    yield from ("-cpu", cpu_model(spec, runtime.accel))
    yield from ("-smp", str(spec.vcpus))
    size = f"{spec.memory_mib}M"
    yield from ("-m", size)
    kind = memory_backend_type(spec, channel)
    props = [f"memory-backend-{kind}", f"id={MEMORY_BACKEND_ID}", f"size={size}"]
    if kind == "file":
        assert spec.memory_path is not None  # checked by the spec
        props.append(f"mem-path={opt_value(spec.memory_path)}")
    if kind in ("memfd", "file"):
        props.append("share=on")
    props.append(f"prealloc={'on' if spec.prealloc else 'off'}")
    if spec.pinning.numa_node is not None:
        props += [f"host-nodes={spec.pinning.numa_node}", "policy=bind"]
    yield from ("-object", ",".join(props))


def _tee_object(spec: VMSpec, runtime: Runtime) -> Iterator[str]:
    if spec.tee == "sev-snp":
        # amd-memory-encryption.rst, "Launching (SEV-SNP)", and qapi/qom.json
        # SevSnpGuestProperties: cbitpos, reduced-phys-bits, policy (SNP_LAUNCH_START),
        # kernel-hashes (measured direct boot; off unless asked for, QEMU's default: it needs
        # a firmware with a SEV hashes area, see host_daemon.firmware), host-data (32 bytes,
        # base64; SNP_LAUNCH_FINISH).
        o = spec.sev_snp
        props = [
            "sev-snp-guest",
            f"id={SEV_ID}",
            f"cbitpos={o.cbitpos}",
            f"reduced-phys-bits={o.reduced_phys_bits}",
            f"policy={o.policy:#x}",
        ]
        if o.kernel_hashes:
            props.append("kernel-hashes=on")
        if o.host_data:
            props.append(f"host-data={o.host_data}")
        yield from ("-object", ",".join(props))
    elif spec.tee == "tdx":
        # tdx.rst, "Launching a TD" and "TD attestation": -object tdx-guest,id=...; the
        # quote-generation-socket property is a QAPI SocketAddress, so the object is given in
        # JSON form, e.g. {"type":"unix","path":"/var/run/tdx-qgs/qgs.socket"} or
        # {"type":"vsock","cid":"2","port":"4050"} (cid and port are strings there). Without the
        # property QEMU answers every quote request with "QGS unavailable".
        # "auto": the service the daemon found on this host; with none, the TD runs and its
        # quote requests fail (the host check warns, the attestation workload says why).
        qgs = spec.tdx.quote_generation_socket
        if qgs == "auto":
            qgs = runtime.qgs if runtime.qgs is not None else "none"
        if qgs == "none":
            yield from ("-object", f"tdx-guest,id={TDX_ID}")
            return
        addr = (
            {"type": "unix", "path": qgs.path}
            if qgs.kind == "unix"
            else {"type": "vsock", "cid": str(qgs.cid), "port": str(qgs.port)}
        )
        obj = {"qom-type": "tdx-guest", "id": TDX_ID, "quote-generation-socket": addr}
        yield from ("-object", json.dumps(obj, separators=(",", ":")))


def _firmware_and_kernel(spec: VMSpec) -> Iterator[str]:
    # qemu-options.hx: -bios, -kernel, -initrd, -append. SEV-SNP and TDX load OVMF / TDVF
    # with -bios (tdx.rst: "TDVF cannot be mapped as pflash"; SNP with pflash needs KVM
    # read-only memslots). A baseline loads its firmware the same way, so that both arms of a
    # comparison run one image mapped alike (the study's single OVMF per host).
    if spec.boot.firmware is not None:
        yield from ("-bios", str(spec.boot.firmware))
    if spec.boot.kernel is not None:
        yield from ("-kernel", str(spec.boot.kernel))
        if spec.boot.initrd is not None:
            yield from ("-initrd", str(spec.boot.initrd))
        yield from ("-append", kernel_cmdline(spec))


def _console_and_control(spec: VMSpec, runtime: Runtime) -> Iterator[str]:
    # qemu-options.hx: -chardev file,id=,path= (the per-boot console log the daemon reads)
    # behind either the first serial port (-serial chardev:<id>, ttyS0) or, for CVM flavours,
    # a virtconsole (hvc0) on its own virtio-serial-pci controller with -serial none (no 8250:
    # in a CVM each UART register access is a #VC / #VE exit; the study's consoles were
    # virtconsoles, docs/study.md). -qmp unix:<path>,server=on,wait=off (QMP, QEMU listening,
    # not waiting for a client before starting); -pidfile.
    yield from ("-chardev", f"file,id={SERIAL_CHARDEV_ID},path={opt_value(runtime.serial_log)}")
    if spec.console_device == "virtio":
        yield from ("-serial", "none")
        yield from ("-device", _virtio(spec, f"virtio-serial-pci,id={CONSOLE_BUS_ID}"))
        yield from ("-device", f"virtconsole,bus={CONSOLE_BUS_ID}.0,chardev={SERIAL_CHARDEV_ID}")
    else:
        yield from ("-serial", f"chardev:{SERIAL_CHARDEV_ID}")
    yield from ("-qmp", f"unix:{_unix_path('qmp_socket', runtime.qmp_socket)},server=on,wait=off")
    yield from ("-pidfile", str(runtime.pidfile))


def _panic_device() -> Iterator[str]:
    # docs/specs/pvpanic.rst: a guest with the pvpanic driver reports a kernel panic through
    # this device, which QMP announces as GUEST_PANICKED before the default -action
    # panic=shutdown (qemu-options.hx) ends QEMU; the daemon then records the VM as crashed.
    yield from ("-device", "pvpanic-pci")


def _disks(spec: VMSpec) -> Iterator[str]:
    # qemu-options.hx: -object iothread,id= ; -drive file=,if=none,id=,format=,aio=,cache=,
    # readonly= (aio=native needs cache.direct=on, i.e. cache=none or directsync);
    # -device virtio-blk-pci,drive=,iothread= (properties per -device virtio-blk-pci,help).
    for i, disk in enumerate(spec.disks):
        drive = [
            f"file={opt_value(disk.path)}",
            "if=none",
            f"id=disk{i}",
            f"format={disk.format}",
            f"aio={disk.aio}",
            f"cache={disk.cache}",
        ]
        if disk.readonly:
            drive.append("readonly=on")
        if disk.snapshot:
            drive.append("snapshot=on")
        device = f"virtio-blk-pci,drive=disk{i}"
        if disk.iothread:
            yield from ("-object", f"iothread,id=iothread{i}")
            device += f",iothread=iothread{i}"
        yield from ("-drive", ",".join(drive))
        yield from ("-device", _virtio(spec, device))


def _scratch_disk(spec: VMSpec, runtime: Runtime) -> Iterator[str]:
    # The study's benchmark disk (docs/study.md; STUDY qemu_option_virtio_blk: raw,
    # file.aio=native, cache.direct=on, cache.no-flush=off, its own iothread), as -drive
    # options: cache=none is cache.direct=on + cache.no-flush=off (qemu-options.hx, the -drive
    # cache table). The file and the modes are the daemon's (Runtime.scratch); the device
    # carries a fixed serial (-device virtio-blk-pci,help: serial) for the guest to find it.
    scratch = spec.scratch
    if scratch is None:
        return
    drive = runtime.scratch
    if drive is None:
        raise ArgvError("scratch: the daemon must create the scratch disk first (Runtime.scratch)")
    for key, wanted, got in (("aio", scratch.aio, drive.aio), ("cache", scratch.cache, drive.cache)):
        if wanted not in ("auto", got):
            raise ArgvError(f"scratch.{key}: the spec asks for {wanted!r}, the daemon chose {got!r}")
    device = f"virtio-blk-pci,drive={SCRATCH_DRIVE_ID},id={SCRATCH_DEVICE_ID},serial={SCRATCH_SERIAL}"
    if scratch.iothread:
        yield from ("-object", f"iothread,id={SCRATCH_IOTHREAD_ID}")
        device += f",iothread={SCRATCH_IOTHREAD_ID}"
    drive_opts = [
        f"file={opt_value(drive.path)}",
        "if=none",
        f"id={SCRATCH_DRIVE_ID}",
        f"format={scratch.format}",
        f"aio={drive.aio}",
        f"cache={drive.cache}",
    ]
    yield from ("-drive", ",".join(drive_opts))
    yield from ("-device", _virtio(spec, device))


def tap_vhost(spec: VMSpec, runtime: Runtime) -> bool:
    """Whether the tap NIC uses vhost-net: the spec allows it and the daemon found /dev/vhost-net."""
    return spec.network.vhost and runtime.vhost_net


def _network(spec: VMSpec, runtime: Runtime) -> Iterator[str]:
    # qemu-options.hx: -netdev user,id=,hostfwd=[tcp|udp]:[hostaddr]:hostport-[guestaddr]:guestport
    # (the spec only allows loopback host addresses); -netdev tap,id=,ifname=,script=no,
    # downscript=no,vhost=on|off,queues=n ("queues=n ... for multiqueue TAP").
    # virtio-net-pci mq=on and vectors=2*queues+2 (a vector per rx and tx queue, plus config
    # and control: the study's 8-queue NIC used vectors=18).
    # The tap is the one the daemon made in the VM's network namespace (host_daemon.netns),
    # where QEMU runs; vhost=on only where the daemon found /dev/vhost-net (Runtime.vhost_net).
    # -netdev stream,id=,server=off,addr.type=unix,addr.path= (qemu-options.hx, QEMU >= 7.2):
    # QEMU connects to the socket of the passt the daemon started (host_daemon.passt), which
    # forwards the spec's ports itself, so no forward appears here.
    net = spec.network
    if net.mode == "none":
        return
    if net.mode == "passt":
        if runtime.passt_socket is None:
            raise ArgvError('network.mode: "passt" needs the socket of a passt the daemon started')
        path = opt_value(runtime.passt_socket)
        yield from ("-netdev", f"stream,id=net0,server=off,addr.type=unix,addr.path={path}")
        yield from ("-device", _virtio(spec, "virtio-net-pci,netdev=net0"))
        return
    if net.mode == "user":
        props = ["user", "id=net0"]
        props += [f"hostfwd={f.proto}:{f.host_addr}:{f.host_port}-:{f.guest_port}" for f in net.forwards]
        yield from ("-netdev", ",".join(props))
        yield from ("-device", _virtio(spec, "virtio-net-pci,netdev=net0"))
        return
    ifname = net.ifname or DEFAULT_TAP_NAME
    props = ["tap", "id=net0", f"ifname={ifname}", "script=no", "downscript=no"]
    props.append(f"vhost={'on' if tap_vhost(spec, runtime) else 'off'}")
    device = "virtio-net-pci,netdev=net0"
    queues = net.tap_queues(spec.vcpus)
    if queues > 1:
        props.append(f"queues={queues}")
        device += f",mq=on,vectors={2 * queues + 2}"
    yield from ("-netdev", ",".join(props))
    yield from ("-device", _virtio(spec, device))


def _shares(spec: VMSpec) -> Iterator[str]:
    # qemu-options.hx: -fsdev local,id=,path=,security_model=none,readonly=on and
    # -device virtio-9p-pci,fsdev=,mount_tag= (the long form of -virtfs, used so that the
    # device can carry the virtio flags).
    for i, share in enumerate(spec.shares):
        fsdev = ["local", f"id=fs{i}", f"path={opt_value(share.path)}", "security_model=none"]
        if share.readonly:
            fsdev.append("readonly=on")
        yield from ("-fsdev", ",".join(fsdev))
        yield from ("-device", _virtio(spec, f"virtio-9p-pci,fsdev=fs{i},mount_tag={share.tag}"))


def _agent_channel(spec: VMSpec, runtime: Runtime, channel: ResolvedChannel) -> Iterator[str]:
    # vhost-vsock-pci,guest-cid= (in-kernel vhost, /dev/vhost-vsock; -device vhost-vsock-pci,help).
    # vhost-user-vsock-pci,chardev= with -chardev socket,path= (vhost-user.rst: QEMU connects to
    # the back end's socket, e.g. vhost-device-vsock --socket; the guest CID is the back end's).
    # virtio-serial-pci + virtserialport,chardev=,name= with -chardev socket,server=on,wait=off
    # (qemu-options.hx -chardev socket; QEMU listens and the daemon dials).
    if channel == "none":
        return
    if channel == "vhost-vsock":
        cid = spec.agent.cid if spec.agent.cid is not None else runtime.guest_cid
        if cid is None:
            raise ArgvError(
                "agent.cid: vhost-vsock needs a guest CID and neither the spec nor the daemon set one"
            )
        yield from ("-device", _virtio(spec, f"vhost-vsock-pci,id=vsock0,guest-cid={cid}"))
        return
    socket = spec.agent.socket or runtime.agent_socket
    if socket is None:
        raise ArgvError(
            f"agent.socket: {channel} needs a socket path and neither the spec nor the daemon set one"
        )
    path = _unix_path("agent.socket", socket)
    if channel == "vhost-user-vsock":
        yield from ("-chardev", f"socket,id=vsock0,path={path}")
        yield from ("-device", _virtio(spec, "vhost-user-vsock-pci,chardev=vsock0"))
        return
    yield from ("-chardev", f"socket,id=agent0,path={path},server=on,wait=off")
    yield from ("-device", _virtio(spec, "virtio-serial-pci,id=vser0"))
    yield from ("-device", f"virtserialport,bus=vser0.0,chardev=agent0,name={VIRTIO_SERIAL_PORT_NAME}")

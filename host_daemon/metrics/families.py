"""The host exporter's metric families: pure functions of the per-VM states.

The host-side twin of the guest agent's collectors (``guest_agent/collectors``): each
function turns snapshots into client_python families and touches nothing else, so a
scrape never waits for a VM and the families are tested on states built by hand.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from cvmcore.build_info import build_info
from host_daemon.metrics.state import COLLECTORS, MAX_VCPU_SERIES, VM_STATES, VMState


def info_families(states: list[VMState]) -> Iterator[Metric]:
    info = GaugeMetricFamily(
        "cvm_vm_info",
        "Every VM the exporter knows, running or not: its TEE, machine type, QEMU version and "
        "who runs it (source: cvm-hostd or libvirt) (value 1).",
        labels=["vm", "tee", "machine", "qemu_version", "source"],
    )
    vm_state = GaugeMetricFamily(
        "cvm_vm_state",
        "1 for the VM's current state, 0 for the others (defined, starting, running, paused, "
        "stopping, stopped, crashed, other).",
        labels=["vm", "state"],
    )
    vcpus = GaugeMetricFamily("cvm_vm_vcpus", "vCPUs the VM is configured with.", labels=["vm"])
    memory = GaugeMetricFamily("cvm_vm_memory_bytes", "Memory the VM is configured with.", labels=["vm"])
    started = GaugeMetricFamily(
        "cvm_vm_start_time_seconds",
        "When the VM's running QEMU process started (Unix time); absent while it is not running.",
        labels=["vm"],
    )
    phases = GaugeMetricFamily(
        "cvm_vm_boot_phase_seconds",
        "Duration of each phase of the VM's last boot (spawn, firmware, kernel, userspace).",
        labels=["vm", "phase"],
    )
    unmeasured = GaugeMetricFamily(
        "cvm_vm_boot_phase_unmeasured",
        "1 for each phase of the VM's last boot that has no figure (e.g. the daemon restarted while "
        "it ended); the reason is in cvmctl vm show.",
        labels=["vm", "phase"],
    )
    for state in states:
        view = state.view
        info.add_metric([view.name, view.tee, view.machine, view.qemu_version, view.source], 1.0)
        for name in VM_STATES:
            vm_state.add_metric([view.name, name], 1.0 if view.state == name else 0.0)
        if view.vcpus:
            vcpus.add_metric([view.name], float(view.vcpus))
        if view.memory_bytes:
            memory.add_metric([view.name], view.memory_bytes)
        if view.live and view.started_at:
            started.add_metric([view.name], view.started_at)
        for phase, seconds in sorted(view.boot_phases.items()):
            phases.add_metric([view.name, phase], seconds)
        for phase in sorted(view.boot_unmeasured):
            unmeasured.add_metric([view.name, phase], 1.0)
    yield from (info, vm_state, vcpus, memory, started, phases, unmeasured)


def kvm_families(states: list[VMState]) -> Iterator[Metric]:
    available = GaugeMetricFamily(
        "cvm_vm_kvm_stats_available",
        "1 if QEMU reports KVM statistics (query-stats, provider kvm); 0 under TCG or QEMU < 7.1.",
        labels=["vm"],
    )
    exits = CounterMetricFamily("cvm_vm_kvm_exits", "VM exits to KVM, summed over vCPUs.", labels=["vm"])
    by_kind = CounterMetricFamily(
        "cvm_vm_kvm_exits_by_kind",
        "VM exits of a KVM exit class (halt, io, mmio, irq, ...), summed over vCPUs; "
        "classes are not exclusive and do not add up to cvm_vm_kvm_exits_total.",
        labels=["vm", "kind"],
    )
    vcpu_exits = CounterMetricFamily(
        "cvm_vm_kvm_vcpu_exits", "VM exits to KVM of one vCPU.", labels=["vm", "vcpu"]
    )
    vcpu_halts = CounterMetricFamily(
        "cvm_vm_kvm_vcpu_halt_exits", "HLT exits to KVM of one vCPU.", labels=["vm", "vcpu"]
    )
    poll = CounterMetricFamily(
        "cvm_vm_kvm_halt_poll_seconds",
        "Time KVM polled a halted vCPU before a wake-up (success) or before giving up (fail); "
        "halt_poll_success_ns / halt_poll_fail_ns.",
        labels=["vm", "result"],
    )
    wait = CounterMetricFamily(
        "cvm_vm_kvm_halt_wait_seconds",
        "Time halted vCPUs slept in KVM after polling (halt_wait_ns), summed over vCPUs.",
        labels=["vm"],
    )
    attempts = CounterMetricFamily(
        "cvm_vm_kvm_halt_poll_attempts", "Halt polls KVM attempted (halt_attempted_poll).", labels=["vm"]
    )
    successes = CounterMetricFamily(
        "cvm_vm_kvm_halt_poll_successes",
        "Halt polls that saw a wake-up before the poll ended (halt_successful_poll).",
        labels=["vm"],
    )
    wakeups = CounterMetricFamily(
        "cvm_vm_kvm_halt_wakeups", "Halted vCPUs woken up (halt_wakeup).", labels=["vm"]
    )
    for state in states:
        name = state.view.name
        if state.kvm_available is not None:
            available.add_metric([name], 1.0 if state.kvm_available else 0.0)
        stats = state.kvm
        if stats is None:
            domain = state.view.domain
            if domain is not None and domain.stats is not None and domain.config.domain_type == "kvm":
                # no passthrough: the halt-polling times libvirt itself reports (cpu.haltpoll.*)
                for result, seconds in sorted(domain.stats.haltpoll_seconds.items()):
                    poll.add_metric([name, result], seconds)
            continue
        exits.add_metric([name], stats.exits)
        for kind, value in sorted(stats.exits_by_kind.items()):
            by_kind.add_metric([name, kind], value)
        if len(stats.vcpu_exits) <= MAX_VCPU_SERIES:
            for index, value in enumerate(stats.vcpu_exits):
                vcpu_exits.add_metric([name, str(index)], value)
            for index, value in enumerate(stats.vcpu_halt_exits):
                vcpu_halts.add_metric([name, str(index)], value)
        for result, seconds in sorted(stats.halt_poll_seconds.items()):
            poll.add_metric([name, result], seconds)
        wait.add_metric([name], stats.halt_wait_seconds)
        attempts.add_metric([name], stats.halt_poll_attempts)
        successes.add_metric([name], stats.halt_poll_successes)
        wakeups.add_metric([name], stats.halt_wakeups)
    yield from (available, exits, by_kind, vcpu_exits, vcpu_halts, poll, wait, attempts, successes, wakeups)


def proc_families(states: list[VMState]) -> Iterator[Metric]:
    run = CounterMetricFamily(
        "cvm_vm_vcpu_seconds", "Time the vCPU thread ran on a host CPU (schedstat).", labels=["vm", "vcpu"]
    )
    delay = CounterMetricFamily(
        "cvm_vm_vcpu_delay_seconds",
        "Time the vCPU thread was runnable but waited for a host CPU (schedstat run-queue wait).",
        labels=["vm", "vcpu"],
    )
    vhost = CounterMetricFamily(
        "cvm_vm_vhost_worker_cpu_seconds",
        "CPU time of the VM's vhost worker threads (vhost-<qemu pid>), by index in thread-id order.",
        labels=["vm", "worker"],
    )
    cpu = CounterMetricFamily(
        "cvm_vm_qemu_cpu_seconds",
        "CPU time of the QEMU process by mode (user includes the guest's time under KVM).",
        labels=["vm", "mode"],
    )
    rss = GaugeMetricFamily("cvm_vm_qemu_resident_memory_bytes", "Resident memory of QEMU.", labels=["vm"])
    for state in states:
        name = state.view.name
        live_domain = state.view.domain if state.view.live else None
        domain = live_domain.stats if live_domain is not None else None
        reading = state.proc
        if reading is not None and reading.vcpu_run_seconds:
            pairs: list[tuple[float | None, float | None]] = list(
                zip(reading.vcpu_run_seconds, reading.vcpu_wait_seconds, strict=True)
            )
        elif domain is not None:  # libvirt reads the same schedstat (vcpu.<n>.time / .delay)
            pairs = [(ran, waited) for ran, waited in domain.vcpu_seconds]
        else:
            pairs = []
        for index, (ran, waited) in enumerate(pairs):
            if ran is not None and waited is not None:
                run.add_metric([name, str(index)], ran)
                delay.add_metric([name, str(index)], waited)
        if reading is None:
            if domain is not None and state.view.pid <= 0:  # a remote libvirt: cpu.user / cpu.system
                for mode, seconds in sorted(domain.cpu_seconds.items()):
                    cpu.add_metric([name, mode], seconds)
            continue
        for index, seconds in enumerate(reading.vhost_seconds):
            vhost.add_metric([name, str(index)], seconds)
        for mode, seconds in sorted(reading.cpu_seconds.items()):
            cpu.add_metric([name, mode], seconds)
        rss.add_metric([name], reading.resident_bytes)
    yield from (run, delay, vhost, cpu, rss)


def device_families(states: list[VMState]) -> Iterator[Metric]:
    """Disks (libvirt's ``block.*``, or QMP ``query-blockstats`` for the daemon's own VMs), network
    interfaces and the balloon (libvirt's ``net.*``, ``balloon.current``)."""
    families = {
        key: CounterMetricFamily(f"cvm_vm_{key}", text, labels=["vm", label])
        for key, text, label in (
            ("block_read_bytes", "Bytes the VM read from a disk (rd.bytes).", "device"),
            ("block_written_bytes", "Bytes the VM wrote to a disk (wr.bytes).", "device"),
            ("block_reads", "Read requests of the VM to a disk (rd.reqs).", "device"),
            ("block_writes", "Write requests of the VM to a disk (wr.reqs).", "device"),
            (
                "network_receive_bytes",
                "Bytes received on the VM's host-side interface (rx.bytes).",
                "interface",
            ),
            ("network_transmit_bytes", "Bytes sent on the VM's host-side interface (tx.bytes).", "interface"),
            ("network_receive_packets", "Packets received on the VM's host-side interface.", "interface"),
            ("network_transmit_packets", "Packets sent on the VM's host-side interface.", "interface"),
        )
    }
    balloon = GaugeMetricFamily(
        "cvm_vm_balloon_bytes", "Memory the VM's balloon leaves the guest (balloon.current).", labels=["vm"]
    )
    for state in states:
        if not state.view.live:
            continue
        name = state.view.name
        domain = state.view.domain.stats if state.view.domain is not None else None
        disks = domain.blocks if domain is not None else state.blocks or ()
        for disk in disks:
            families["block_read_bytes"].add_metric([name, disk.name], disk.read_bytes)
            families["block_written_bytes"].add_metric([name, disk.name], disk.write_bytes)
            families["block_reads"].add_metric([name, disk.name], disk.reads)
            families["block_writes"].add_metric([name, disk.name], disk.writes)
        nets = domain.nets if domain is not None else state.proc.nets if state.proc is not None else ()
        for net in nets:
            families["network_receive_bytes"].add_metric([name, net.name], net.read_bytes)
            families["network_transmit_bytes"].add_metric([name, net.name], net.write_bytes)
            families["network_receive_packets"].add_metric([name, net.name], net.reads)
            families["network_transmit_packets"].add_metric([name, net.name], net.writes)
        if domain is not None and domain.balloon_bytes is not None:
            balloon.add_metric([name], domain.balloon_bytes)
    yield from families.values()
    yield balloon


def status_families(states: list[VMState]) -> Iterator[Metric]:
    agent_up = GaugeMetricFamily(
        "cvm_agent_up", "1 if the VM's guest agent answered its last GetMetrics.", labels=["vm"]
    )
    vm_success = GaugeMetricFamily(
        "cvm_vm_collector_success",
        "1 if this part of the VM's last refresh succeeded, 0 if it failed or missed its deadline.",
        labels=["vm", "collector"],
    )
    vm_duration = GaugeMetricFamily(
        "cvm_vm_collector_duration_seconds",
        "Seconds this part of the VM's last refresh took.",
        labels=["vm", "collector"],
    )
    timeouts = CounterMetricFamily(
        "cvm_vm_collector_timeouts",
        "Refreshes of this part of the VM that missed their deadline (a stuck QEMU or guest).",
        labels=["vm", "collector"],
    )
    duration = GaugeMetricFamily(
        "cvm_scrape_collector_duration_seconds",
        "Seconds the collector's last refresh took (the slowest VM).",
        labels=["collector"],
    )
    success = GaugeMetricFamily(
        "cvm_scrape_collector_success",
        "1 if the collector's last refresh succeeded for every VM.",
        labels=["collector"],
    )
    followed = GaugeMetricFamily(
        "cvm_hostd_vms_followed", "VMs the host exporter knows (its own and libvirt's, running or not)."
    )
    followed.add_metric([], float(len(states)))
    for collector in COLLECTORS:
        results = [s.parts[collector] for s in states if collector in s.parts]
        duration.add_metric([collector], max((r.duration_seconds for r in results), default=0.0))
        success.add_metric([collector], 1.0 if all(r.success for r in results) else 0.0)
    for state in states:
        name = state.view.name
        if state.view.agent_address:
            agent_up.add_metric([name], 1.0 if state.guest is not None and state.guest.up else 0.0)
        for collector, result in sorted(state.parts.items()):
            vm_success.add_metric([name, collector], 1.0 if result.success else 0.0)
            vm_duration.add_metric([name, collector], result.duration_seconds)
        for collector, count in sorted(state.timeouts.items()):
            timeouts.add_metric([name, collector], float(count))
    yield from (agent_up, vm_success, vm_duration, timeouts, duration, success, followed)
    yield build_info(
        "cvm_hostd_build_info", "The cvm-hostd version and Python that serve these series (value 1)."
    )

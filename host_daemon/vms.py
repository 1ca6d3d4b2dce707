"""The VM lifecycle: create, start, watch, stop, kill, destroy, and reattach after a restart.

States (:class:`~host_daemon.store.VMState`)::

    defined --start--> starting --agent answers--> running --stop--> stopping --> stopped
                          |                          |                             ^
                          +---- QEMU dies unasked ---+--> crashed                  |
                          +---- kill / guest powers off ---------------------------+

Each started VM owns a run directory ``<state_dir>/vms/<name>/`` (QMP socket, pidfile,
console log per boot, the hybrid vsock socket, the ``[scratch]`` disk's file while QEMU runs:
:mod:`host_daemon.scratch`), with ``[network] mode = "tap"`` a network namespace holding its tap
(made before QEMU, which runs inside it, and deleted when QEMU exits, on ``vm rm`` and, for
VMs no longer running, at daemon start: :mod:`host_daemon.netns`) and, while live, three trio
tasks in the manager's nursery: the **boot** task (connect QMP, read the console, ask the agent for
health, recording the boot phases), the **exit** task (a pidfd that wakes when QEMU exits,
for the exit status and the verdict stopped or crashed) and, for ``vhost-user-vsock``, the
backend process it follows.

The boot task records the boot phases of :mod:`host_daemon.boottiming`; the agent's vsock
channel (a CID, or a vhost-device-vsock backend) comes from :mod:`host_daemon.vsock_backend`.
As soon as QMP names the vCPU threads it applies ``[pinning] host_cpus``
(:mod:`host_daemon.pinning`) and records what the kernel reports; a VM whose pinning the
kernel refuses is killed rather than left running unpinned.

QEMU runs in its own session, so a daemon crash leaves VMs running; on start the daemon
reattaches to every live VM whose pid still names the same process (pid + start time) and
marks the others crashed. Reattaching applies the pinning again, so a restarted daemon
enforces the spec even if a thread was moved while it was away.
"""

from __future__ import annotations

import dataclasses
import shutil
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import structlog
import trio

from cvmcore.address import HybridVsockAddress, parse_address
from cvmcore.client import connect
from cvmcore.errors import CvmError, UsageError
from host_daemon import netns, passt, pinning
from host_daemon import process as proc
from host_daemon.accel import decide_channel, probe_channel, resolve_accel
from host_daemon.boottiming import (
    PHASES,
    RESTARTED_MID_BOOT,
    BootClock,
    console_has_init_marker,
    console_marks,
    tail_lines,
)
from host_daemon.hostcheck import HostFacts, gather_host_facts
from host_daemon.preflight import HostGrant, needs_facts, preflight
from host_daemon.qemu_args import Runtime, build_qemu_argv
from host_daemon.qmp import EventListener, QMPClient, QMPError, connect_qmp
from host_daemon.scratch import create_scratch, remove_scratch, remove_stale_scratch
from host_daemon.spec import SpecError, VMSpec, parse_spec
from host_daemon.store import VMRecord, VMState, VMStore, now
from host_daemon.vsock_backend import (
    BACKEND_SOCKET,
    free_cid,
    stale_sockets,
    start_vhost_device_vsock,
    wait_vhost_started,
)
from host_daemon.vsock_backend import agent_address as vsock_agent_address

log = structlog.get_logger("host_daemon.vms")

QMP_CONNECT_SECONDS: Final = 30.0
DEFAULT_BOOT_SECONDS: Final = 180.0
DEFAULT_STOP_SECONDS: Final = 10.0


class VMNotFound(UsageError):
    def __init__(self, name: str) -> None:
        super().__init__(f"no VM named {name!r}")


class VMConflict(CvmError):
    """The VM is not in a state that allows the operation."""


@dataclass
class LiveVM:
    """What the daemon holds for a VM whose QEMU runs."""

    name: str
    run_dir: Path
    qemu: proc.Spawned
    helpers: list[proc.Spawned] = field(default_factory=list)
    host_cpus: tuple[int, ...] = ()  # [pinning] host_cpus: vCPU i runs on host_cpus[i]
    qmp: QMPClient | None = None
    qmp_events: EventListener | None = None
    stop_requested: str = ""  # why, when the daemon itself ended the VM
    guest_shutdown: bool = False
    guest_panicked: bool = False
    failure: str = ""  # why the daemon killed the VM because it could not run as specified
    netns: str = ""  # the network namespace the daemon made for the tap path: deleted on exit
    exited: trio.Event = field(default_factory=trio.Event)
    boot_scope: trio.CancelScope = field(default_factory=trio.CancelScope)


@dataclass
class AgentDials:
    """How the boot's dials to the agent went: what a boot that never became ready reports."""

    attempts: int = 0
    last_error: str = ""
    waiting: str = ""  # what the boot waits for before its first dial, while it waits

    def describe(self) -> str:
        """ "" when the boot never came to its dials (a timeout before the kernel ran init)."""
        if self.waiting:
            return self.waiting
        if not self.attempts:
            return ""
        if not self.last_error:
            return f"the agent was dialled {self.attempts} time(s)"
        return f"{self.attempts} dial(s) to the agent failed, the last with: {self.last_error}"


def _daemon_host_facts(qemu_binary: str) -> HostFacts:
    # A confidential spec names its own firmware image, which preflight checks: the host's
    # images are not searched (that reads every OVMF file there) on each start.
    return gather_host_facts(qemu_binary, search_firmware=False)


def _run_dir_for(state_dir: Path, name: str) -> Path:
    return state_dir / "vms" / name


class VMManager:
    """Owns every VM of one daemon. Call :meth:`run` in a nursery before anything else."""

    def __init__(
        self,
        state_dir: Path,
        *,
        qemu_binary: str = "qemu-system-x86_64",
        boot_seconds: float = DEFAULT_BOOT_SECONDS,
        dev_guest: Callable[[VMSpec], VMSpec] | None = None,
        host_facts: Callable[[str], HostFacts] = _daemon_host_facts,
    ) -> None:
        self.state_dir = state_dir
        self.qemu_binary = qemu_binary
        self._host_facts = host_facts  # (qemu binary) -> facts; tests hand in a host of their own
        self.boot_seconds = boot_seconds
        self._complete_spec = dev_guest
        (state_dir / "vms").mkdir(parents=True, exist_ok=True)
        self.store = VMStore(state_dir / "hostd.db")
        self._live: dict[str, LiveVM] = {}
        self._nursery: trio.Nursery | None = None
        self._watchers: set[trio.MemorySendChannel[tuple[str, VMRecord | None]]] = set()
        self._lock = trio.Lock()

    # -- running ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Reattach to live VMs, then keep their tasks until cancelled (VMs keep running)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self._reattach_all()
                task_status.started()
                await trio.sleep_forever()
        finally:
            for live in self._live.values():
                if live.qmp is not None:
                    with trio.CancelScope(shield=True):
                        await live.qmp.aclose()
                live.qemu.close()
            self.store.close()

    def _spawn_task(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Run a per-VM task; its failure is logged and contained, never the daemon's end."""
        assert self._nursery is not None, "VMManager.run() is not running"

        async def contained() -> None:
            try:
                await fn(*args)
            except Exception:
                log.exception("vm_task_failed", task=getattr(fn, "__name__", repr(fn)))

        self._nursery.start_soon(contained)

    # -- records and events -------------------------------------------------------------

    def _save(self, record: VMRecord, event: str = "state") -> VMRecord:
        self.store.save(record)
        log.info("vm_" + event, vm=record.name, state=str(record.state), reason=record.state_reason)
        for channel in list(self._watchers):
            try:
                channel.send_nowait((event, record))
            except trio.WouldBlock:
                pass  # a slow watcher misses intermediate events; it still gets the next
            except trio.BrokenResourceError:
                self._watchers.discard(channel)
        return record

    def get(self, name: str) -> VMRecord:
        record = self.store.get(name)
        if record is None:
            raise VMNotFound(name)
        return record

    def list(self) -> list[VMRecord]:
        return self.store.all()

    def live_vm(self, name: str) -> LiveVM | None:
        """The daemon's handle on a running VM (its QEMU process and QMP client), if it runs.

        The QMP socket takes one client, so others (the host exporter) share this one.
        """
        return self._live.get(name)

    async def watch(self) -> AsyncIterator[tuple[str, VMRecord | None]]:
        """The current records as ``snapshot`` events, then every change, until cancelled."""
        send, receive = trio.open_memory_channel[tuple[str, VMRecord | None]](256)
        self._watchers.add(send)
        try:
            for record in self.store.all():
                yield "snapshot", record
            async with receive:
                async for item in receive:
                    yield item
        finally:
            self._watchers.discard(send)
            send.close()

    # -- create and destroy -------------------------------------------------------------

    def create(self, spec_toml: str, source: str = "<spec>") -> VMRecord:
        spec = parse_spec(spec_toml, source=source or "<spec>")
        record = VMRecord(name=spec.name, spec_toml=spec_toml, created_at=now())
        try:
            self.store.insert(record)
        except KeyError:
            raise VMConflict(f"a VM named {spec.name!r} exists already (cvmctl vm rm {spec.name})") from None
        log.info("vm_created", vm=spec.name, tee=spec.tee)
        return self._save(record, "created")

    async def destroy(self, name: str) -> None:
        async with self._lock:
            record = self.get(name)
            if record.state.live:
                raise VMConflict(f"VM {name!r} is {record.state}: stop or kill it first")
            self.store.delete(name)
            shutil.rmtree(_run_dir_for(self.state_dir, name), ignore_errors=True)
            await self._delete_netns(name, netns.plan(name, self.state_dir).namespace)
        for channel in list(self._watchers):
            with suppress(trio.WouldBlock, trio.BrokenResourceError):
                channel.send_nowait(("destroyed", dataclasses.replace(record)))
        log.info("vm_destroyed", vm=name)

    # -- start --------------------------------------------------------------------------

    def _spec(self, record: VMRecord) -> VMSpec:
        spec = parse_spec(record.spec_toml, source=f"VM {record.name}")
        if self._complete_spec is not None:
            spec = self._complete_spec(spec)
        return spec

    def _preflight(self, spec: VMSpec) -> HostGrant:
        facts = self._host_facts(self.qemu_binary) if needs_facts(spec) else None
        return preflight(spec, facts)

    async def start(self, name: str) -> VMRecord:
        requested_at = time.monotonic()
        async with self._lock:
            record = self.get(name)
            if record.state.live:
                raise VMConflict(f"VM {name!r} is {record.state} already")
            spec = await trio.to_thread.run_sync(self._spec, record)
            grant = await trio.to_thread.run_sync(self._preflight, spec)  # HostNotReady before QEMU
            accel = resolve_accel(spec.accel, spec.tee)
            channel = decide_channel(spec.agent.channel, probe_channel()).channel
            run_dir = _run_dir_for(self.state_dir, name)
            run_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
            boot = record.boot_count + 1
            console = run_dir / f"console-{boot}.log"
            for stale in (run_dir / "qmp.sock", *stale_sockets(run_dir)):
                stale.unlink(missing_ok=True)
            console.write_bytes(b"")
            scratch = None
            if spec.scratch is not None:  # a fresh file each boot; HostNotReady before QEMU
                made = await trio.to_thread.run_sync(create_scratch, run_dir, spec.scratch)
                scratch = made.drive
                log.info(
                    "scratch_created",
                    vm=name,
                    path=str(scratch.path),
                    size_mib=spec.scratch.size_mib,
                    filesystem=made.filesystem,
                    direct_io=made.direct_io,
                    allocation=made.allocation,
                    aio=scratch.aio,
                    cache=scratch.cache,
                    seconds=round(made.seconds, 4),
                )
            tap = None
            helpers: list[proc.Spawned] = []  # back ends QEMU connects to; they die with it
            try:
                if spec.network.mode == "tap":  # HostNotReady before QEMU
                    tap = netns.plan(name, self.state_dir, spec.network.ifname)
                    queues = spec.network.tap_queues(spec.vcpus)
                    seconds = await trio.to_thread.run_sync(netns.create, tap, queues)
                    vhost_net = await trio.to_thread.run_sync(netns.vhost_net_available)
                    log.info(
                        "netns_created",
                        vm=name,
                        netns=tap.namespace,
                        tap=tap.tap,
                        queues=queues,
                        vhost_net=vhost_net,
                        guest=tap.guest_address,
                        seconds=round(seconds, 4),
                    )
                else:
                    vhost_net = False
                if spec.network.mode == "passt":  # HostNotReady before QEMU without passt
                    helpers.append(await passt.start(run_dir, spec.network.forwards))
                    log.info("passt_started", vm=name, pid=helpers[-1].pid, forwards=spec.network.forwards)
                runtime = Runtime(
                    accel=accel.accel,
                    qmp_socket=run_dir / "qmp.sock",
                    pidfile=run_dir / "qemu.pid",
                    serial_log=console,
                    qemu_binary=self.qemu_binary,
                    agent_channel=channel,
                    agent_socket={
                        "vhost-user-vsock": run_dir / BACKEND_SOCKET,
                        "virtio-serial": run_dir / "agent-serial.sock",
                    }.get(channel),
                    guest_cid=self._free_cid() if channel == "vhost-vsock" else None,
                    qgs=grant.qgs,
                    numactl=grant.numactl,
                    scratch=scratch,
                    vhost_net=vhost_net,
                    passt_socket=run_dir / passt.SOCKET if spec.network.mode == "passt" else None,
                )
                argv = build_qemu_argv(spec, runtime)
                if tap is not None:  # QEMU opens the tap in the VM's namespace (host_daemon.netns)
                    argv = [*netns.exec_prefix(tap.namespace, netns.ip_binary()), *argv]
                if channel == "vhost-user-vsock":
                    helpers.append(await start_vhost_device_vsock(run_dir))
                cid = spec.agent.cid or runtime.guest_cid
                agent_address = vsock_agent_address(channel, run_dir, cid)
                (run_dir / "qemu.argv").write_text("".join(f"{arg}\n" for arg in argv))
                spawned_at = time.monotonic()
                try:
                    qemu = proc.spawn(argv, run_dir / "qemu.log")
                except OSError as exc:
                    raise UsageError(f"cannot start QEMU ({argv[0]}): {exc.strerror}") from exc
            except BaseException:
                with trio.CancelScope(shield=True):  # reaped even when the start is cancelled
                    for helper in helpers:  # no QEMU will connect to them
                        await proc.kill_and_reap(helper)
                if scratch is not None:
                    remove_scratch(run_dir)  # no QEMU will use it
                if tap is not None:
                    with suppress(CvmError):
                        netns.delete(tap.namespace)
                raise
            live = LiveVM(
                name,
                run_dir,
                qemu,
                helpers,
                host_cpus=spec.pinning.host_cpus,
                netns=tap.namespace if tap is not None else "",
            )
            self._live[name] = live
            record = self._save(
                record.with_state(
                    VMState.STARTING,
                    f"booting under {accel.accel} ({accel.reason})",
                    accel=accel.accel,
                    qemu_pid=qemu.pid,
                    qemu_start_ticks=qemu.start_ticks,
                    exit_status=None,
                    started_at=now(),
                    boot_count=boot,
                    agent_address=agent_address,
                    console_path=str(console),
                    boot_phases={},
                    boot_marks={},
                    boot_unmeasured={},
                    vcpu_thread_ids=(),
                    last_console_lines=(),
                    helper_pids=tuple((h.pid, h.start_ticks) for h in helpers),
                    qemu_argv=tuple(argv),
                    vcpu_pins=(),
                    emulator_cpus="",
                )
            )
            self._spawn_task(self._follow_exit, live)
            self._spawn_task(self._boot, live, requested_at, spawned_at, console, agent_address)
            return record

    def _free_cid(self) -> int:
        used = {
            parse_address(r.agent_address).cid  # type: ignore[union-attr]
            for r in self.store.all()
            if r.state.live and r.agent_address.startswith("vsock://")
        }
        return free_cid(used)

    # -- the boot task ------------------------------------------------------------------

    async def _boot(
        self, live: LiveVM, requested_at: float, spawned_at: float, console: Path, agent_address: str
    ) -> None:
        clock = BootClock(requested_at, spawned_at)
        dials = AgentDials()

        def record_phase(name: str) -> None:
            clock.phase(name)
            self._save_clock(live.name, clock)

        with live.boot_scope:
            try:
                with trio.fail_after(self.boot_seconds):
                    record_phase("daemon")
                    live.qmp = await self._connect_qmp(live)
                    clock.mark("qmp")
                    record_phase("spawn")
                    vcpu_tids = await self._note_vcpus(live)
                    if not await self._pin(live, vcpu_tids, at_boot=True):
                        return  # killed: the exit task records why
                    self._spawn_task(self._follow_events, live)
                    async for mark, guest_uptime in console_marks(console):
                        clock.mark(mark)
                        if mark == "kernel":
                            record_phase("firmware")  # from the console; corrected at init
                        elif mark == "init":
                            if clock.kernel_started(guest_uptime):
                                record_phase("firmware")
                            elif "kernel" not in clock.marks:
                                why = (
                                    "no kernel line on the console and the guest uptime "
                                    f"({guest_uptime}) disagrees with the host clock"
                                )
                                clock.give_up(why, "firmware", "kernel")
                                log.info(
                                    "boot_phases_unmeasured", vm=live.name, phases="firmware,kernel", why=why
                                )
                            record_phase("kernel")
                            break
                    if agent_address:
                        await self._wait_for_agent(live, agent_address, dials)
                        clock.mark("agent")
                        record_phase("userspace")
                        reason = "the agent answers health"
                    else:
                        reason = "no agent channel; QEMU runs"
                    self._starting_to_running(live.name, reason)
            except trio.TooSlowError:
                record = self.get(live.name)
                if record.state is VMState.STARTING:
                    self._save(
                        record.with_state(
                            VMState.STARTING,
                            f"not ready after {self.boot_seconds:g} s"
                            + (f" ({why})" if (why := dials.describe()) else "")
                            + f": see {console} "
                            '(under KVM on a nested host, try accel = "tcg")',
                        )
                    )
            except Exception as exc:
                # A bug in following the boot: say so where `vm show` and a waiting
                # `vm start` look, not only in the daemon's log (the task's error is logged).
                record = self.get(live.name)
                if record.state is VMState.STARTING:
                    reason = f"the daemon stopped following this boot: {str(exc)[:200]} (see its log)"
                    self._save(record.with_state(VMState.STARTING, reason))
                raise

    def _save_clock(self, name: str, clock: BootClock) -> None:
        record = self.get(name)
        self._save(
            dataclasses.replace(
                record,
                boot_phases=dict(clock.phases),
                boot_marks=dict(clock.marks),
                boot_unmeasured=dict(clock.unmeasured),
            ),
            "boot-phase",
        )

    async def _resume_boot(self, live: LiveVM, record: VMRecord) -> None:
        """Finish the boot a previous daemon was timing when it died, from its recorded marks.

        The init marker is timed only if it arrives while this daemon watches the console;
        one already there came at an unknown moment, and the phases that need it are marked
        unmeasured (:data:`~host_daemon.boottiming.RESTARTED_MID_BOOT`), as is every phase
        whose start was never recorded.
        """
        clock = BootClock.resume(record.boot_marks, record.boot_phases, record.boot_unmeasured)
        console = Path(record.console_path)

        async def watch_console() -> None:
            if "init" in clock.marks:
                return
            if await trio.to_thread.run_sync(console_has_init_marker, console):
                return  # it came while no daemon watched
            async for mark, guest_uptime in console_marks(console):
                if mark == "init":  # a kernel line seen now may be old: only init is timed
                    clock.mark("init")
                    if "kernel" not in clock.marks and clock.kernel_started(guest_uptime):
                        clock.phase("firmware")
                    clock.phase("kernel")
                    self._save_clock(live.name, clock)
                    return

        with trio.move_on_after(self.boot_seconds):
            if record.agent_address:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(watch_console)
                    await self._wait_for_agent(live, record.agent_address, AgentDials())
                    clock.mark("agent")
                    nursery.cancel_scope.cancel()
                clock.phase("userspace")
                timed: tuple[str, ...] = PHASES
                reason = "the agent answers health"
            else:  # the boot ends at init, as in _boot
                await watch_console()
                timed, reason = PHASES[:-1], "no agent channel; QEMU runs"
            clock.give_up(RESTARTED_MID_BOOT, *timed)
            self._save_clock(live.name, clock)
            log.info(
                "boot_resumed",
                vm=live.name,
                phases=clock.phases,
                unmeasured=sorted(clock.unmeasured),
                after="daemon restart",
            )
            self._starting_to_running(live.name, reason)

    async def _connect_qmp(self, live: LiveVM) -> QMPClient:
        """Connect (retrying while QEMU creates the socket) and subscribe to events at once."""
        assert self._nursery is not None
        client = await connect_qmp(
            live.run_dir / "qmp.sock", self._nursery, deadline=QMP_CONNECT_SECONDS, retry=True, name=live.name
        )
        live.qmp_events = client.listen({"SHUTDOWN", "GUEST_PANICKED", "RESET"})
        return client

    async def _note_vcpus(self, live: LiveVM) -> tuple[int, ...] | None:
        """Record the vCPU thread ids, in vCPU order; None when QMP did not tell."""
        assert live.qmp is not None
        try:
            cpus = await live.qmp.execute("query-cpus-fast", deadline=5)
        except QMPError as exc:
            log.warning("query_cpus_failed", vm=live.name, error=str(exc))
            return None
        ordered = sorted(
            (cpu for cpu in cpus if "thread-id" in cpu), key=lambda cpu: int(cpu.get("cpu-index", 0))
        )
        tids = tuple(int(cpu["thread-id"]) for cpu in ordered)
        record = self.get(live.name)
        self._save(dataclasses.replace(record, vcpu_thread_ids=tids), "vcpus")
        return tids

    async def _pin(self, live: LiveVM, vcpu_tids: tuple[int, ...] | None, *, at_boot: bool) -> bool:
        """Apply ``[pinning] host_cpus`` and record what the kernel reports.

        At boot a refusal kills the VM (False): a VM must not run unpinned when its spec pins
        it. After a daemon restart the VM keeps running and the refusal is logged, with the
        recorded pinning cleared, since what was recorded may no longer hold.
        """
        if not live.host_cpus:
            return True
        if vcpu_tids is None:
            problem = "QMP query-cpus-fast did not name the vCPU threads"
        else:
            try:
                applied = await trio.to_thread.run_sync(
                    lambda: pinning.apply(live.qemu.pid, live.host_cpus, vcpu_tids)
                )
            except pinning.PinningError as exc:
                problem = str(exc)
            else:
                for note in applied.notes:
                    log.warning("pinning_note", vm=live.name, note=note)
                record = self.get(live.name)
                self._save(
                    dataclasses.replace(record, vcpu_pins=applied.vcpus, emulator_cpus=applied.emulator_cpus),
                    "pinned",
                )
                log.info(
                    "vcpus_pinned",
                    vm=live.name,
                    vcpus=[list(pin) for pin in applied.vcpus],
                    emulator_cpus=applied.emulator_cpus,
                )
                return True
        if at_boot:
            live.failure = f"vCPU pinning failed: {problem}"
            log.error("pinning_failed", vm=live.name, error=problem)
            proc.send_signal(live.qemu, signal.SIGKILL)
            return False
        log.error("pinning_failed", vm=live.name, error=problem, after="daemon restart")
        record = self.get(live.name)
        self._save(dataclasses.replace(record, vcpu_pins=(), emulator_cpus=""), "pinned")
        return True

    async def _follow_events(self, live: LiveVM) -> None:
        if live.qmp_events is None:
            return
        try:
            async for event in live.qmp_events:
                if event.name == "SHUTDOWN" and event.data.get("guest"):
                    live.guest_shutdown = True
                elif event.name == "GUEST_PANICKED":
                    live.guest_panicked = True
                    log.warning("guest_panicked", vm=live.name, info=dict(event.data))
        except QMPError:
            pass  # QEMU went away: the exit task tells the rest

    def _starting_to_running(self, name: str, reason: str) -> None:
        """RUNNING, unless something (a stop, a crash) moved the VM on meanwhile."""
        record = self.get(name)
        if record.state is VMState.STARTING:
            self._save(record.with_state(VMState.RUNNING, reason))

    async def _wait_for_agent(self, live: LiveVM, agent_address: str, dials: AgentDials) -> None:
        """Until the agent answers health. On the hybrid vsock path the first dial waits for
        the guest's vsock device to start (:func:`~host_daemon.vsock_backend.wait_vhost_started`).
        Attempts back off from 50 ms to 0.5 s: a VMM's vsock backend sees every refused
        attempt, and a guest importing Python over 9p under TCG takes seconds to listen.
        ``dials`` keeps the count and the last failure, for the reason of a boot that times
        out (a guest still booting refuses or resets each dial; a vsock backend that stopped
        serving leaves each one unanswered)."""
        address = parse_address(agent_address)
        if isinstance(address, HybridVsockAddress) and live.qmp is not None:
            dials.waiting = "the guest's vsock device never started: is its virtio-vsock driver loaded?"
            await wait_vhost_started(live.qmp)
            dials.waiting = ""
        pause = 0.05
        while True:
            dials.attempts += 1
            try:
                async with connect(address, timeout=2) as client:
                    status = await client.health()
                    if status == "SERVING":
                        return
                    dials.last_error = f"health says {status}"
            except CvmError as exc:
                dials.last_error = str(exc)[:300]
            await trio.sleep(pause)
            pause = min(pause * 1.5, 0.5)

    # -- the exit task ------------------------------------------------------------------

    async def _follow_exit(self, live: LiveVM) -> None:
        status = await proc.wait_exit(live.qemu)
        live.boot_scope.cancel()
        for helper in live.helpers:
            await proc.kill_and_reap(helper)
        live.qemu.close()
        if remove_scratch(live.run_dir):  # scratch: it does not outlive this QEMU
            log.info("scratch_removed", vm=live.name)
        if live.netns:  # nor does the tap network
            await self._delete_netns(live.name, live.netns)
        if live.qmp is not None:
            with trio.CancelScope(shield=True):
                await live.qmp.aclose()
        self._live.pop(live.name, None)
        record = self.store.get(live.name)
        if record is None:
            live.exited.set()
            return
        console_tail = tail_lines(Path(record.console_path)) if record.console_path else ()
        qemu_log_tail = tail_lines(live.run_dir / "qemu.log", 5)
        described = "unknown (QEMU was started by an earlier daemon)" if status is None else str(status)
        if live.failure and status in (-signal.SIGKILL, None):  # the daemon killed it for that
            state, reason = VMState.CRASHED, live.failure
        elif live.stop_requested:
            state, reason = VMState.STOPPED, live.stop_requested
        elif live.guest_panicked:
            state, reason = VMState.CRASHED, "the guest kernel panicked"
        elif live.guest_shutdown or status == 0:
            state, reason = VMState.STOPPED, "the guest powered off"
        else:
            detail = f": {qemu_log_tail[-1]}" if qemu_log_tail else ""
            how = (
                f"killed by signal {-status}"
                if status is not None and status < 0
                else f"exit status {described}"
            )
            state, reason = VMState.CRASHED, f"QEMU died unexpectedly ({how}){detail}"
        self._save(
            record.with_state(
                state,
                reason,
                qemu_pid=0,
                qemu_start_ticks=0,
                exit_status=status,
                last_console_lines=console_tail,
                helper_pids=(),
                vcpu_pins=(),
                emulator_cpus="",
            )
        )
        live.exited.set()  # only now: whoever waits for the exit sees the final record

    async def _delete_netns(self, name: str, namespace: str, **context: str) -> None:
        """Delete a VM's network namespace (with its tap), if there is one; errors are logged."""
        try:
            with trio.CancelScope(shield=True):
                gone = await trio.to_thread.run_sync(netns.delete, namespace)
        except CvmError as exc:
            log.error("netns_delete_failed", vm=name, netns=namespace, error=str(exc))
            return
        if gone:
            log.info("netns_deleted", vm=name, netns=namespace, **context)

    # -- stop and kill ------------------------------------------------------------------

    async def stop(self, name: str, timeout: float = DEFAULT_STOP_SECONDS) -> VMRecord:
        """ACPI powerdown; after ``timeout`` QMP quit; after 5 more seconds SIGKILL."""
        live = self._live.get(name)
        record = self.get(name)
        if live is None or not record.state.live:
            raise VMConflict(f"VM {name!r} is {record.state}, not running")
        live.stop_requested = "stopped on request"
        self._save(record.with_state(VMState.STOPPING, f"ACPI powerdown, quit after {timeout:g} s"))
        if live.qmp is not None:
            try:
                await live.qmp.execute("system_powerdown", deadline=5)
            except QMPError as exc:
                log.info("powerdown_failed", vm=name, error=str(exc))
        with trio.move_on_after(timeout):
            await live.exited.wait()
        if not live.exited.is_set():
            live.stop_requested = f"stopped on request (no ACPI shutdown within {timeout:g} s: QMP quit)"
            if live.qmp is not None:
                with suppress(QMPError):
                    await live.qmp.execute("quit", deadline=5)
            with trio.move_on_after(5):
                await live.exited.wait()
        if not live.exited.is_set():
            live.stop_requested = "stopped on request (QEMU ignored quit: killed)"
            proc.send_signal(live.qemu, signal.SIGKILL)
            with trio.move_on_after(5):
                await live.exited.wait()
        return self.get(name)

    async def kill(self, name: str) -> VMRecord:
        live = self._live.get(name)
        record = self.get(name)
        if live is None or not record.state.live:
            raise VMConflict(f"VM {name!r} is {record.state}, not running")
        live.stop_requested = "killed on request"
        proc.send_signal(live.qemu, signal.SIGKILL)
        with trio.move_on_after(5):
            await live.exited.wait()
        return self.get(name)

    # -- reattach after a daemon restart ------------------------------------------------

    async def _reattach_all(self) -> None:
        for record in self.store.all():
            if not record.state.live:
                continue
            qemu = proc.adopt(record.qemu_pid, record.qemu_start_ticks)
            namespace = netns.network_from_argv(record.qemu_argv).namespace
            if qemu is None:
                for pid, ticks in record.helper_pids:
                    proc.kill_pid_if_same(pid, ticks)
                if namespace:
                    await self._delete_netns(record.name, namespace, after="daemon restart")
                self._save(
                    record.with_state(
                        VMState.CRASHED,
                        "QEMU exited while the daemon was not running",
                        qemu_pid=0,
                        qemu_start_ticks=0,
                        last_console_lines=tail_lines(Path(record.console_path))
                        if record.console_path
                        else (),
                        helper_pids=(),
                        vcpu_pins=(),  # the threads are gone with the process
                        emulator_cpus="",
                    )
                )
                continue
            helpers = [h for pid, ticks in record.helper_pids if (h := proc.adopt(pid, ticks)) is not None]
            live = LiveVM(
                record.name,
                _run_dir_for(self.state_dir, record.name),
                qemu,
                helpers,
                host_cpus=self._pinned_cpus(record),
                netns=namespace,
            )
            self._live[record.name] = live
            log.info("vm_reattached", vm=record.name, pid=qemu.pid)
            self._spawn_task(self._follow_exit, live)
            self._spawn_task(self._reconnect, live, record)
        # Scratch disks of VMs whose QEMU ended while no daemon watched (or of a removal cut
        # short): nothing uses them any more.
        for path in remove_stale_scratch(self.state_dir / "vms", self._live):
            log.info("scratch_removed", vm=path.parent.name, after="daemon restart")
        # Likewise this daemon's network namespaces (by its tag) that no running VM uses.
        for namespace in await trio.to_thread.run_sync(netns.remove_stale, self.state_dir, list(self._live)):
            log.info("netns_deleted", netns=namespace, after="daemon restart")

    @staticmethod
    def _pinned_cpus(record: VMRecord) -> tuple[int, ...]:
        try:
            return parse_spec(record.spec_toml, source=f"VM {record.name}").pinning.host_cpus
        except SpecError as exc:  # a spec an older daemon accepted; the VM runs anyway
            log.error("reattach_spec_unreadable", vm=record.name, error=str(exc))
            return ()

    async def _reconnect(self, live: LiveVM, record: VMRecord) -> None:
        with live.boot_scope:
            with trio.move_on_after(QMP_CONNECT_SECONDS):
                live.qmp = await self._connect_qmp(live)
                self._spawn_task(self._follow_events, live)
            if live.host_cpus:
                # Enforce the spec again: a thread may have been moved while no daemon ran. The
                # recorded thread ids stand in when QMP does not answer (same process: pid + start time).
                tids = await self._note_vcpus(live) if live.qmp is not None else None
                await self._pin(
                    live, tids if tids is not None else record.vcpu_thread_ids or None, at_boot=False
                )
            if record.state is VMState.STARTING:
                await self._resume_boot(live, record)
            elif record.state is VMState.STOPPING:
                # The stop was cut short by the daemon's death: finish it.
                self._spawn_task(self.stop, live.name, DEFAULT_STOP_SECONDS)

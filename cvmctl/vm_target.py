"""Benchmarks in a VM: the ``vm`` target of ``cvmctl bench``.

A :class:`VMTarget` runs the guest side of a workload through the agent inside a VM that
cvm-hostd manages, and the host side (wrk, iperf3 -c, ...) here:

* servers: the agent's ``RunWorkload`` stream in role SERVER builds the server's command
  line itself from the workload name and parameters (the host never sends argv), answers
  ``server_ready`` and keeps the server until the stream is cancelled; the host-side client
  reaches it through the VM's user-networking forward ``127.0.0.1:HOST_PORT -> guest port``;
* guest-only workloads: ``RunWorkload`` in role RUN streams the samples back.

A built-in target (``vm``, ``sev-snp``, ``tdx`` and their modifiers, :mod:`cvmctl.targets`)
is the dev guest in a VM of its own (``cvmctl-dev``, ``cvmctl-sev-snp``...): if no daemon
answers at ``$CVM_HOSTD`` (or the default socket), one is started for the call, with its
state under ``$XDG_STATE_HOME/cvmctl``; the VM is created with forwards for every catalogue
server port and booted when it is not running. A daemon or VM started for the call is
stopped again at the end; one that was already there is left as it was.

What a VM can run is read from its spec (:func:`spec_capabilities`): the network mode
decides ``tcp`` / ``udp`` / ``icmp``, the storage ``scratch-disk``
(:mod:`workloads.capabilities`). A built-in target knows its spec before anything starts,
so ``cvmctl bench`` refuses a workload it cannot run before a daemon or a VM is started;
for ``vm:NAME`` the spec comes from the daemon, and :meth:`VMTarget.expect` makes the
target refuse the workload after looking the VM up and before booting it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, get_args

import grpc
import trio

from cvm.v1 import agent_pb2, agent_pb2_grpc, host_pb2, host_pb2_grpc
from cvmcore import defaults
from cvmcore.address import parse_address
from cvmcore.client import RpcClient, connect, error_from_rpc
from cvmcore.defaults import state_dir
from cvmcore.errors import ConnectError, CvmError, DeadlineExceeded, UsageError
from cvmcore.tee import tee_name
from cvmctl.targets import BuiltinTarget
from host_daemon import passt
from host_daemon.netns import GuestNetwork, can_make_tap, network_from_argv
from workloads import catalogue
from workloads.capabilities import ICMP, SCRATCH_DISK, TCP, UDP, VM, Capabilities, WorkloadRefused, refusal
from workloads.model import Sample, ServerPlan, Unavailable, Workload
from workloads.runner import free_port

if TYPE_CHECKING:
    from host_daemon.spec import VMSpec

BOOT_WAIT: Final = 300.0


def _catalogue_server_ports() -> tuple[int, ...]:
    """The default guest ports of the catalogue's servers (nginx, iperf3, memcached): the
    built-in VMs forward each from loopback. Read from the workloads' own ``port`` params."""
    return tuple(
        sorted({int(p.default) for w in catalogue.CATALOGUE.values() for p in w.params if p.name == "port"})
    )


#: Guest ports of the catalogue's servers, forwarded from loopback.
SERVER_PORTS: Final = _catalogue_server_ports()

Say = Callable[[str], None]

#: Sockets of the daemons this process started for a run: the run's other targets stop the
#: VMs they boot there too, before the target that started the daemon stops it.
_DAEMONS_STARTED_HERE: set[str] = set()


def private_hostd_socket() -> Path:
    """Where the daemon cvmctl starts for a run listens, when no system daemon answers."""
    return state_dir("hostd") / "hostd.sock"


def console_tail(vm: host_pb2.VM, lines: int = 8) -> str:
    """The last console lines of ``vm`` as a suffix for an error (the daemon is on this host)."""
    from host_daemon.boottiming import tail_lines

    tail = list(vm.last_console_lines)
    if not tail and vm.console_path:
        tail = list(tail_lines(Path(vm.console_path), lines))
    return "; last console lines: " + " | ".join(tail[-lines:]) if tail else ""


def forwards_of(spec_toml: str) -> dict[int, int]:
    """``guest port -> host port`` of a VM spec's user-networking forwards (TCP)."""
    from host_daemon.spec import parse_spec

    spec = parse_spec(spec_toml)
    return {f.guest_port: f.host_port for f in spec.network.forwards if f.proto == "tcp"}


#: Where the dev guest's /init mounts the ``[scratch]`` disk the daemon attaches (found by
#: its serial, a fresh ext4 each boot): fio's scratch file goes there. Other images may
#: mount it elsewhere, or not at all, so only ``image = "dev"`` VMs offer it.
GUEST_SCRATCH_DIR: str = defaults.GUEST_SCRATCH_DIR

#: Network modes through which this target reaches a guest's servers, and what each carries.
NETWORK_OFFERS: Final[dict[str, dict[str, str]]] = {
    "user": {TCP: "QEMU user networking: loopback forwards to the guest's ports"},
    "passt": {
        TCP: "passt: loopback forwards to the guest's ports",
        UDP: "passt: loopback forwards to the guest's ports (UDP ones too)",
    },
    "tap": {
        TCP: "a virtio-net tap in the VM's network namespace: clients run there",
        UDP: "a virtio-net tap in the VM's network namespace: clients run there",
        ICMP: "a virtio-net tap in the VM's network namespace: clients run there",
    },
}

#: Why a host cannot ping a guest through a rootless network back end.
_NO_ICMP_TO_GUEST = (
    "passes no ICMP echo from the host to the guest (it answers only the guest's own echo "
    "requests); ping needs the tap path, which cvm-hostd builds when it runs as root"
)


def network_capabilities(mode: str, name: str) -> tuple[dict[str, str], dict[str, str]]:
    """(offered, lacking) of the network capabilities of a VM with network ``mode``."""
    offered = dict(NETWORK_OFFERS.get(mode, {}))
    if mode == "user":
        why = {
            UDP: (
                f"target {name} has QEMU user-mode networking (SLIRP): the host reaches the guest only "
                "through loopback port forwards, TCP ones here, and SLIRP's UDP forwarding is unfit for "
                'a throughput test; it needs the tap path (root) or passt ([network] mode = "passt")'
            ),
            ICMP: f"target {name} has QEMU user-mode networking (SLIRP), which {_NO_ICMP_TO_GUEST}",
        }
    elif mode == "passt":
        why = {ICMP: f"target {name} has a passt network, which {_NO_ICMP_TO_GUEST}"}
    elif mode == "none":
        why = dict.fromkeys((TCP, UDP, ICMP), f'target {name} has no network ([network] mode = "none")')
    else:
        why = dict.fromkeys(
            (TCP, UDP, ICMP),
            f"cvmctl cannot run a host client toward a guest on a {mode!r} network (target {name})",
        )
    return offered, {cap: reason for cap, reason in why.items() if cap not in offered}


def spec_capabilities(spec: VMSpec, name: str) -> Capabilities:
    """What a VM with ``spec`` offers the catalogue, and why not the rest (see the hooks above)."""
    offered, lacking = network_capabilities(spec.network.mode, name)
    offered[VM] = "the host daemon and the VM's agent"
    scratch = spec.scratch
    if scratch is not None and spec.image in ("dev", "debian"):
        # The dev guest's /init and the Debian image's cvm-scratch.service mount it.
        offered[SCRATCH_DISK] = GUEST_SCRATCH_DIR
    elif scratch is not None:
        lacking[SCRATCH_DISK] = (
            f'target {name} has a scratch disk, but only the images "dev" and "debian" are known to '
            f"mount it (at {GUEST_SCRATCH_DIR}, by the dev guest's /init and systemd/cvm-scratch.service)"
        )
    elif spec.image == "dev":
        lacking[SCRATCH_DISK] = (
            f"target {name} is the dev guest, whose only writable storage is its in-memory overlay "
            "(tmpfs: no O_DIRECT, at most half the guest's memory); it needs a scratch disk "
            "(a [scratch] table in its spec)"
        )
    elif spec.disks or spec.image not in ("", "dev"):
        offered[SCRATCH_DISK] = "/var/tmp"  # the guest's own root disk (an image's is one)
    else:
        lacking[SCRATCH_DISK] = f"target {name} has no disk"
    return Capabilities(offered, lacking)


def builtin_capabilities(builtin: BuiltinTarget) -> Capabilities:
    """What a built-in target offers: its spec is known without a daemon."""
    from host_daemon.spec import parse_spec

    network = builtin_network()
    forwards = None if network == "tap" else {port: 1 + i for i, port in enumerate(SERVER_PORTS)}
    firmware = Path("/firmware.fd") if builtin.flavour != "none" else None
    toml = builtin.spec_toml(forwards, firmware, passt=network == "passt")
    return spec_capabilities(parse_spec(toml), builtin.name)


def _unforwarded(workload: Workload, port: int, spec: VMSpec, vm: str) -> str | None:
    """Why ``workload``'s server on guest ``port`` is out of the host's reach through the
    loopback forwards of a user or passt network, or None. A UDP client (iperf3 -u) talks
    to the server's TCP control port and sends its datagrams to the same port number, so it
    needs both forwards from one host port."""
    forwards = spec.network.forwards
    tcp = {f.guest_port: f.host_port for f in forwards if f.proto == "tcp"}
    if port not in tcp:
        return (
            f"{workload.name}'s server listens on guest port {port}, which VM {vm} does not "
            f"forward: add {{ host_port = N, guest_port = {port} }} to its network.forwards"
        )
    udp = {f.guest_port: f.host_port for f in forwards if f.proto == "udp"}
    if UDP in workload.needs and udp.get(port) != tcp[port]:
        return (
            f"{workload.name} sends UDP to guest port {port}, which VM {vm} does not forward from host "
            f'port {tcp[port]}: add {{ host_port = {tcp[port]}, guest_port = {port}, proto = "udp" }} '
            "to its network.forwards"
        )
    return None


BuiltinNetwork = Literal["tap", "passt", "user"]


def builtin_network() -> BuiltinNetwork:
    """The network a built-in VM gets when cvmctl creates it: ``$CVMCTL_NETWORK`` if set;
    else the study's path (a tap in a namespace the daemon makes, host_daemon.netns) where
    this process may make one; else passt, rootless with UDP, where it is installed; else
    QEMU's user-mode network. A VM that exists keeps the network it was created with (the
    path each run took is recorded with it)."""
    chosen = os.environ.get(defaults.NETWORK_ENV, "")
    for network in get_args(BuiltinNetwork):
        if chosen == network:
            return network  # type: ignore[no-any-return]
    if chosen:
        raise UsageError(f"${defaults.NETWORK_ENV}={chosen!r}: expected tap, passt or user")
    if can_make_tap():
        return "tap"
    return "passt" if passt.available() else "user"


class VMTarget:
    """The guest side in a VM through its agent; an async context manager around a run."""

    listen_address = "0.0.0.0"  # servers in the guest bind the NIC the forward reaches

    def __init__(
        self,
        vm: str | None = None,
        *,
        builtin: BuiltinTarget | None = None,
        firmware: Path | None = None,
        hostd: str | None = None,
        say: Say | None = None,
    ) -> None:
        if vm is None and builtin is None:
            builtin = BuiltinTarget("vm")
        self._builtin = builtin
        self._firmware = firmware
        self.vm = builtin.vm_name if builtin is not None else str(vm)
        self.name = builtin.name if builtin is not None else f"vm:{vm}"
        self._dev = builtin is not None
        self._hostd = defaults.hostd_address(hostd)
        self._say = say or (lambda message: print(message, file=sys.stderr))
        self._stack = contextlib.AsyncExitStack()
        self._daemon: subprocess.Popen[bytes] | None = None
        self._hostd_client: RpcClient | None = None
        self._agent: RpcClient | None = None
        self._vm: host_pb2.VM | None = None
        self._forwards: dict[int, int] = {}
        self._network = GuestNetwork("none")
        self._workload: Workload | None = None
        self._params: dict[str, Any] = {}
        self._server_call: Any = None
        self._agent_info: dict[str, Any] = {}
        self._stop_vm_at_exit = False
        self._expected: tuple[Workload, dict[str, Any]] | None = None
        self._guest_unavailable: dict[str, Unavailable] = {}  # metric -> the agent's note

    # -- lifecycle ----------------------------------------------------------------------

    async def __aenter__(self) -> VMTarget:
        try:
            await self._open()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with trio.CancelScope(shield=True):
            await self.stop_server()
            if self._stop_vm_at_exit and self._hostd_client is not None:
                stub = host_pb2_grpc.HostDaemonStub(self._hostd_client.channel)
                with contextlib.suppress(CvmError):
                    await self._hostd_client.call(stub.KillVM, host_pb2.VMRef(name=self.vm), timeout=30)
        # Outside the shield: the stack's relays and channels were entered outside it too,
        # and trio's scopes must unwind in the order they were entered.
        await self._stack.aclose()
        if self._daemon is not None:
            _DAEMONS_STARTED_HERE.discard(str(private_hostd_socket()))
            self._daemon.terminate()
            with trio.CancelScope(shield=True), contextlib.suppress(subprocess.TimeoutExpired):
                await trio.to_thread.run_sync(self._daemon.wait, 15)

    async def _open(self) -> None:
        self._hostd_client = await self._daemon_client()
        stub = host_pb2_grpc.HostDaemonStub(self._hostd_client.channel)
        vm = await self._find_vm(stub)
        if vm is None:
            if not self._dev:
                raise UsageError(f"no VM named {self.vm!r} (cvmctl vm ls lists them)")
            assert self._builtin is not None
            network = builtin_network()
            forwards = None if network == "tap" else {guest: free_port() for guest in SERVER_PORTS}
            said = f"{network}, forwards {forwards}" if forwards else "a tap in its own network namespace"
            self._say(f"creating {self.vm} for target {self.name} ({said})")
            spec = host_pb2.CreateVMRequest(
                spec_toml=self._builtin.spec_toml(forwards, self._firmware, passt=network == "passt"),
                source=f"cvmctl target {self.name}",
            )
            vm = await self._hostd_client.call(stub.CreateVM, spec)
        self._refuse_unrunnable(vm)
        if vm.state != host_pb2.VM_STATE_RUNNING:
            vm = await self._boot(stub, vm)
        self._vm = vm
        self._forwards = forwards_of(vm.spec_toml)
        self._network = network_from_argv(list(vm.qemu_argv))
        if not vm.agent_address:
            raise UsageError(f"VM {self.vm} has no agent channel that cvmctl can reach")
        self._agent = await self._stack.enter_async_context(
            connect(parse_address(vm.agent_address), timeout=60)
        )
        info = await self._agent.call(
            agent_pb2_grpc.GuestAgentStub(self._agent.channel).GetInfo, agent_pb2.GetInfoRequest()
        )
        self._agent_info = {
            "tee": tee_name(info.tee),
            "kernel": info.kernel_release,
            "cmdline": info.kernel_cmdline,
            "tee_evidence": info.tee_evidence,
            "agent_version": info.agent_version,
        }

    def expect(self, workload: Workload, params: Mapping[str, Any]) -> None:
        """Refuse ``workload`` on opening if the VM cannot run it, before booting the VM."""
        self._expected = (workload, dict(params))

    def capabilities(self) -> Capabilities:
        """From the VM's spec once known; a built-in target's before; else assume the best
        (:meth:`expect` checks ``vm:NAME`` against its spec before it boots)."""
        if self._vm is not None:
            from host_daemon.spec import parse_spec

            return spec_capabilities(parse_spec(self._vm.spec_toml), self.name)
        if self._builtin is not None:
            return builtin_capabilities(self._builtin)
        note = "not known before the daemon describes the VM"
        return Capabilities(dict.fromkeys((TCP, UDP, ICMP, SCRATCH_DISK, VM), note), {})

    def _refuse_unrunnable(self, vm: host_pb2.VM) -> None:
        """Raise :class:`WorkloadRefused` if the expected workload cannot run on ``vm``."""
        if self._expected is None:
            return
        from host_daemon.spec import parse_spec

        workload, params = self._expected
        spec = parse_spec(vm.spec_toml)
        reason = refusal(workload, spec_capabilities(spec, self.name))
        plan = workload.guest_server(params) if workload.kind == "client-server" else None
        if reason is None and plan is not None and spec.network.mode in ("user", "passt"):
            reason = _unforwarded(workload, plan.port, spec, vm.name)
        if reason is not None:
            raise WorkloadRefused(reason)

    async def _try_daemon(self, address: str) -> RpcClient | None:
        try:
            client = await self._stack.enter_async_context(connect(parse_address(address), timeout=30))
            await client.health()
        except ConnectError:
            return None
        return client

    async def _daemon_client(self) -> RpcClient:
        client = await self._try_daemon(self._hostd)
        if client is not None:
            return client
        if not self._dev:
            raise ConnectError(f"nothing is listening at {self._hostd}; is cvm-hostd running?")
        # No system daemon: use (or start) one private to this user, at a fixed place so that
        # two runs never start two daemons on the same state.
        state = state_dir("hostd")
        sock = private_hostd_socket()
        client = await self._try_daemon(f"unix://{sock}")
        if client is not None:
            # Another target of this run started it: its VMs go when the run ends, this one too.
            self._stop_vm_at_exit = str(sock) in _DAEMONS_STARTED_HERE
            return client
        state.mkdir(parents=True, exist_ok=True)
        self._say(f"no cvm-hostd at {self._hostd}: starting one for this run (state in {state})")
        self._daemon = await trio.to_thread.run_sync(self._spawn_daemon, state, sock)
        with trio.move_on_after(30):
            while not sock.exists():
                if self._daemon.poll() is not None:
                    raise CvmError(f"cvm-hostd exited at start (see {state / 'hostd.log'})")
                await trio.sleep(0.02)
        client = await self._stack.enter_async_context(connect(parse_address(f"unix://{sock}"), timeout=30))
        await client.health()
        self._stop_vm_at_exit = True
        _DAEMONS_STARTED_HERE.add(str(sock))
        return client

    @staticmethod
    def _spawn_daemon(state: Path, sock: Path) -> subprocess.Popen[bytes]:
        # Its own session: a Ctrl-C of cvmctl must not stop the daemon before cvmctl has
        # stopped the VM it booted for this run.
        with (state / "hostd.log").open("ab") as log:
            return subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "cvm-hostd"),
                    "--state-dir",
                    str(state),
                    "--listen",
                    f"unix://{sock}",
                    "--log-format",
                    "json",
                ],
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
            )

    async def _find_vm(self, stub: host_pb2_grpc.HostDaemonStub) -> host_pb2.VM | None:
        assert self._hostd_client is not None
        listing = await self._hostd_client.call(stub.ListVMs, host_pb2.ListVMsRequest())
        return next((vm for vm in listing.vms if vm.name == self.vm), None)

    async def _boot(self, stub: host_pb2_grpc.HostDaemonStub, vm: host_pb2.VM) -> host_pb2.VM:
        assert self._hostd_client is not None
        if vm.state in (host_pb2.VM_STATE_STARTING, host_pb2.VM_STATE_STOPPING):
            self._say(f"waiting for {self.vm} ({vm.state_reason})")
        else:
            self._say(f"booting {self.vm} (under TCG this takes 10-30 s)")
            vm = await self._hostd_client.call(stub.StartVM, host_pb2.VMRef(name=self.vm), timeout=120)
            self._stop_vm_at_exit = self._stop_vm_at_exit or self._daemon is not None
        deadline = time.monotonic() + BOOT_WAIT
        shown: set[str] = set()
        while vm.state in (host_pb2.VM_STATE_STARTING, host_pb2.VM_STATE_STOPPING):
            for phase in vm.boot_phases:
                if phase.name not in shown:
                    shown.add(phase.name)
                    self._say(f"  boot phase {phase.name:<9} {phase.seconds:6.2f} s")
            if time.monotonic() > deadline:
                raise DeadlineExceeded(
                    f"{self.vm} not running after {BOOT_WAIT:g} s: {vm.state_reason}{console_tail(vm)}"
                )
            await trio.sleep(0.25)
            vm = await self._hostd_client.call(stub.GetVM, host_pb2.VMRef(name=self.vm))
        for phase in vm.boot_phases:
            if phase.name not in shown:
                self._say(f"  boot phase {phase.name:<9} {phase.seconds:6.2f} s")
        if vm.state != host_pb2.VM_STATE_RUNNING:
            raise CvmError(f"{self.vm} did not come up: {vm.state_reason}{console_tail(vm)}")
        return vm

    # -- the runner's Target protocol ---------------------------------------------------

    async def prepare(self, workload: Workload, params: Mapping[str, Any]) -> None:
        self._workload, self._params = workload, dict(params)

    async def cleanup(self, workload: Workload, params: Mapping[str, Any]) -> None:
        """Nothing to do here: the agent removes a workload's scratch files after each run."""

    async def unavailable(self, workload: Workload, params: Mapping[str, Any]) -> list[Unavailable]:
        # A guest workload's notes come from the agent (what the guest lacks: /dev/port, the
        # msr module), not from this host; the others have none of their own.
        notes = list(self._guest_unavailable.values()) if workload.kind == "guest" else []
        if workload.name == "attestation" and self._agent_info.get("tee") == "none":
            notes.append(
                Unavailable("attestation", f"{self.vm} is not a confidential VM: no attestation interface")
            )
        return notes

    async def measure_external(self, workload: Workload, params: Mapping[str, Any]) -> list[Sample]:
        """``boot``: boot the VM again and take the daemon's phases; ``attestation``: ask the
        agent for a report bound to a fresh nonce and take its step timings."""
        if workload.name == "boot":
            return workload.samples_from(await self._reboot())
        if workload.name == "attestation":
            return await self._attest(workload)
        raise UsageError(f"{workload.name} is not measured by a VM target")

    async def _reboot(self) -> dict[str, float]:
        assert self._hostd_client is not None
        stub = host_pb2_grpc.HostDaemonStub(self._hostd_client.channel)
        await self._hostd_client.call(stub.KillVM, host_pb2.VMRef(name=self.vm), timeout=60)
        vm = await self._boot(stub, await self._hostd_client.call(stub.GetVM, host_pb2.VMRef(name=self.vm)))
        self._vm = vm
        return {phase.name: phase.seconds for phase in vm.boot_phases}

    async def _attest(self, workload: Workload) -> list[Sample]:
        assert self._agent is not None
        if self._agent_info.get("tee") == "none":
            return []  # recorded as unavailable, with the reason
        stub = agent_pb2_grpc.GuestAgentStub(self._agent.channel)
        request = agent_pb2.GetAttestationReportRequest(report_data=os.urandom(64))
        started = time.perf_counter()
        response = await self._agent.call(stub.GetAttestationReport, request, timeout=120)
        round_trip = time.perf_counter() - started
        steps = {step.name: step.seconds for step in response.steps}
        samples = workload.samples_from(steps)
        samples.append(Sample("round_trip", round_trip, "s", "lower", {"interface": response.interface}))
        return samples

    async def run_evidence(self, report_data: bytes) -> dict[str, Any]:
        """Evidence over ``report_data`` from this guest's agent, for an attested run
        (:mod:`cvmctl.attested`); a normal VM's answer is "not attested"."""
        from cvmctl.attested import agent_evidence, not_attested

        if self._agent is None:
            return not_attested(f"the agent of {self.vm} is not connected")
        return await agent_evidence(self._agent, str(self._agent_info.get("tee") or ""), report_data)

    def guest_address(self) -> str:
        if self._network.namespace:
            return self._network.guest_address  # the tap path: reached inside the namespace
        return "10.0.2.15"  # QEMU user networking's guest address; ping does not cross it

    def client_prefix(self) -> list[str]:
        """On the tap path the guest is reachable only inside the VM's network namespace
        (which the daemon owns), so the host-side client runs there: traffic stays inside."""
        if self._network.namespace:
            return ["ip", "netns", "exec", self._network.namespace]
        return []

    def describe(self) -> dict[str, Any]:
        vm = self._vm
        builtin = {}
        if self._builtin is not None:
            builtin = {"target": self._builtin.name, "baseline_for": self._builtin.baseline_for}
        if vm is None:
            return {"kind": "vm", "name": self.vm, **builtin}
        return {
            "kind": "vm",
            "name": vm.name,
            **builtin,
            "accel": vm.accel,
            "spec": vm.spec_toml,
            "qemu_argv": list(vm.qemu_argv),
            "network": self._network.path,
            "boot_phases": {p.name: p.seconds for p in vm.boot_phases},
            "agent": vm.agent_address,
            **self._agent_info,
        }

    def _request(self, role: int) -> agent_pb2.RunWorkloadRequest:
        assert self._workload is not None, "prepare() was not called"
        return agent_pb2.RunWorkloadRequest(
            workload=self._workload.name,
            params=self._workload.format_params(self._params),
            role=role,  # type: ignore[arg-type]
        )

    async def start_server(self, plan: ServerPlan) -> tuple[str, int]:
        assert self._agent is not None and self._workload is not None
        await self.stop_server()
        host_port = plan.port if self._network.namespace else self._forwards.get(plan.port)
        if host_port is None:
            raise UsageError(
                f"VM {self.vm} forwards no host port to guest port {plan.port}; add "
                f"{{ host_port = N, guest_port = {plan.port} }} to its network.forwards"
            )
        stub = agent_pb2_grpc.GuestAgentStub(self._agent.channel)
        call = stub.RunWorkload(self._request(agent_pb2.WORKLOAD_ROLE_SERVER), timeout=24 * 3600)
        self._server_call = call
        try:
            with trio.fail_after(60):
                events = iter(call)
                event: agent_pb2.WorkloadEvent = await trio.to_thread.run_sync(
                    lambda: next(events), abandon_on_cancel=True
                )
        except grpc.RpcError as exc:
            self._server_call = None
            raise error_from_rpc(exc, self._agent.address, 60, "RunWorkload") from exc
        except trio.TooSlowError:
            await self.stop_server()
            raise DeadlineExceeded(f"{self._workload.name}: the guest server was not ready in 60 s") from None
        if not event.HasField("server_ready"):
            await self.stop_server()
            raise CvmError(f"{self._workload.name}: unexpected first event from the agent: {event}")
        if self._network.namespace:
            return self._network.guest_address, host_port  # the client runs in the namespace
        return "127.0.0.1", host_port

    async def stop_server(self) -> None:
        if self._server_call is not None:
            self._server_call.cancel()  # the agent stops the server when its stream ends
            self._server_call = None
            await trio.sleep(0.2)  # let the port close before a next server binds it

    async def run_guest(self, workload: Workload, params: Mapping[str, Any]) -> list[Sample]:
        assert self._agent is not None
        stub = agent_pb2_grpc.GuestAgentStub(self._agent.channel)
        request = agent_pb2.RunWorkloadRequest(
            workload=workload.name,
            params=workload.format_params(dict(params)),
            role=agent_pb2.WORKLOAD_ROLE_RUN,
        )
        samples: list[Sample] = []
        async for event in self._agent.stream(
            stub.RunWorkload, request, timeout=workload.timeout(params) + 60
        ):
            if event.HasField("sample"):
                s = event.sample
                direction: Literal["higher", "lower"] = "higher" if s.direction == "higher" else "lower"
                samples.append(Sample(s.metric, s.value, s.unit, direction, dict(s.metadata)))
            elif event.HasField("unavailable"):
                note = event.unavailable
                self._guest_unavailable[note.metric] = Unavailable(note.metric, note.reason)
        return samples

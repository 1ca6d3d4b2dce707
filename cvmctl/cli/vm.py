"""``cvmctl vm``: create, start, stop and inspect VMs through the host daemon."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import trio
from google.protobuf.json_format import MessageToDict

from cvm.v1 import host_pb2, host_pb2_grpc
from cvmcore import defaults
from cvmcore.address import parse_address
from cvmcore.client import RpcClient, connect
from cvmcore.defaults import HOSTD_ADDRESS, HOSTD_ENV
from cvmcore.errors import ConnectError, DeadlineExceeded, UsageError
from cvmcore.tee import tee_name
from cvmctl.cli.output import print_table
from cvmctl.vm_target import console_tail

STATE_NAMES = {
    host_pb2.VM_STATE_DEFINED: "defined",
    host_pb2.VM_STATE_STARTING: "starting",
    host_pb2.VM_STATE_RUNNING: "running",
    host_pb2.VM_STATE_STOPPING: "stopping",
    host_pb2.VM_STATE_STOPPED: "stopped",
    host_pb2.VM_STATE_CRASHED: "crashed",
}

EPILOG = f"""\
The daemon is reached at --host, else ${HOSTD_ENV}, else {HOSTD_ADDRESS}.

examples:
  echo 'name = "dev"' > dev.toml      # no image named: the built-in dev guest
  cvmctl vm create -f dev.toml
  cvmctl vm start dev                 # waits until the agent inside answers
  cvmctl vm show dev                  # state, boot phases, agent address, network, vCPU pinning
  cvmctl agent info --connect "$(cvmctl vm show dev --json | jq -r .agent_address)"
  cvmctl vm stop dev && cvmctl vm rm dev
"""


def hostd_address(args: argparse.Namespace) -> str:
    return defaults.hostd_address(args.host)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "vm",
        help="create, start, stop and inspect VMs (through cvm-hostd)",
        description="Manage VMs through the host daemon.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(title="vm commands", metavar="COMMAND", required=True)

    def command(name: str, help_text: str, *, takes_name: bool = True) -> argparse.ArgumentParser:
        p = commands.add_parser(name, help=help_text, description=help_text)
        if takes_name:
            p.add_argument("name", help="the VM's name")
        p.add_argument(
            "--host", metavar="ADDR", help=f"daemon address (default: ${HOSTD_ENV} or {HOSTD_ADDRESS})"
        )
        p.add_argument(
            "--timeout", type=float, default=30.0, metavar="SECONDS", help="per request (default 30)"
        )
        p.add_argument("--json", action="store_true", help="print JSON")
        return p

    create = command("create", "define a VM from a TOML spec", takes_name=False)
    create.add_argument("-f", "--file", required=True, type=Path, help="the spec (TOML); - reads stdin")
    create.set_defaults(func=run_create)

    start = command("start", "start a VM and wait until its agent answers")
    start.add_argument("--no-wait", action="store_true", help="return once QEMU runs")
    start.add_argument(
        "--wait-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="how long to wait for the agent (default 300: TCG boots are slow)",
    )
    start.set_defaults(func=run_start)

    stop = command("stop", "stop a VM: ACPI powerdown, then quit after --grace")
    stop.add_argument("--grace", type=float, default=10.0, metavar="SECONDS", help="default 10")
    stop.set_defaults(func=run_stop)

    kill = command("kill", "kill a VM's QEMU at once")
    kill.set_defaults(func=run_kill)

    rm = command("rm", "remove a stopped VM and its files")
    rm.set_defaults(func=run_rm)

    ls = command("ls", "list VMs", takes_name=False)
    ls.set_defaults(func=run_ls)

    show = command("show", "show a VM: state, boot phases, agent address, vCPU pinning")
    show.set_defaults(func=run_show)

    console = command("console", "print the VM's serial console log")
    console.add_argument("-f", "--follow", action="store_true", help="keep printing new output")
    console.set_defaults(func=run_console)


async def _with_daemon(args: argparse.Namespace, body: Any) -> Any:
    address = parse_address(hostd_address(args))
    if args.timeout <= 0:
        raise UsageError("--timeout must be positive")
    try:
        async with connect(address, timeout=args.timeout) as client:
            return await body(client, host_pb2_grpc.HostDaemonStub(client.channel))
    except ConnectError as exc:
        raise ConnectError(f"{exc}; is cvm-hostd running? (start it, or point --host at it)") from exc


def vm_as_dict(vm: host_pb2.VM) -> dict[str, Any]:
    data = MessageToDict(vm, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    data["state"] = STATE_NAMES.get(vm.state, "unknown")
    data["tee"] = tee_name(vm.tee)
    # A list, not an object: JSON objects have no order, and the phases do.
    data["boot_phases"] = [{"name": phase.name, "seconds": phase.seconds} for phase in vm.boot_phases]
    data["exit_status"] = vm.exit_status if vm.HasField("exit_status") else None
    data["network"] = vm_network(vm)
    return data


def vm_network(vm: host_pb2.VM) -> dict[str, Any] | None:
    """The network path of the current or last boot (None before the first): ``path``
    (tap+vhost, tap, user, none), and for the tap paths the ``namespace`` a client runs in
    (``ip netns exec NAMESPACE ...``) and the ``guest_address`` it reaches the guest at. Read
    from the recorded QEMU argv (:func:`host_daemon.netns.network_from_argv`)."""
    if not vm.qemu_argv:
        return None
    from host_daemon.netns import network_from_argv

    net = network_from_argv(list(vm.qemu_argv))
    return {
        "path": net.path,
        "namespace": net.namespace,
        "guest_address": net.guest_address,
        "host_address": net.host_address,
        "queues": net.queues,
    }


def _network_row(net: dict[str, Any] | None) -> str:
    if net is None:
        return "- (not booted yet)"
    if not net["namespace"]:
        return str(net["path"])
    queues = f", {net['queues']} queues" if net["queues"] > 1 else ""
    return f"{net['path']}{queues}: guest {net['guest_address']} in network namespace {net['namespace']}"


def format_pin(pin: host_pb2.VcpuPin) -> str:
    """``vCPU 0  thread 1234  -> CPU 1 (allowed: 1)``: the spec's CPU, and what the kernel reports."""
    return (
        f"vCPU {pin.vcpu}  thread {pin.thread_id}  -> CPU {pin.host_cpu} (allowed: {pin.allowed_cpus or '?'})"
    )


def print_vm(vm: host_pb2.VM, as_json: bool) -> None:
    data = vm_as_dict(vm)
    if as_json:
        print(json.dumps(data, indent=2, sort_keys=True))
        return
    rows = [
        ("name", vm.name),
        ("state", f"{data['state']} ({vm.state_reason})"),
        ("tee", data["tee"]),
        ("accel", vm.accel or "-"),
        ("qemu pid", str(vm.qemu_pid or "-")),
        ("agent", vm.agent_address or "-"),
        ("network", _network_row(data["network"])),
        ("boots", str(vm.boot_count)),
        ("console", vm.console_path or "-"),
    ]
    if data["exit_status"] is not None:
        rows.append(("exit status", str(data["exit_status"])))
    if vm.boot_phases:
        total = sum(p.seconds for p in vm.boot_phases)
        phases = "  ".join(f"{p.name} {p.seconds:.2f}s" for p in vm.boot_phases)
        rows.append(("boot phases", f"{phases}  (total {total:.2f}s)"))
    if vm.vcpu_thread_ids:
        rows.append(("vcpu threads", " ".join(map(str, vm.vcpu_thread_ids))))
    if vm.vcpu_pins:
        rows.append(("pinning", "\n".join(format_pin(pin) for pin in vm.vcpu_pins)))
        rows.append(
            (
                "emulator cpus",
                f"{vm.emulator_cpus} (QEMU's other threads)"
                if vm.emulator_cpus
                else "not pinned (no CPU left beside the vCPUs')",
            )
        )
    print_table(rows)
    if vm.last_console_lines and vm.state == host_pb2.VM_STATE_CRASHED:
        print("last console lines:")
        for line in vm.last_console_lines:
            print(f"  {line}")


def run_create(args: argparse.Namespace) -> int:
    if str(args.file) == "-":
        text, source = sys.stdin.read(), "<stdin>"
    else:
        try:
            text, source = args.file.read_text(), str(args.file)
        except OSError as exc:
            raise UsageError(f"cannot read {args.file}: {exc.strerror}") from exc

    async def body(client: RpcClient, stub: host_pb2_grpc.HostDaemonStub) -> host_pb2.VM:
        vm: host_pb2.VM = await client.call(
            stub.CreateVM, host_pb2.CreateVMRequest(spec_toml=text, source=source)
        )
        return vm

    print_vm(trio.run(_with_daemon, args, body), args.json)
    return 0


def run_start(args: argparse.Namespace) -> int:
    async def body(client: RpcClient, stub: host_pb2_grpc.HostDaemonStub) -> host_pb2.VM:
        vm: host_pb2.VM = await client.call(stub.StartVM, host_pb2.VMRef(name=args.name))
        if args.no_wait:
            return vm
        deadline = time.monotonic() + args.wait_timeout
        shown: set[str] = set()
        while vm.state == host_pb2.VM_STATE_STARTING:
            for phase in vm.boot_phases:
                if phase.name not in shown and not args.json:
                    shown.add(phase.name)
                    print(f"  {phase.name:<10} {phase.seconds:7.2f} s", file=sys.stderr)
            if time.monotonic() > deadline:
                raise DeadlineExceeded(
                    f"VM {args.name} still starting after {args.wait_timeout:g} s: {vm.state_reason} "
                    f"(console: {vm.console_path}){console_tail(vm)}"
                )
            await trio.sleep(0.2)
            vm = await client.call(stub.GetVM, host_pb2.VMRef(name=args.name))
        for phase in vm.boot_phases:
            if phase.name not in shown and not args.json:
                print(f"  {phase.name:<10} {phase.seconds:7.2f} s", file=sys.stderr)
        return vm

    vm = trio.run(_with_daemon, args, body)
    print_vm(vm, args.json)
    if vm.state == host_pb2.VM_STATE_CRASHED:
        return 1
    return 0


def _simple(method: str, request_of: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        async def body(client: RpcClient, stub: host_pb2_grpc.HostDaemonStub) -> Any:
            timeout = args.timeout + getattr(args, "grace", 0) + 10
            return await client.call(getattr(stub, method), request_of(args), timeout=timeout)

        result = trio.run(_with_daemon, args, body)
        if isinstance(result, host_pb2.VM):
            print_vm(result, args.json)
        elif args.json:
            print(json.dumps({"name": args.name, "removed": True}))
        else:
            print(f"removed {args.name}")
        return 0

    return run


run_stop = _simple("StopVM", lambda a: host_pb2.StopVMRequest(name=a.name, timeout_seconds=a.grace))
run_kill = _simple("KillVM", lambda a: host_pb2.VMRef(name=a.name))
run_rm = _simple("DestroyVM", lambda a: host_pb2.VMRef(name=a.name))
run_show = _simple("GetVM", lambda a: host_pb2.VMRef(name=a.name))


def run_ls(args: argparse.Namespace) -> int:
    async def body(client: RpcClient, stub: host_pb2_grpc.HostDaemonStub) -> host_pb2.ListVMsResponse:
        response: host_pb2.ListVMsResponse = await client.call(stub.ListVMs, host_pb2.ListVMsRequest())
        return response

    response = trio.run(_with_daemon, args, body)
    if args.json:
        print(json.dumps([vm_as_dict(vm) for vm in response.vms], indent=2, sort_keys=True))
        return 0
    if not response.vms:
        print("no VMs (create one: cvmctl vm create -f spec.toml)")
        return 0
    print(f"{'NAME':<20} {'STATE':<9} {'TEE':<8} {'ACCEL':<5} {'PID':>7}  AGENT")
    for vm in response.vms:
        print(
            f"{vm.name:<20} {STATE_NAMES.get(vm.state, '?'):<9} {tee_name(vm.tee):<8} "
            f"{vm.accel or '-':<5} {vm.qemu_pid or '-':>7}  {vm.agent_address or '-'}"
        )
    return 0


def run_console(args: argparse.Namespace) -> int:
    async def body(client: RpcClient, stub: host_pb2_grpc.HostDaemonStub) -> host_pb2.VM:
        vm: host_pb2.VM = await client.call(stub.GetVM, host_pb2.VMRef(name=args.name))
        return vm

    vm = trio.run(_with_daemon, args, body)
    if not vm.console_path:
        raise UsageError(f"VM {args.name} has not booted yet: no console log")
    path = Path(vm.console_path)
    if args.json:
        if args.follow:
            raise UsageError("--follow streams raw text: drop --json")
        try:
            text = path.read_bytes().decode("utf-8", "replace")
        except OSError as exc:
            raise UsageError(f"cannot read the console log {path}: {exc.strerror}") from exc
        print(
            json.dumps({"vm": vm.name, "path": str(path), "boot": vm.boot_count, "lines": text.splitlines()})
        )
        return 0
    try:
        with path.open("rb") as handle:
            while True:
                chunk = handle.read(65536)
                if chunk:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
                elif args.follow:
                    time.sleep(0.2)
                else:
                    break
    except OSError as exc:
        raise UsageError(
            f"cannot read the console log {path}: {exc.strerror} (is the daemon on this host?)"
        ) from exc
    except KeyboardInterrupt:
        pass
    return 0

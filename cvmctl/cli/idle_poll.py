"""cvmctl idle-poll: show, switch and revert guest idle polling (haltpoll) through the agent.

The study found that guest halt polling wins back most of what VMEXITs cost an idle-heavy
confidential VM; this switches it at run time, and reverts to exactly what was there.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import trio
from google.protobuf.json_format import MessageToDict

from cvm.v1 import agent_pb2, agent_pb2_grpc
from cvmcore.address import parse_address
from cvmcore.client import connect
from cvmctl.cli.args import add_connection_arguments, non_negative_int, yes_no
from cvmctl.cli.output import print_table

# From the wire enum (IDLE_MODE_HALTPOLL -> "haltpoll"), the names the agent uses too.
MODES = {
    name.removeprefix("IDLE_MODE_").lower(): value
    for name, value in agent_pb2.IdleMode.items()
    if value != agent_pb2.IDLE_MODE_UNSPECIFIED
}
MODE_NAMES = {value: key for key, value in MODES.items()}

EPILOG = """\
modes:
  default    the kernel's own cpuidle driver and governor (what was there before the agent)
  haltpoll   the cpuidle-haltpoll driver and haltpoll governor: poll briefly before halting
  poll       never halt (idle=poll): needs the kernel command line, cannot be switched live

examples:
  cvmctl idle-poll show --connect hvsock:///run/vm0.vsock:1024
  cvmctl idle-poll set haltpoll --guest-halt-poll-ns 400000 --connect unix:///tmp/agent.sock
  cvmctl idle-poll revert --connect unix:///tmp/agent.sock
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "idle-poll",
        help="show or switch guest idle polling (haltpoll)",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(title="idle-poll commands", metavar="COMMAND", required=True)

    show = commands.add_parser("show", help="print the guest's idle driver, governor and haltpoll parameters")
    add_connection_arguments(show)
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(func=run_show)

    set_ = commands.add_parser(
        "set",
        help="switch the idle mode (the originals are recorded first)",
        description="Switch the guest's idle mode. The agent records the original values before "
        "its first write and restores them on revert, or on its next start after a crash.",
    )
    set_.add_argument("mode", choices=sorted(MODES), help="the idle mode")
    set_.add_argument(
        "--guest-halt-poll-ns",
        type=non_negative_int,
        metavar="NS",
        help="longest poll before halting, ns (kernel default 200000)",
    )
    set_.add_argument(
        "--guest-halt-poll-grow",
        type=non_negative_int,
        metavar="N",
        help="factor the poll time grows by (default 2)",
    )
    set_.add_argument(
        "--guest-halt-poll-grow-start",
        type=non_negative_int,
        metavar="NS",
        help="poll time when growing from 0, ns (default 50000)",
    )
    set_.add_argument(
        "--guest-halt-poll-shrink",
        type=non_negative_int,
        metavar="N",
        help="factor the poll time shrinks by (default 2)",
    )
    set_.add_argument(
        "--guest-halt-poll-allow-shrink",
        type=yes_no,
        metavar="Y|N",
        help="whether the poll time may shrink (default Y)",
    )
    add_connection_arguments(set_)
    set_.add_argument("--json", action="store_true", help="print JSON")
    set_.set_defaults(func=run_set)

    revert = commands.add_parser("revert", help="restore every value the agent changed")
    add_connection_arguments(revert)
    revert.add_argument("--json", action="store_true", help="print JSON")
    revert.set_defaults(func=run_revert)


def state_as_dict(state: agent_pb2.IdlePollingState) -> dict[str, Any]:
    data = MessageToDict(state, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    data["mode"] = MODE_NAMES.get(state.mode, "unknown")
    data["applied_mode"] = MODE_NAMES.get(state.applied_mode)
    data["params"] = {field.name: value for field, value in state.params.ListFields()}
    return data


def print_state(state: agent_pb2.IdlePollingState, as_json: bool) -> None:
    data = state_as_dict(state)
    if as_json:
        print(json.dumps(data, indent=2, sort_keys=True))
        return
    rows = [
        ("mode", data["mode"]),
        ("driver", state.driver),
        ("governor", state.governor),
        ("available governors", " ".join(state.available_governors)),
        ("applied by the agent", data["applied_mode"] or "nothing (kernel state as found)"),
        ("idle=poll on cmdline", "yes" if state.kernel_cmdline_idle_poll else "no"),
    ]
    rows += [(name, str(value)) for name, value in data["params"].items()]
    rows += [("note", note) for note in state.notes]
    print_table(rows)


def _call(args: argparse.Namespace, method: str, request: Any) -> agent_pb2.IdlePollingState:
    address = parse_address(args.connect)

    async def ask() -> agent_pb2.IdlePollingState:
        async with connect(address, timeout=args.timeout) as client:
            stub = agent_pb2_grpc.GuestAgentStub(client.channel)
            result: agent_pb2.IdlePollingState = await client.call(getattr(stub, method), request)
            return result

    return trio.run(ask)


def run_show(args: argparse.Namespace) -> int:
    print_state(_call(args, "GetIdlePolling", agent_pb2.GetIdlePollingRequest()), args.json)
    return 0


def run_set(args: argparse.Namespace) -> int:
    params = agent_pb2.HaltpollParams()
    for field in agent_pb2.HaltpollParams.DESCRIPTOR.fields:
        name = field.name
        value = getattr(args, name)
        if value is not None:
            setattr(params, name, value)
    request = agent_pb2.SetIdlePollingRequest(mode=MODES[args.mode], params=params)
    print_state(_call(args, "SetIdlePolling", request), args.json)
    return 0


def run_revert(args: argparse.Namespace) -> int:
    print_state(_call(args, "RevertIdlePolling", agent_pb2.RevertIdlePollingRequest()), args.json)
    return 0

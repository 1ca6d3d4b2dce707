"""``cvmctl agent``: talk to a guest agent directly, by address."""

from __future__ import annotations

import argparse
import json
from typing import Any

import trio
from google.protobuf.json_format import MessageToDict

from cvm.v1 import agent_pb2, agent_pb2_grpc
from cvmcore.address import parse_address
from cvmcore.client import connect
from cvmcore.tee import tee_name
from cvmctl.cli.args import add_connection_arguments
from cvmctl.cli.output import print_table


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "agent",
        help="query a guest agent by address",
        description="Query a cvm-agent directly by its address (no host daemon needed).",
    )
    commands = parser.add_subparsers(title="agent commands", metavar="COMMAND", required=True)

    health = commands.add_parser(
        "health",
        help="print the agent's health (SERVING when it answers)",
        description="Ask the agent's gRPC health service. Prints SERVING and exits 0 when it answers.",
    )
    add_connection_arguments(health)
    health.add_argument("--json", action="store_true", help='print {"status": ..., "address": ...}')
    health.set_defaults(func=run_health)

    info = commands.add_parser(
        "info",
        help="print agent version, kernel, detected TEE, uptime",
        description="Show what the agent knows about its guest.",
    )
    add_connection_arguments(info)
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(func=run_info)


def run_health(args: argparse.Namespace) -> int:
    address = parse_address(args.connect)

    async def ask() -> str:
        async with connect(address, timeout=args.timeout) as client:
            return await client.health()

    status = trio.run(ask)
    if args.json:
        print(json.dumps({"status": status, "address": args.connect}))
    else:
        print(status)
    return 0 if status == "SERVING" else 1


def info_as_dict(response: agent_pb2.GetInfoResponse) -> dict[str, Any]:
    data = MessageToDict(
        response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    data["tee"] = tee_name(response.tee)
    return data


def run_info(args: argparse.Namespace) -> int:
    address = parse_address(args.connect)

    async def ask() -> agent_pb2.GetInfoResponse:
        async with connect(address, timeout=args.timeout) as client:
            stub = agent_pb2_grpc.GuestAgentStub(client.channel)
            return await client.call(stub.GetInfo, agent_pb2.GetInfoRequest())

    data = info_as_dict(trio.run(ask))
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print_table(
            [
                ("agent version", data["agent_version"]),
                ("kernel", data["kernel_release"]),
                ("TEE", f"{data['tee']} ({data['tee_evidence']})"),
                ("uptime", f"{data['uptime_seconds']:.1f} s"),
                ("hostname", data["hostname"]),
                ("boot id", data["boot_id"]),
            ]
        )
    return 0

"""Hostile requests for the daemons' gRPC servers, and the servers to send them to.

The host is the adversary of a confidential guest, and anything on the host that can reach
cvm-hostd's socket is the daemon's. :func:`hostile_request` builds one request for any
method from the protobuf descriptors alone: random bytes, a truncated or mistyped message,
or a well-formed message whose every field holds a value picked to hurt (huge, empty, NUL,
out of range, NaN, path traversal, deeply nested TOML). :func:`crafted_run_workload` and
:func:`crafted_create_vm` add what only knowledge of the two services can build: every
catalogue workload with parameters that must be refused, specs that nest, overflow and
name host files. ``tests/spine/test_storm.py`` sends thousands of them;
``tests/spine/test_rpc_properties.py`` builds the same kind of message with hypothesis.

The servers run as processes of their own, as in production, so that their log, their
RSS and a traceback are theirs alone: the agent is the installed ``cvm-agent`` on a copy
of a recorded guest's sysfs/procfs tree; the daemon is :mod:`tests.spine.storm_hostd`,
the daemon's service with a QEMU binary that does not exist, so that nothing can boot.
"""

from __future__ import annotations

import math
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message

from cvm.v1 import agent_pb2, host_pb2
from cvmcore.errors import CvmError
from tests.conftest import REPO_ROOT
from workloads.catalogue import CATALOGUE

AGENT_SERVICE: Final = agent_pb2.DESCRIPTOR.services_by_name["GuestAgent"]
HOST_SERVICE: Final = host_pb2.DESCRIPTOR.services_by_name["HostDaemon"]
SNP_TREE: Final = REPO_ROOT / "tests" / "fixtures" / "sysroots" / "snp-guest"

#: Status codes a hostile request may get: anything but UNKNOWN and INTERNAL, which would
#: mean the server failed rather than the caller.
FORBIDDEN: Final = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL})

DEEP_TOML: Final = (
    "x = " + "[" * 1000 + "]" * 1000,
    "x = " + "{a=" * 1000 + "1" + "}" * 1000,
    "".join(f"[{'a.' * n}b]\n" for n in range(1, 200)),
)

HOSTILE_TEXT: Final = (
    "",
    "\x00",
    "\x00" * 100,
    "../../../../etc/passwd",
    "/etc/shadow",
    "/dev/vda",
    "/proc/self/mem",
    "/tmp",
    "/tmp/victim",
    "/var/tmp/../../etc",
    "x" * 20_000,
    "\u00e9" * 6_000,
    "\U0001f600" * 3_000,
    "a\nb\r\nc",
    "${jndi:ldap://x}",
    "%s%s%n%x",
    "'; DROP TABLE vms; --",
    "-1",
    "0x",
    "1e309",
    "nan",
    "inf",
    "-0",
    "18446744073709551616",
    "auto",
    "all",
    "1,,2",
    ",".join(["1"] * 5000),
    "\u202e\u200b\ufeff",
)

_INT_RANGES: Final = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
HOSTILE_FLOATS: Final = (
    0.0,
    -0.0,
    -1.0,
    1e-300,
    5e-324,
    1e308,
    math.inf,
    -math.inf,
    math.nan,
    600.0,
    600.0001,
)


def int_range(field: FieldDescriptor) -> tuple[int, int]:
    return _INT_RANGES[field.type]


def request_class(method: MethodDescriptor) -> type[Message]:
    return message_factory.GetMessageClass(method.input_type)


def _text(rng: random.Random) -> str:
    if rng.random() < 0.7:
        return rng.choice(HOSTILE_TEXT)
    alphabet = "abcxyz019_-./:,= \t\u00e9\u4e2d"
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 80)))


def _scalar(rng: random.Random, field: FieldDescriptor) -> Any:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return rng.choice(DEEP_TOML) if field.name == "spec_toml" and rng.random() < 0.2 else _text(rng)
    if kind == FieldDescriptor.TYPE_BYTES:
        return rng.randbytes(rng.choice((0, 1, 63, 64, 65, 4096)))
    if kind == FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return rng.choice(HOSTILE_FLOATS)
    if kind == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        known = [v.number for v in field.enum_type.values]
        return rng.choice([*known, -1, 99, 2**31 - 1])
    low, high = int_range(field)
    return rng.choice((low, high, 0, 1, -1 if low < 0 else 2, rng.randint(low, high)))


def hostile_message(rng: random.Random, descriptor: Descriptor, depth: int = 0) -> Message:
    """A well-formed message of ``descriptor`` with hostile values in most of its fields."""
    message = message_factory.GetMessageClass(descriptor)()
    for field in descriptor.fields:
        if rng.random() < 0.3:
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_field, value_field = field.message_type.fields
            mapping = getattr(message, field.name)
            for _ in range(rng.choice((1, 3, 10, 500))):
                key = _scalar(rng, key_field)
                if value_field.message_type is None:
                    mapping[key] = _scalar(rng, value_field)
            continue
        if field.message_type is not None:
            if depth < 3:
                child = hostile_message(rng, field.message_type, depth + 1)
                if field.is_repeated:
                    getattr(message, field.name).append(child)
                else:
                    getattr(message, field.name).CopyFrom(child)
            continue
        if field.is_repeated:
            getattr(message, field.name).extend(_scalar(rng, field) for _ in range(rng.choice((0, 2, 100))))
        else:
            setattr(message, field.name, _scalar(rng, field))
    return message


def _mangled(rng: random.Random, data: bytes) -> bytes:
    """``data`` truncated, with a byte flipped, or with bytes that no wire format has."""
    choice = rng.randrange(4)
    if choice == 0 and data:
        return data[: rng.randrange(len(data))]
    if choice == 1 and data:
        index = rng.randrange(len(data))
        return data[:index] + bytes([data[index] ^ (1 << rng.randrange(8))]) + data[index + 1 :]
    if choice == 2:
        return data + rng.choice((b"\x0f", b"\x0a\xff\xff\xff\xff\x0f", b"\x80" * 11, b"\x0a\x05ab"))
    return b"\x0a\x02\xff\xfe" + data  # field 1 as a string that is not UTF-8


def hostile_request(rng: random.Random, method: MethodDescriptor) -> bytes:
    """The bytes of one hostile request for ``method``."""
    roll = rng.random()
    if roll < 0.25:  # noise
        return rng.randbytes(rng.choice((0, 1, 2, 7, 64, 1000, 70_000)))
    if roll < 0.35:  # the wrong message type
        other = rng.choice([agent_pb2.GetInfoResponse.DESCRIPTOR, host_pb2.VM.DESCRIPTOR, method.output_type])
        return hostile_message(rng, other).SerializeToString()
    valid = hostile_message(rng, method.input_type).SerializeToString()
    if roll < 0.5:
        return _mangled(rng, valid)
    return valid


def crafted_run_workload(rng: random.Random) -> bytes:
    """A RunWorkload of a real catalogue workload whose parameters the agent must refuse."""
    workload = rng.choice(list(CATALOGUE.values()))
    params: dict[str, str] = {}
    for param in workload.params:
        if rng.random() < 0.5:
            params[param.name] = rng.choice((_text(rng), str(param.maximum or 0) + "0", "-1", "99999999999"))
    try:
        workload.validate(params)
    except CvmError:  # refused: what we want
        pass
    else:
        params["zz_not_a_parameter"] = "1"  # never run a real benchmark in the storm
    request = agent_pb2.RunWorkloadRequest(workload=workload.name, params=params)
    request.role = rng.choice((agent_pb2.WORKLOAD_ROLE_RUN, agent_pb2.WORKLOAD_ROLE_SERVER, 0, 77))  # type: ignore[assignment]
    return request.SerializeToString()


def cheap_vmexit_run() -> bytes:
    """A real (tiny) vmexit run: the happy path under fire."""
    params = {"iterations": "20", "warmup": "5", "io_iterations": "5", "leaves": "1", "ports": "0x80"}
    return agent_pb2.RunWorkloadRequest(
        workload="vmexit", params=params, role=agent_pb2.WORKLOAD_ROLE_RUN
    ).SerializeToString()


#: The VM names the daemon's crafted requests share, so that they meet existing VMs.
STORM_VMS: Final = tuple(f"storm-{n}" for n in range(4))

HOSTILE_SPECS: Final = (
    'name = "{name}"\n',
    'name = "{name}"\nmemory = "2G"\ncpus = 2\n',
    'name = "{name}"\n[boot]\nkernel = "/etc/shadow"\n',
    'name = "{name}"\n[boot]\nfirmware = "../../../../etc/passwd"\n',
    'name = "{name}"\nmemory = "99999999T"\ncpus = -1\n',
    'name = "{name}"\ntee = "sev-snp"\n[scratch]\nsize = "1P"\n',
    # not [network] mode = "tap": the daemon would make a network namespace on this machine
    'name = "../../{name}"\n',
    'name = "{name}\\u0000"\n',
    'name = "{name}"\n' + "x = 1\n" * 20_000,
    'name = "{name}"\nimage = "dev"\n[pinning]\nhost_cpus = [' + ",".join(["99999"] * 1000) + "]\n",
    "\ufeffname = 1\n",
    *DEEP_TOML,
)


def crafted_create_vm(rng: random.Random) -> bytes:
    spec = rng.choice(HOSTILE_SPECS).replace("{name}", rng.choice(STORM_VMS))
    if rng.random() < 0.05:
        spec = "#" * (300 * 1024)  # over the daemon's spec limit, under its message limit
    source = rng.choice(("a.toml", "", "x" * 30_000, "\x00"))
    return host_pb2.CreateVMRequest(spec_toml=spec, source=source).SerializeToString()


def crafted_vm_ref(rng: random.Random, method: MethodDescriptor) -> bytes:
    name = rng.choice((*STORM_VMS, *HOSTILE_TEXT[:12]))
    if method.input_type.name == "StopVMRequest":
        timeout = rng.choice(HOSTILE_FLOATS)
        return host_pb2.StopVMRequest(name=name, timeout_seconds=timeout).SerializeToString()
    return host_pb2.VMRef(name=name).SerializeToString()


# -- the servers --------------------------------------------------------------------------


@dataclass
class Server:
    """A daemon process on a unix socket, with its log file."""

    process: subprocess.Popen[bytes]
    socket: Path
    log: Path

    @property
    def target(self) -> str:
        return f"unix://{self.socket}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _wait_for_socket(path: Path, process: subprocess.Popen[bytes], log: Path, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"exited early: {log.read_text(errors='replace')[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {seconds} s")
        time.sleep(0.02)


@contextmanager
def _running(argv: list[str], sock: Path, log: Path) -> Iterator[Server]:
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL, cwd=REPO_ROOT)
    try:
        _wait_for_socket(sock, process, log)
        yield Server(process, sock, log)
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@contextmanager
def agent_server(directory: Path) -> Iterator[Server]:
    """``cvm-agent`` on a unix socket, inspecting a private copy of a recorded SNP guest's tree
    (idle-polling changes write into the copy, never into the repository)."""
    root = directory / "root"
    shutil.copytree(SNP_TREE, root, symlinks=True)
    sock = directory / "agent.sock"
    argv = [
        str(Path(sys.executable).parent / "cvm-agent"),
        "--listen",
        f"unix://{sock}",
        "--state-dir",
        str(directory / "state"),
        "--root",
        str(root),
        "--no-mount-debugfs",
        "--log-format",
        "json",
    ]
    with _running(argv, sock, directory / "agent.log") as server:
        yield server


@contextmanager
def hostd_server(directory: Path) -> Iterator[Server]:
    """The host daemon's service on a unix socket, with no QEMU to start (see storm_hostd)."""
    sock = directory / "hostd.sock"
    argv = [sys.executable, "-m", "tests.spine.storm_hostd", str(directory / "state"), str(sock)]
    with _running(argv, sock, directory / "hostd.log") as server:
        yield server


def problems_in_log(text: str) -> list[str]:
    """Lines of a server log that show a failure of the server: a traceback, an error."""
    return [
        line[:300]
        for line in text.splitlines()
        if "Traceback" in line or '"level": "error"' in line or '"level": "critical"' in line
    ]


def call_raw(
    channel: grpc.Channel, method: MethodDescriptor, payload: bytes, timeout: float
) -> grpc.StatusCode:
    """Send ``payload`` as ``method``'s request; the status code it ended with."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    try:
        if method.server_streaming:
            stream = channel.unary_stream(path, None, None)(payload, timeout=timeout)
            for _ in stream:
                pass
        else:
            channel.unary_unary(path, None, None)(payload, timeout=timeout)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK

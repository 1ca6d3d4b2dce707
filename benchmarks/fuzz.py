"""Coverage-guided fuzzing of every entry point that reads untrusted bytes, under atheris.

Each target is one function from bytes to an outcome, with the errors it documents; any
other exception, a wrong status code, or a broken invariant is a *finding*:

=================  ==========================================================================
target             what the fuzzer's bytes become, and what may come out
=================  ==========================================================================
spec               TOML text for ``host_daemon.spec.parse_spec``: a VMSpec or ``SpecError``
address            text for ``cvmcore.address.parse_address`` (listening or not): an address
                   that prints and parses back to itself, or ``UsageError``
http               raw bytes on a socket to the /metrics connection handler
                   (``cvmcore.metrics_http.serve_connection``): one HTTP/1.1 answer (200,
                   400, 404 or 405) or none, never an exception
snp_report         ``cvmattest.snp.parse_snp_report`` (+ ``to_dict``): ``MalformedEvidence``
cert_table         ``cvmattest.snp.parse_cert_table``: ``MalformedEvidence``
tdx_quote          ``cvmattest.tdx.parse_tdx_quote`` (+ ``to_dict``): ``MalformedEvidence``
tdreport           ``cvmattest.tdx.parse_tdreport`` (+ ``to_dict``): ``MalformedEvidence``
evidence           ``cvmattest.detect.parse_evidence`` (hex text too; any ``--tee``):
                   ``MalformedEvidence``
certificates       ``cvmattest.certs.load_certificate_file`` (PEM, DER or an SNP certificate
                   table), then the AMD and SGX extensions of each: ``UsageError`` subclasses
pck_extension      the SGX Extensions of a PCK certificate (``read_pck_platform``) holding the
                   fuzzer's DER: ``MalformedEvidence``
agent_rpc          the first byte picks a GuestAgent method, the rest is its serialized
                   request; decoded and served in-process by the same grpc handler the
                   agent's server registers (the bridge into trio, the servicer): any status
                   but UNKNOWN and INTERNAL
hostd_rpc          the same for HostDaemon, on a VMManager with no VMs to start for real
=================  ==========================================================================

The RPC targets run the real servicers on a private root: the agent reads a copy of the
recorded SNP guest tree (tests/fixtures/sysroots/snp-guest) and keeps its state in a
temporary directory; the daemon keeps its store on tmpfs. Only the edges that would act on
this machine are replaced, each by a stand-in that gives the answer the real one gives when
it cannot act (``HostNotReady``) or that does nothing: a workload's commands and its
server process (the request is still validated and the scratch paths still computed), the
host daemon's QEMU binary (absent), network namespaces, vhost-device-vsock, scratch disks.
A request for a stream (RunWorkload, WatchVMs) is read for a few items and then cancelled,
as a client that goes away.

A finding does not stop the run: the first input of each distinct finding (exception type
and the innermost project frame) is saved as ``<out>/<target>-finding-<n>.bin`` and listed
with its traceback in ``<out>/<target>.findings.json``; libFuzzer's own crashes (a signal,
a timeout, memory) leave its ``<out>/<target>-crash-*`` / ``timeout-*`` / ``oom-*`` files.

    .venv/bin/python benchmarks/fuzz.py --list
    .venv/bin/python benchmarks/fuzz.py --inputs 1000000 [--target spec ...] [--out DIR] [--json F]
    .venv/bin/python benchmarks/fuzz.py --replay spec FILE   # run one input, print the outcome
    .venv/bin/python benchmarks/fuzz.py --check-seeds        # each target's seeds once (no atheris)

Each target runs in a subprocess of its own, one after another. Per target it prints the
inputs run, inputs/s, libFuzzer's coverage (``cov``: edges, ``ft``: features) and the
findings. atheris is the ``fuzz`` extra (``pip install -e '.[fuzz]'``; scripts/setup.sh
installs it where a wheel exists).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import dataclasses
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "proto"))

FIXTURES = REPO / "tests" / "fixtures"
INSTRUMENTED = ["cvm", "cvmcore", "cvmattest", "host_daemon", "guest_agent", "workloads"]
RPC_DEADLINE_SECONDS = 5.0
STREAM_DEADLINE_SECONDS = 1.0
STREAM_ITEMS = 4  # a stream is read this far, then the client goes away
# WatchVMs waits for events after its snapshot: its client leaves after the first item (the
# harness keeps one VM defined so that there is one).
STREAM_ITEMS_BY_METHOD = {"WatchVMs": 1}

Check = Callable[[bytes], None]


#: Where a worker keeps its targets' files (``<out>/work-<target>``, replaced at each start: libFuzzer
#: ends the process with exit(), so no clean-up would run); else temporary directories removed at exit.
WORK_ROOT: Path | None = None


def scratch_dir(name: str) -> Path:
    if WORK_ROOT is not None:
        path = WORK_ROOT / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path
    path = Path(tempfile.mkdtemp(prefix=f"cvm-fuzz-{name}-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


class Finding(Exception):
    """An outcome the target does not document (a wrong status, a broken round trip)."""


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    about: str
    setup: Callable[[], Check]  # imports (under instrumentation) and returns the check
    seeds: Callable[[], list[bytes]]
    max_len: int = 4096
    # A structure-aware mutator (data, max_size, seed) -> data, for libFuzzer's custom_mutator.
    mutator: Callable[[], Callable[[bytes, int, int], bytes]] | None = None


# --------------------------------------------------------------------------------------------
# Parsers


def _files(*patterns: str) -> list[bytes]:
    return [p.read_bytes() for pattern in patterns for p in sorted(FIXTURES.glob(pattern))]


def spec_target() -> Check:
    from host_daemon.spec import SpecError, parse_spec

    def check(data: bytes) -> None:
        with contextlib.suppress(SpecError):
            parse_spec(data.decode("utf-8", "replace"), source="fuzz.toml")

    return check


def spec_seeds() -> list[bytes]:
    return [*_files("../host_daemon/golden/*.toml"), b'name = "x"\n', b'name = "x"\nvcpus = [[[1]]]\n']


def address_target() -> Check:
    from cvmcore.address import parse_address
    from cvmcore.errors import UsageError

    def check(data: bytes) -> None:
        listening = bool(data[:1]) and data[0] & 1 == 1
        text = data[1:].decode("utf-8", "replace")
        try:
            address = parse_address(text, listening=listening)
        except UsageError:
            return
        again = parse_address(str(address), listening=listening)
        if again != address:
            raise Finding(f"{text!r} parses to {address!r}, which prints as {address}, parsed as {again!r}")

    return check


def address_seeds() -> list[bytes]:
    texts = [
        "unix:///run/cvm-agent.sock",
        "tcp://127.0.0.1:50051",
        "tcp://[::1]:0",
        "tcp://host.example:9464",
        "vsock://3:1024",
        "vsock://any:1024",
        "hvsock:///run/vm0.vsock:1024",
    ]
    return [bytes([flag]) + t.encode() for t in texts for flag in (0, 1)]


def http_target() -> Check:
    import trio

    from cvmcore.metrics_http import ConnectionSlots, metrics_answer, serve_connection

    answer = metrics_answer(lambda encoder: b"# fuzz\n")
    statuses = {b"200", b"400", b"404", b"405"}

    async def one(data: bytes) -> bytes:
        server_sock, client_sock = trio.socket.socketpair()
        server = trio.SocketStream(server_sock)
        client = trio.SocketStream(client_sock)
        slots = ConnectionSlots()
        reply = b""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_connection, answer, slots, server)
            async with client:
                with contextlib.suppress(trio.BrokenResourceError):
                    await client.send_all(data)
                    await client.send_eof()
                while chunk := await client.receive_some(65536):
                    reply += chunk
        return reply

    async def nothing(nursery: Any) -> None:
        return None

    token = _TrioThread(nothing).token  # one trio run for every input, as a server has

    def check(data: bytes) -> None:
        reply = trio.from_thread.run(one, data, trio_token=token)
        if not reply:
            return
        status_line = reply.split(b"\r\n", 1)[0]
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or parts[0] != b"HTTP/1.1" or parts[1] not in statuses:
            raise Finding(f"answered {status_line[:80]!r}")
        if parts[1] == b"200" and b"\r\n\r\n" not in reply:
            raise Finding("a 200 without the end of its head")

    return check


def http_seeds() -> list[bytes]:
    return [
        b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
        b"HEAD /metrics?x=1 HTTP/1.0\r\n\r\n",
        b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET /metrics\r\n\r\n",
    ]


def _evidence_check(parse: Callable[[bytes], Any]) -> Check:
    from cvmattest.binary import MalformedEvidence

    def check(data: bytes) -> None:
        try:
            parsed = parse(data)
        except MalformedEvidence:
            return
        to_dict = getattr(parsed, "to_dict", None)
        if to_dict is not None:
            json.dumps(to_dict())
        elif isinstance(parsed, tuple):
            for entry in parsed:
                _ = entry.kind

    return check


def snp_report_target() -> Check:
    from cvmattest.snp import parse_snp_report

    return _evidence_check(parse_snp_report)


def cert_table_target() -> Check:
    from cvmattest.snp import parse_cert_table

    return _evidence_check(parse_cert_table)


def cert_table_seeds() -> list[bytes]:
    from cvmattest.certs import load_certificates
    from cvmattest.snp import build_cert_table

    ark = load_certificates((FIXTURES / "attestation/snp/ask_ark_milan.pem").read_bytes())
    from cryptography.hazmat.primitives.serialization import Encoding

    ders = [c.public_bytes(Encoding.DER) for c in ark]
    return [build_cert_table({"ASK": ders[0], "ARK": ders[-1]}), bytes(24)]


def tdx_quote_target() -> Check:
    from cvmattest.tdx import parse_tdx_quote

    return _evidence_check(parse_tdx_quote)


def tdreport_target() -> Check:
    from cvmattest.tdx import parse_tdreport

    return _evidence_check(parse_tdreport)


def evidence_target() -> Check:
    from cvmattest.binary import MalformedEvidence
    from cvmattest.detect import parse_evidence

    tees = (None, "sev-snp", "tdx", "none")

    def check(data: bytes) -> None:
        tee = tees[data[0] % len(tees)] if data else None
        try:
            parsed = parse_evidence(data[1:], tee)
        except MalformedEvidence:
            return
        json.dumps(parsed.to_dict())

    return check


def evidence_seeds() -> list[bytes]:
    found = _files("attestation/snp/*report.bin", "attestation/snp/*.hex", "attestation/tdx/*.dat")
    found += _files("attestation/tdx/tdreport*.bin")
    return [bytes([i % 4]) + data for i, data in enumerate(found)]


def certificates_target() -> Check:
    from cvmattest.binary import MalformedEvidence
    from cvmattest.certs import load_certificate_file, read_amd_key_certificate
    from cvmattest.sgx_pck import read_pck_platform
    from cvmcore.errors import UsageError

    def check(data: bytes) -> None:
        try:
            certs = load_certificate_file(data, "fuzz")
        except UsageError:
            return
        for cert in certs:
            amd = read_amd_key_certificate(cert)
            _ = amd.product
            with contextlib.suppress(MalformedEvidence):
                json.dumps(read_pck_platform(cert).to_dict())

    return check


def certificates_seeds() -> list[bytes]:
    return _files("attestation/snp/*.pem", "attestation/snp/*.der", "attestation/tdx/*.pem")


class _FakeExtensions:
    def __init__(self, value: Any) -> None:
        self._value = value

    def get_extension_for_oid(self, oid: Any) -> Any:
        return dataclasses.make_dataclass("Ext", ["value"])(self._value)


class _FakeCertificate:
    """Only what ``read_pck_platform`` reads: one extension, whose DER the fuzzer writes."""

    def __init__(self, value: Any) -> None:
        self.extensions = _FakeExtensions(value)


def pck_extension_target() -> Check:
    from cryptography import x509

    from cvmattest.binary import MalformedEvidence
    from cvmattest.sgx_pck import SGX_EXTENSIONS_OID, read_pck_platform

    oid = x509.ObjectIdentifier(SGX_EXTENSIONS_OID)

    def check(data: bytes) -> None:
        cert: Any = _FakeCertificate(x509.UnrecognizedExtension(oid, data))
        with contextlib.suppress(MalformedEvidence):
            json.dumps(read_pck_platform(cert).to_dict())

    return check


def pck_extension_seeds() -> list[bytes]:
    from cryptography import x509

    from cvmattest.certs import load_certificates
    from cvmattest.sgx_pck import SGX_EXTENSIONS_OID

    seeds = []
    for path in sorted((FIXTURES / "attestation/tdx").glob("*.pck_chain.pem")):
        for cert in load_certificates(path.read_bytes()):
            with contextlib.suppress(x509.ExtensionNotFound):
                ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(SGX_EXTENSIONS_OID))
                if isinstance(ext.value, x509.UnrecognizedExtension):
                    seeds.append(ext.value.value)
    return seeds


# --------------------------------------------------------------------------------------------
# The RPC surface of both daemons, in-process


class _Aborted(Exception):
    def __init__(self, code: Any, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


class _Context:
    """The part of grpc.aio's ServicerContext the bridge uses; a stream's client leaves after
    ``leave_after`` items (or at a workload server's ready message)."""

    def __init__(self, deadline: float, leave_after: int) -> None:
        self.items = 0
        self.deadline = deadline
        self.leave_after = leave_after

    def peer(self) -> str:
        return "unix:fuzz"

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def time_remaining(self) -> float:
        return self.deadline

    async def abort(self, code: Any, details: str = "", trailing_metadata: Any = ()) -> None:
        raise _Aborted(code, details)

    async def write(self, item: Any) -> None:
        self.items += 1
        if self.items >= self.leave_after or (hasattr(item, "HasField") and _is_server_ready(item)):
            raise asyncio.CancelledError  # the client goes away, as grpc.aio tells a handler


def _is_server_ready(item: Any) -> bool:
    try:
        return bool(item.HasField("server_ready"))
    except ValueError:
        return False


class _TrioThread:
    """trio running on a thread of its own, as the servers run it beside grpc.aio's loop."""

    def __init__(self, make_servicer: Callable[[Any], Any]) -> None:
        import threading

        import trio

        self.servicer: Any = None
        self.token: Any = None
        ready = threading.Event()
        failure: list[BaseException] = []

        async def main() -> None:
            try:
                async with trio.open_nursery() as nursery:
                    self.servicer = await make_servicer(nursery)
                    self.token = trio.lowlevel.current_trio_token()
                    ready.set()
                    await trio.sleep_forever()
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                raise

        threading.Thread(target=trio.run, args=(main,), daemon=True, name="trio").start()
        ready.wait(60)
        if failure or self.token is None:
            raise RuntimeError(f"the servicer did not start: {failure}")


def _rpc_check(service: Any, handler_for: Callable[[Any], Any], trio_thread: _TrioThread) -> Check:
    import grpc

    from cvmcore.grpc_bridge import GrpcBridge, service_handler

    bridge = GrpcBridge(trio_thread.token, max_rpc_seconds=RPC_DEADLINE_SECONDS)
    # What the bridge maps to a status, kept so that an INTERNAL finding names its cause
    # (the server logs it; the harness silences logs).
    causes: list[BaseException] = []
    status_of = bridge._status

    def keep_cause(method: str, exc: BaseException) -> Any:
        causes[:] = [exc]
        return status_of(method, exc)

    bridge._status = keep_cause  # type: ignore[method-assign]
    generic = service_handler(service, bridge, trio_thread.servicer)
    methods = [m.name for m in service.methods]
    handlers: dict[str, Any] = {}
    for name in methods:
        details = dataclasses.make_dataclass("Details", ["method", "invocation_metadata"])
        handlers[name] = generic.service(details(f"/{service.full_name}/{name}", ()))
    loop = asyncio.new_event_loop()
    forbidden = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}

    def check(data: bytes) -> None:
        if not data:
            return
        name = methods[data[0] % len(methods)]
        handler = handlers[name]
        try:
            request = handler.request_deserializer(data[1:])
        except Exception as exc:
            # grpcio answers a request its deserializer refuses with UNKNOWN (and logs it):
            # the request must be refused inside the handler, with INVALID_ARGUMENT.
            raise Finding(f"{name}: undecodable request -> grpc UNKNOWN ({type(exc).__name__})") from exc
        causes.clear()
        call: Any
        if handler.unary_unary is not None:
            call, context = handler.unary_unary, _Context(RPC_DEADLINE_SECONDS, 0)
        else:
            leave_after = STREAM_ITEMS_BY_METHOD.get(name, STREAM_ITEMS)
            call, context = handler.unary_stream, _Context(STREAM_DEADLINE_SECONDS, leave_after)
        try:
            loop.run_until_complete(call(request, context))
        except _Aborted as aborted:
            if aborted.code in forbidden:
                cause = causes[0] if causes else None
                where = _signature(cause) if cause is not None else "?"
                raise Finding(
                    f"{name}: {aborted.code.name} from {where} {aborted.details[:200]!r}"
                ) from cause
        except asyncio.CancelledError:
            pass  # a stream this client left
        handler_for(name)

    return check


def _quiet_logs() -> None:
    import structlog

    structlog.configure(
        processors=[structlog.processors.JSONRenderer()],
        logger_factory=structlog.PrintLoggerFactory(file=open(os.devnull, "w")),  # noqa: SIM115
        wrapper_class=structlog.make_filtering_bound_logger(50),
        cache_logger_on_first_use=True,
    )


def agent_rpc_target() -> Check:
    from cvm.v1 import agent_pb2
    from guest_agent.collectors.agent import AgentStats
    from guest_agent.collectors.registry import Roots, build_registry
    from guest_agent.idle_polling import IdlePollingController
    from guest_agent.server import GuestAgentService
    from guest_agent.tee import detect_tee
    from workloads import execute

    _quiet_logs()
    work = scratch_dir("agent")
    root = work / "root"
    shutil.copytree(FIXTURES / "sysroots" / "snp-guest", root, symlinks=True)

    # The edges that would act on this machine: a workload's commands, its server process.
    async def no_commands(
        workload: Any, params: Any, on_command: Any = None, sandbox: Any = None, notes: Any = None
    ) -> list[Any]:
        return []

    async def no_server(self: Any, plan: Any, probe_host: str = "127.0.0.1") -> int:
        return 1

    async def no_stop(self: Any) -> None:
        return None

    execute.run_guest_work = no_commands
    execute.ServerProcess.start = no_server  # type: ignore[method-assign]
    execute.ServerProcess.stop = no_stop  # type: ignore[method-assign]

    # The SEV-SNP firmware behind configfs-tsm: the tests' stand-in kernel, serving a real report.
    from guest_agent.attestation.configfs_tsm import TSM_REPORT_DIR
    from guest_agent.attestation.guest import fetch_evidence
    from tests.attestation.test_attest_guest import VLEK_REPORT, FakeTsmKernel, _snp_outblob, _vlek_cert_table

    testdata = FIXTURES / "attestation"
    kernel = FakeTsmKernel("sev_guest", _snp_outblob((testdata / VLEK_REPORT).read_bytes()), floor=1)
    kernel.auxblob = _vlek_cert_table(testdata)
    (root / TSM_REPORT_DIR).mkdir(parents=True, exist_ok=True)

    async def make(nursery: Any) -> Any:
        registry, refresher = build_registry(
            Roots.under(root), AgentStats(), tee="sev-snp", mount_debugfs=None
        )
        nursery.start_soon(refresher.run)
        verdict = detect_tee(root)
        return GuestAgentService(
            root=root,
            detect_tee=lambda: verdict,
            attestation_fetch=functools.partial(fetch_evidence, configfs=kernel),
            idle_polling=IdlePollingController(root, work / "state"),
            metrics=registry,
        )

    service = agent_pb2.DESCRIPTOR.services_by_name["GuestAgent"]
    return _rpc_check(service, lambda name: None, _TrioThread(make))


INTERESTING_INTS = (
    0,
    1,
    -1,
    2,
    7,
    64,
    255,
    256,
    4096,
    65535,
    65536,
    2**31 - 1,
    -(2**31),
    2**32 - 1,
    2**63 - 1,
)
INTERESTING_FLOATS = (0.0, -0.0, 1.0, -1.0, 0.5, 1e-9, 1e9, 1e300, float("inf"), float("-inf"), float("nan"))


def _interesting_strings(service_name: str) -> list[str]:
    """Words a request of ``service_name`` may hold: workload and parameter names, values at and
    past the bounds, paths, VM names and specs; mixed with random text by the mutator."""
    from workloads.catalogue import CATALOGUE

    words = ["", " ", "a", "keep", "vm-1", "x" * 63, "x" * 64, "-", "..", "é", "\0", "\n"]
    words += ["0", "1", "-1", "1.5", "nan", "inf", "1e9", "99999999999999999999", "0x10", "yes", "no", "on"]
    words += ["/tmp/x", "/etc/passwd", "../../etc/passwd", "/dev/zero", "/proc/self/mem", "x" * 5000]
    words += ["auto", "configfs-tsm", "sev-guest", "tdx-guest", "haltpoll", "poll"]
    for name, workload in CATALOGUE.items():
        words.append(name)
        words += [param.name for param in workload.params]
        for param in workload.params:
            words += [str(v) for v in (param.default, param.minimum, param.maximum) if v is not None]
            words += list(param.choices or ())
    if service_name == "HostDaemon":
        words += [p.read_text() for p in sorted((REPO / "tests/host_daemon/golden").glob("*.toml"))]
        words += ['name = "a"\n', 'name = "a"\nmemory = "64T"\n', 'name = "a"\nvcpus = 9999\n']
    return words


def proto_mutator(service: Any, words: list[str]) -> Callable[[bytes, int, int], bytes]:
    """libFuzzer's custom mutator for an RPC target: nine times in ten the input is decoded as the
    method's request (an empty one if it does not decode) and up to three fields are set to
    interesting or random values, so the fuzzer spends its time in the handlers rather than
    the decoder; else libFuzzer's own byte mutation."""
    import random

    import atheris
    from google.protobuf import message_factory
    from google.protobuf.descriptor import FieldDescriptor as F

    classes = [message_factory.GetMessageClass(m.input_type) for m in service.methods]
    int_bounds = {
        F.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
        F.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
        F.CPPTYPE_UINT32: (0, 2**32 - 1),
        F.CPPTYPE_UINT64: (0, 2**64 - 1),
        F.CPPTYPE_ENUM: (-(2**31), 2**31 - 1),
    }

    def text(rnd: random.Random) -> str:
        if rnd.random() < 0.8:
            return rnd.choice(words)
        return "".join(chr(rnd.randrange(1, 0x3000)) for _ in range(rnd.randrange(0, 40)))

    def value(field: Any, rnd: random.Random) -> Any:
        kind = field.cpp_type
        if kind in int_bounds:
            low, high = int_bounds[kind]
            pick = rnd.choice(INTERESTING_INTS) if rnd.random() < 0.7 else rnd.randint(low, high)
            return min(max(pick, low), high)
        if kind in (F.CPPTYPE_DOUBLE, F.CPPTYPE_FLOAT):
            return rnd.choice(INTERESTING_FLOATS) if rnd.random() < 0.7 else rnd.uniform(-1e6, 1e6)
        if kind == F.CPPTYPE_BOOL:
            return rnd.random() < 0.5
        if field.type == F.TYPE_BYTES:
            return rnd.randbytes(rnd.choice((0, 1, 32, 63, 64, 65, 4096, rnd.randrange(200))))
        return text(rnd)

    def mutate(message: Any, rnd: random.Random, depth: int = 0) -> None:
        fields = message.DESCRIPTOR.fields
        if not fields or depth > 4:
            return
        field = rnd.choice(fields)
        target = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            if rnd.random() < 0.1:
                target.clear()
                return
            key_field, value_field = (
                field.message_type.fields_by_name["key"],
                field.message_type.fields_by_name["value"],
            )
            key = value(key_field, rnd)
            if value_field.message_type is not None:
                mutate(target[key], rnd, depth + 1)
            else:
                target[key] = value(value_field, rnd)
        elif field.label == F.LABEL_REPEATED:
            if rnd.random() < 0.1:
                del target[:]
            elif field.message_type is not None:
                mutate(target.add(), rnd, depth + 1)
            else:
                target.append(value(field, rnd))
        elif field.message_type is not None:
            target.SetInParent()
            mutate(target, rnd, depth + 1)
        else:
            setattr(message, field.name, value(field, rnd))

    def mutator(data: bytes, max_size: int, seed: int) -> bytes:
        rnd = random.Random(seed)
        if rnd.random() < 0.9:
            index = data[0] if data and rnd.random() < 0.9 else rnd.randrange(256)
            request = classes[index % len(classes)]
            try:
                try:
                    message = request.FromString(data[1:])
                except Exception:  # an input byte mutation broke: start from an empty request
                    message = request()
                for _ in range(rnd.randint(1, 3)):
                    mutate(message, rnd)
                out = bytes([index]) + message.SerializeToString()
            except Exception:  # a value this field refuses, an undecodable input: bytes instead
                out = b""
            if out and len(out) <= max_size:
                return out
        mutated: bytes = atheris.Mutate(data, max_size)
        return mutated

    return mutator


def agent_rpc_mutator() -> Callable[[bytes, int, int], bytes]:
    from cvm.v1 import agent_pb2

    return proto_mutator(
        agent_pb2.DESCRIPTOR.services_by_name["GuestAgent"], _interesting_strings("GuestAgent")
    )


def hostd_rpc_mutator() -> Callable[[bytes, int, int], bytes]:
    from cvm.v1 import host_pb2

    return proto_mutator(
        host_pb2.DESCRIPTOR.services_by_name["HostDaemon"], _interesting_strings("HostDaemon")
    )


def _serialized_seeds(service_name: str, requests: dict[str, list[Any]]) -> list[bytes]:
    from cvm.v1 import agent_pb2, host_pb2

    module = agent_pb2 if service_name == "GuestAgent" else host_pb2
    methods = [m.name for m in module.DESCRIPTOR.services_by_name[service_name].methods]
    seeds = []
    for index, name in enumerate(methods):
        for request in requests.get(name, [None]):
            seeds.append(bytes([index]) + (request.SerializeToString() if request is not None else b""))
    return seeds


def agent_rpc_seeds() -> list[bytes]:
    from cvm.v1 import agent_pb2

    return _serialized_seeds(
        "GuestAgent",
        {
            "GetAttestationReport": [agent_pb2.GetAttestationReportRequest(report_data=bytes(64))],
            "RunWorkload": [
                agent_pb2.RunWorkloadRequest(
                    workload="fio", role=agent_pb2.WORKLOAD_ROLE_RUN, params={"size": "4M"}
                ),
                agent_pb2.RunWorkloadRequest(
                    workload="vmexit", role=agent_pb2.WORKLOAD_ROLE_RUN, params={"iterations": "10"}
                ),
                agent_pb2.RunWorkloadRequest(workload="iperf", role=agent_pb2.WORKLOAD_ROLE_SERVER),
            ],
            "SetIdlePolling": [agent_pb2.SetIdlePollingRequest(mode=agent_pb2.IDLE_MODE_HALTPOLL)],
        },
    )


def hostd_rpc_target() -> Check:
    import trio

    from cvm.v1 import host_pb2
    from cvmcore.errors import HostNotReady
    from host_daemon import netns, vms
    from host_daemon.server import HostDaemonService

    _quiet_logs()
    state = scratch_dir("hostd")

    def not_here(*args: Any, **kwargs: Any) -> Any:
        raise HostNotReady("fuzz harness: this edge does not act on the host")

    async def no_helper(*args: Any, **kwargs: Any) -> Any:
        raise HostNotReady("fuzz harness: no vhost-device-vsock")

    # The edges that would act on this machine: network namespaces, helper processes, disks.
    netns.create = not_here
    netns.delete = lambda *args, **kwargs: True
    vms.create_scratch = not_here  # type: ignore[attr-defined]
    vms.start_vhost_device_vsock = no_helper  # type: ignore[attr-defined]

    holder: dict[str, Any] = {}

    async def make(nursery: Any) -> Any:
        manager = vms.VMManager(state, qemu_binary=str(state / "no-such-qemu"), boot_seconds=5)
        await nursery.start(manager.run)
        holder["manager"] = manager
        return HostDaemonService(state_dir=state, manager=manager)

    trio_thread = _TrioThread(make)
    calls = [0]

    def tidy_in_trio() -> None:
        # Keep the store small (ListVMs and WatchVMs over thousands of VMs would slow the run)
        # and one VM defined (WatchVMs' first item).
        manager = holder["manager"]
        records = manager.list()
        if len(records) > 50:
            for record in records:
                if not record.state.live and record.name != "keep":
                    manager.store.delete(record.name)
        if manager.store.get("keep") is None:
            manager.create('name = "keep"\n')

    def tidy(name: str) -> None:
        calls[0] += 1
        if name == "DestroyVM" or calls[0] % 100 == 0:
            trio.from_thread.run_sync(tidy_in_trio, trio_token=trio_thread.token)

    trio.from_thread.run_sync(tidy_in_trio, trio_token=trio_thread.token)
    service = host_pb2.DESCRIPTOR.services_by_name["HostDaemon"]
    return _rpc_check(service, tidy, trio_thread)


def hostd_rpc_seeds() -> list[bytes]:
    from cvm.v1 import host_pb2

    spec = (REPO / "tests/host_daemon/golden/sev-snp.toml").read_text()
    return _serialized_seeds(
        "HostDaemon",
        {
            "CreateVM": [
                host_pb2.CreateVMRequest(spec_toml='name = "a"\n', source="a.toml"),
                host_pb2.CreateVMRequest(spec_toml=spec, source="snp.toml"),
            ],
            "StartVM": [host_pb2.VMRef(name="a")],
            "StopVM": [host_pb2.StopVMRequest(name="a")],
            "GetVM": [host_pb2.VMRef(name="a")],
            "DestroyVM": [host_pb2.VMRef(name="a")],
        },
    )


def snp_report_seeds() -> list[bytes]:
    return _files("attestation/snp/*report.bin")


def tdx_quote_seeds() -> list[bytes]:
    return _files("attestation/tdx/*.dat")


def tdreport_seeds() -> list[bytes]:
    return _files("attestation/tdx/tdreport*.bin")


TARGETS = {
    t.name: t
    for t in (
        Target("spec", "VM spec TOML -> VMSpec | SpecError", spec_target, spec_seeds, 8192),
        Target("address", "address text -> Address (round trip) | UsageError", address_target, address_seeds),
        Target("http", "raw bytes on a /metrics connection", http_target, http_seeds, 16384),
        Target("snp_report", "SEV-SNP attestation report", snp_report_target, snp_report_seeds, 2048),
        Target(
            "cert_table", "SNP extended-report certificate table", cert_table_target, cert_table_seeds, 8192
        ),
        Target("tdx_quote", "TDX quote v4/v5", tdx_quote_target, tdx_quote_seeds, 16384),
        Target("tdreport", "TDX TDREPORT", tdreport_target, tdreport_seeds, 2048),
        Target("evidence", "any evidence, detected (hex text too)", evidence_target, evidence_seeds, 16384),
        Target(
            "certificates", "certificate files, AMD/SGX extensions", certificates_target, certificates_seeds
        ),
        Target(
            "pck_extension",
            "SGX Extensions DER of a PCK certificate",
            pck_extension_target,
            pck_extension_seeds,
        ),
        Target(
            "agent_rpc",
            "GuestAgent RPCs in-process",
            agent_rpc_target,
            agent_rpc_seeds,
            8192,
            agent_rpc_mutator,
        ),
        Target(
            "hostd_rpc",
            "HostDaemon RPCs in-process",
            hostd_rpc_target,
            hostd_rpc_seeds,
            8192,
            hostd_rpc_mutator,
        ),
    )
}


# --------------------------------------------------------------------------------------------
# The worker: one target under atheris, in its own process


def _signature(exc: BaseException) -> str:
    """The finding's identity: exception type and the innermost frame in the project."""
    if isinstance(exc, Finding):  # the method or check, and the status: not the input's bytes
        return "Finding: " + re.split(r"[('\"]", re.sub(r"[0-9]+", "N", str(exc)), maxsplit=1)[0][:80].strip()
    frames = traceback.extract_tb(exc.__traceback__)
    cause = exc.__cause__
    if cause is not None:
        frames += traceback.extract_tb(cause.__traceback__)
    ours = [f for f in frames if f.filename.startswith(str(REPO)) and not f.filename.endswith("fuzz.py")]
    where = f"{Path(ours[-1].filename).relative_to(REPO)}:{ours[-1].lineno}" if ours else "?"
    return f"{type(exc).__name__} at {where}"


class Recorder:
    """Counts inputs and findings; saves each new finding's input and the state file at once
    (libFuzzer ends the process with exit(), so nothing may wait for the end)."""

    def __init__(self, target: str, out: Path) -> None:
        self.target = target
        self.out = out
        self.inputs = 0
        self.started = time.monotonic()
        self.findings: dict[str, dict[str, Any]] = {}

    def save(self) -> None:
        state = {
            "target": self.target,
            "inputs": self.inputs,
            "seconds": time.monotonic() - self.started,
            "findings": list(self.findings.values()),
        }
        path = self.out / f"{self.target}.findings.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(path)

    def wrap(self, check: Check) -> Check:
        def one(data: bytes) -> None:
            self.inputs += 1
            try:
                check(data)
            except Exception as exc:
                signature = _signature(exc)
                known = self.findings.get(signature)
                if known is not None:
                    known["count"] += 1
                else:
                    reproducer = self.out / f"{self.target}-finding-{len(self.findings) + 1}.bin"
                    reproducer.write_bytes(data)
                    self.findings[signature] = {
                        "signature": signature,
                        "count": 1,
                        "reproducer": str(reproducer),
                        "input_prefix_hex": data[:64].hex(),
                        "message": str(exc)[:500],
                        "traceback": "".join(traceback.format_exception(exc))[-4000:],
                    }
                    self.save()
            if self.inputs % 20000 == 0:
                self.save()

        return one


def worker(name: str, inputs: int, out: Path, timeout: int) -> None:
    import atheris

    target = TARGETS[name]
    global WORK_ROOT
    WORK_ROOT = out / f"work-{name}"
    with atheris.instrument_imports(include=INSTRUMENTED):
        check = target.setup()
    # After the setup: a module the seeds import first would escape the instrumentation.
    corpus = out / "corpus" / name
    corpus.mkdir(parents=True, exist_ok=True)
    for index, seed in enumerate(target.seeds()):
        (corpus / f"seed-{index}").write_bytes(seed)
    recorder = Recorder(name, out)
    recorder.save()
    argv = [
        sys.argv[0],
        f"-runs={inputs}",
        f"-max_len={target.max_len}",
        f"-timeout={timeout}",
        "-rss_limit_mb=3072",
        "-print_final_stats=1",
        f"-artifact_prefix={out}/{name}-",
        str(corpus),
    ]
    mutator = target.mutator() if target.mutator is not None else None
    atheris.Setup(argv, recorder.wrap(check), custom_mutator=mutator)
    atheris.Fuzz()


def check_seeds(names: list[str]) -> int:
    """Run each target's seeds once, without atheris: the harness and the targets work (CI)."""
    failed = 0
    for name in names:
        target = TARGETS[name]
        check = target.setup()
        seeds = target.seeds()
        for index, seed in enumerate(seeds):
            try:
                check(seed)
            except Exception as exc:
                failed += 1
                print(f"{name}: seed {index}: {_signature(exc)}: {exc}", file=sys.stderr)
        print(f"{name}: {len(seeds)} seeds")
    return 1 if failed else 0


def replay(name: str, path: Path) -> int:
    check = TARGETS[name].setup()
    try:
        check(path.read_bytes())
    except Exception:
        traceback.print_exc()
        return 1
    print(f"{name}: {path}: no finding")
    return 0


# --------------------------------------------------------------------------------------------
# The driver


STAT = re.compile(r"^stat::(\w+):\s+(\d+)", re.M)
PROGRESS = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+)", re.M)


def parse_libfuzzer_log(text: str) -> dict[str, Any]:
    """libFuzzer's figures from its output: the last ``cov:``/``ft:`` line and the final stats."""
    stats = {key: int(value) for key, value in STAT.findall(text)}
    progress = PROGRESS.findall(text)
    last = progress[-1] if progress else None
    return {
        "executed": stats.get("number_of_executed_units"),
        "exec_per_sec": stats.get("average_exec_per_sec"),
        "peak_rss_mb": stats.get("peak_rss_mb"),
        "cov": int(last[1]) if last else None,
        "ft": int(last[2]) if last else None,
        "artifacts": re.findall(r"Test unit written to (\S+)", text),
    }


def run_target(name: str, inputs: int, out: Path, timeout: int) -> dict[str, Any]:
    log = out / f"{name}.log"
    started = time.monotonic()
    with log.open("w") as stream:
        process = subprocess.run(
            [sys.executable, __file__, "--worker", name, "--inputs", str(inputs), "--out", str(out),
             "--timeout", str(timeout)],
            stdout=stream, stderr=subprocess.STDOUT, cwd=REPO, check=False,
        )  # fmt: skip
    return summarize(name, out, time.monotonic() - started, process.returncode)


def summarize(name: str, out: Path, seconds: float | None, exit_code: int | None) -> dict[str, Any]:
    """One target's row from its log and findings file in ``out``."""
    log = out / f"{name}.log"
    figures = parse_libfuzzer_log(log.read_text(errors="replace"))
    try:
        state = json.loads((out / f"{name}.findings.json").read_text())
    except (OSError, ValueError):
        state = {"inputs": None, "findings": []}
    executed = figures["executed"] or state["inputs"] or 0
    if seconds is None:
        seconds = state.get("seconds")
    return {
        "target": name,
        "exit_code": exit_code,
        "inputs": executed,
        "seconds": seconds,
        "inputs_per_second": figures["exec_per_sec"] or (executed / seconds if seconds else None),
        "cov": figures["cov"],
        "ft": figures["ft"],
        "peak_rss_mb": figures["peak_rss_mb"],
        "findings": [
            {k: f[k] for k in ("signature", "count", "reproducer", "message")} for f in state["findings"]
        ],
        "libfuzzer_artifacts": figures["artifacts"],
        "log": str(log),
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'target':14} {'inputs':>10} {'inputs/s':>9} {'cov':>6} {'ft':>7} {'findings':>8}  exit")
    for row in rows:
        print(
            f"{row['target']:14} {row['inputs']:10d} {row['inputs_per_second'] or 0:9.0f} "
            f"{row['cov'] or 0:6d} {row['ft'] or 0:7d} {len(row['findings']):8d}  {row['exit_code']}"
        )
    for row in rows:
        for finding in row["findings"]:
            print(f"  {row['target']}: {finding['signature']} x{finding['count']} -> {finding['reproducer']}")
            print(f"      {finding['message'][:200]}")
        for artifact in row["libfuzzer_artifacts"]:
            print(f"  {row['target']}: libFuzzer artifact {artifact}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--list", action="store_true", help="list the targets")
    parser.add_argument("--target", action="append", choices=sorted(TARGETS), help="repeatable; default all")
    parser.add_argument("--inputs", type=int, default=100_000, help="inputs per target (default 100000)")
    parser.add_argument("--timeout", type=int, default=30, help="seconds one input may take (default 30)")
    parser.add_argument("--out", help="reproducers, corpora and logs (default: a new temp dir)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--replay", nargs=2, metavar=("TARGET", "FILE"), help="run one saved input")
    parser.add_argument("--report", metavar="OUT", help="print the table of a run from its --out directory")
    parser.add_argument("--check-seeds", action="store_true", help="run the seeds once (no atheris)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.list:
        for target in TARGETS.values():
            print(f"{target.name:14} {target.about}")
        return 0
    if args.replay:
        return replay(args.replay[0], Path(args.replay[1]))
    if args.report:
        done = [n for n in args.target or list(TARGETS) if (Path(args.report) / f"{n}.log").exists()]
        rows = [summarize(name, Path(args.report), None, None) for name in done]
        if args.json:
            Path(args.json).write_text(json.dumps({"out": args.report, "targets": rows}, indent=1))
        print_table(rows)
        return 0
    if args.check_seeds:
        return check_seeds(args.target or list(TARGETS))
    if args.worker:
        worker(args.worker, args.inputs, Path(args.out), args.timeout)
        return 0
    try:
        import atheris  # noqa: F401
    except ImportError:
        raise SystemExit("fuzz: atheris is not installed: pip install -e '.[fuzz]'") from None
    if args.inputs < 1:
        parser.error("--inputs must be at least 1")
    rows = []
    out = Path(args.out or tempfile.mkdtemp(prefix="cvm-fuzz-")).resolve()  # kept: the reproducers
    out.mkdir(parents=True, exist_ok=True)
    for name in args.target or list(TARGETS):
        print(f"fuzz {time.strftime('%H:%M:%S')} {name}: {args.inputs} inputs", file=sys.stderr, flush=True)
        row = run_target(name, args.inputs, out, args.timeout)
        rows.append(row)
        print(
            f"fuzz {time.strftime('%H:%M:%S')} {name}: {row['inputs']} inputs in {row['seconds']:.0f} s, "
            f"cov {row['cov']} ft {row['ft']}, {len(row['findings'])} findings",
            file=sys.stderr,
            flush=True,
        )
        if args.json:
            Path(args.json).write_text(json.dumps({"out": str(out), "targets": rows}, indent=1))
    print(f"out: {out}")
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

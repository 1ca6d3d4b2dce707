"""Running a workload's processes, with deadlines: what the agent does in a guest.

The agent's ``RunWorkload`` and the runner's :class:`workloads.runner.LocalTarget` share
this module, so that a local run and a guest run start servers and run commands the same
way:

- :class:`ServerProcess` materialises a :class:`ServerPlan` in a private directory (mode
  0755: nginx's workers drop to ``nobody`` and must read the page), starts the server in
  the foreground with its stderr in that directory, waits until its port accepts a TCP
  connection (:data:`SERVER_START_TIMEOUT`), and stops it with SIGTERM then SIGKILL
  (:data:`SERVER_STOP_TIMEOUT`), removing the directory. The server also gets SIGTERM from
  the kernel when the process that started it dies (:func:`spawn_server`), so a crashed or
  killed agent or CLI leaves no server behind;
- :func:`run_guest_work` runs one case of a guest workload: each argv of
  :meth:`Workload.guest_commands` in turn (stdout captured, a non-zero exit an error with
  the tail of stderr), or :meth:`Workload.run_in_process` in a worker thread of a limiter of
  its own that is stopped, not abandoned, when cancelled (:func:`run_stoppable`), each under
  :meth:`Workload.timeout`; then parses. Around it, :func:`own_scratch_dir` makes a private
  directory for the workload's scratch files inside the one the caller chose and removes it
  afterwards: the agent writes and deletes only files it created itself, so no name a host
  sends can make it overwrite or unlink a guest's file (issue 13: ``fio filename=/tmp/victim``
  did both);
- with a ``systemd`` :class:`~workloads.sandbox.Sandbox` (the agent as cvm-agent.service)
  every command and server runs in a transient workload unit instead, an in-process workload
  as ``python -m workloads.inprocess`` there (its thread would meet the agent's own sandbox),
  and a scratch directory the agent cannot write is made and removed in a unit too
  (:func:`scratch_dir_where_it_runs`);
- :func:`run_command` is the one place a process is run and waited for;
- :func:`run_guest_request` and :func:`start_server_request` are the agent's entry points:
  a workload name and text parameters from the host in, validated here.

In the guest, call them with a workload from :func:`workloads.catalogue.get` and params from
its :meth:`Workload.validate` of the host's text: argv lists only, never a shell.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

import trio

from cvmcore.affinity import child_preexec, restore_in_child
from cvmcore.errors import CvmError, DeadlineExceeded, RemoteError, UsageError
from cvmcore.instance import PrivateDirectory
from workloads.catalogue import get
from workloads.inprocess import in_process_argv, parse_output
from workloads.model import MissingToolError, Sample, ServerPlan, StopFlag, Unavailable, Workload
from workloads.sandbox import DIRECT, Sandbox, kill_argv, run_argv, stop_all_argv, stop_argv, unit_name

T = TypeVar("T")

SERVER_START_TIMEOUT = 15.0
SERVER_STOP_TIMEOUT = 10.0
#: seconds a command whose output is complete (Workload.output_complete) gets to exit by itself
COMPLETE_GRACE = 2.0
STDERR_TAIL = 400

#: called before each guest command: (index, count, argv)
CommandCallback = Callable[[int, int, list[str]], None]


async def run_command(
    argv: list[str],
    timeout: float,
    what: str,
    complete: Callable[[str], bool] | None = None,
    sandbox: Sandbox = DIRECT,
) -> str:
    """Run ``argv`` to completion within ``timeout`` seconds; its stdout.

    A non-zero exit is a :class:`RemoteError` carrying the tail of stderr; running past
    the deadline kills the process and raises :class:`DeadlineExceeded`. Its stdin is
    /dev/null.

    ``complete`` (a workload's :meth:`Workload.output_complete`) is asked about the stdout
    read so far: once it holds everything the parser needs, the process gets
    :data:`COMPLETE_GRACE` seconds to exit by itself and is then stopped, and its stdout is
    the result whatever its exit status (memaslap can hang in its teardown after printing
    its summary).

    With a ``systemd`` :class:`~workloads.sandbox.Sandbox` the command runs in a transient
    workload unit; stopping it early also stops that unit (killing systemd-run alone would not).
    """
    stdout, stderr = bytearray(), bytearray()
    finished_early = False
    unit = unit_name(what) if sandbox.systemd else None
    process = await trio.lowlevel.open_process(
        run_argv(sandbox, unit, argv) if unit is not None else argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=child_preexec(),
    )
    assert process.stdout is not None and process.stderr is not None
    err_stream, out_stream = process.stderr, process.stdout

    async def drain_stderr() -> None:
        async for chunk in err_stream:
            stderr.extend(chunk)

    async def stop_after_grace() -> None:
        with trio.move_on_after(COMPLETE_GRACE):
            await process.wait()
        if process.returncode is None:
            process.kill()

    try:
        with trio.move_on_after(timeout) as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain_stderr)
                async for chunk in out_stream:
                    stdout.extend(chunk)
                    if (
                        complete is not None
                        and not finished_early
                        and complete(stdout.decode(errors="replace"))
                    ):
                        finished_early = True
                        nursery.start_soon(stop_after_grace)
                await process.wait()
    finally:
        stopped = process.returncode is None or finished_early
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            if unit is not None and stopped:
                await stop_unit(unit, kill=True)
            await process.wait()
            await out_stream.aclose()
            await err_stream.aclose()
    if scope.cancelled_caught:
        raise DeadlineExceeded(f"{what}: {argv[0]} did not finish within {timeout:g} s")
    if process.returncode != 0 and not finished_early:
        tail = stderr.decode(errors="replace").strip()[-STDERR_TAIL:]
        raise RemoteError(f"{what}: {argv[0]} exited with {process.returncode}: {tail or '(no stderr)'}")
    return stdout.decode(errors="replace")


async def stop_unit(unit: str, *, kill: bool = False) -> None:
    """Stop a workload unit (SIGKILL first with ``kill``); a unit already gone is fine."""
    with trio.move_on_after(SERVER_STOP_TIMEOUT + 5):
        for argv in [kill_argv(unit)] * kill + [stop_argv(unit)]:
            await trio.run_process(argv, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def stop_leftover_units(sandbox: Sandbox) -> None:
    """At the agent's start: stop the workload units a previous (crashed) agent left running."""
    if sandbox.systemd:
        with trio.move_on_after(SERVER_STOP_TIMEOUT + 5):
            await trio.run_process(
                stop_all_argv(), check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )


#: In-process workloads run one at a time, on threads of their own limiter: however many
#: the host starts (or cancels), they never hold the threads of trio's default limiter that
#: the rest of the agent needs (GetMetrics, idle polling, attestation).
WORKLOAD_THREADS = 1
#: How long a cancelled in-process workload gets to notice its stop flag (one chunk of its
#: loop) before the caller stops waiting for it.
STOP_WAIT = 30.0
_workload_limiter: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("workload_limiter")


def workload_limiter() -> trio.CapacityLimiter:
    """The limiter of in-process workload threads in this trio run (:data:`WORKLOAD_THREADS`)."""
    try:
        return _workload_limiter.get()
    except LookupError:
        limiter = trio.CapacityLimiter(WORKLOAD_THREADS)
        _workload_limiter.set(limiter)
        return limiter


async def run_stoppable(fn: Callable[[StopFlag], T]) -> T:
    """``fn(stop)`` on a worker thread of :func:`workload_limiter`; stopped, not abandoned.

    A thread cannot be interrupted, so ``fn`` polls ``stop`` (a :class:`threading.Event`)
    and raises :class:`WorkloadStopped` once it is set. When the caller is cancelled (its
    deadline, a host that went away), the flag is set and the caller waits, shielded, up to
    :data:`STOP_WAIT` s for the thread to end before the cancellation goes on.
    """
    stop = threading.Event()
    started = threading.Event()
    finished = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def body() -> T:
        started.set()
        try:
            return fn(stop)
        finally:
            with suppress(trio.RunFinishedError):
                token.run_sync_soon(finished.set)

    try:
        return await trio.to_thread.run_sync(body, abandon_on_cancel=True, limiter=workload_limiter())
    except BaseException:
        stop.set()
        if started.is_set():
            with trio.CancelScope(shield=True), trio.move_on_after(STOP_WAIT):
                await finished.wait()
        raise


async def run_guest_work(
    workload: Workload,
    params: Mapping[str, Any],
    on_command: CommandCallback | None = None,
    sandbox: Sandbox = DIRECT,
    notes: list[Unavailable] | None = None,
) -> list[Sample]:
    """One repetition of a guest workload, here: every case of ``params`` in turn; the samples.

    Given the params of a single case (what the runner passes) this runs that case; given
    a workload's full params (fio's ``jobs=all``) it runs them all: :meth:`Workload.cases`
    of one case is that case.

    The workload's scratch files go into a private directory made for this call and removed
    afterwards, also when the run fails or is cancelled (:func:`scratch_dir_where_it_runs`).
    """
    samples: list[Sample] = []
    async with scratch_dir_where_it_runs(workload, params, sandbox) as private:
        for case in workload.cases(private):
            samples += await _run_case(workload, case, on_command, sandbox, notes)
    return samples


async def _run_case(
    workload: Workload,
    params: Mapping[str, Any],
    on_command: CommandCallback | None,
    sandbox: Sandbox,
    notes: list[Unavailable] | None,
) -> list[Sample]:
    timeout = workload.timeout(params)
    if workload.in_process and sandbox.systemd:
        # Its own process in a workload unit: the agent's sandbox refuses what it does.
        argv = in_process_argv(workload.name, params)
        if on_command:
            on_command(0, 1, argv)
        samples, unavailable = parse_output(await run_command(argv, timeout, workload.name, sandbox=sandbox))
        if notes is not None:  # what the unit cannot measure, which is not what the agent cannot
            notes += [n for n in unavailable if n not in notes]
        return samples
    if workload.in_process:
        if on_command:
            on_command(0, 1, [f"<in process: {workload.name}>"])
        with trio.move_on_after(timeout) as scope:
            samples = await run_stoppable(functools.partial(workload.run_in_process, params))
        if scope.cancelled_caught:
            raise DeadlineExceeded(f"{workload.name} did not finish within {timeout:g} s")
        return samples
    commands = workload.guest_commands(params)
    outputs = []
    for index, argv in enumerate(commands):
        if on_command:
            on_command(index, len(commands), argv)
        outputs.append(await run_command(argv, timeout, workload.name, sandbox=sandbox))
    return workload.parse_guest(outputs, params)


#: errno values that mean the caller named a directory that cannot hold a scratch directory
_CALLER_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG})


@contextmanager
def own_scratch_dir(workload: Workload, params: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """``params`` with the workload's scratch directory replaced by a private one made in it.

    The agent writes and deletes only what it created itself: fio lays its file out by
    unlinking and re-creating the path it is given, so that path must be one nobody else can
    name. A fresh directory (``mkdtemp``, mode 0700) inside the directory the caller chose
    is that place; it is removed with everything in it afterwards, also when the run fails
    or is cancelled (synchronously: no cancellation can cut it short). A caller's directory
    that does not exist, is not a directory or leads elsewhere through a symbolic link
    (:meth:`Workload.check_scratch_dir`) is a :class:`UsageError`.
    """
    name = workload.scratch_dir_param
    if name is None:
        yield dict(params)
        return
    parent = params[name]
    workload.check_scratch_dir(os.path.realpath(parent))
    try:
        private = tempfile.mkdtemp(prefix=f"cvmctl-{workload.name}-", dir=parent)
    except OSError as exc:
        message = f"parameter {name}: cannot make a scratch directory in {parent!r}: {exc.strerror}"
        if exc.errno in _CALLER_ERRNOS:
            raise UsageError(message) from None
        raise CvmError(message) from None  # read-only, full, not permitted: this guest's state
    try:
        yield {**params, name: private}
    finally:
        shutil.rmtree(private, ignore_errors=True)


#: How long making or removing a scratch directory in a workload unit may take.
SCRATCH_COMMAND_TIMEOUT = 60.0


@asynccontextmanager
async def scratch_dir_where_it_runs(
    workload: Workload, params: Mapping[str, Any], sandbox: Sandbox = DIRECT
) -> AsyncIterator[dict[str, Any]]:
    """:func:`own_scratch_dir`, made by whoever can write where the workload writes.

    That is the agent itself, except under a ``systemd`` sandbox in a directory the agent's
    unit has read-only (its ``ProtectSystem=strict``: /mnt, /srv, /scratch) while the workload
    unit may write it (``ProtectSystem=full``). There the private directory is made
    (``mktemp -d``, mode 0700) and removed (``rm -rf``, shielded from cancellation) by commands
    in a workload unit; /tmp and /var/tmp are the agent's own private ones, which the workload
    unit shares (:mod:`workloads.sandbox`), so the agent makes those itself.
    """
    name = workload.scratch_dir_param
    if (
        name is None
        or not sandbox.systemd
        or not os.path.isdir(params[name])  # own_scratch_dir says what is wrong with it
        or os.access(params[name], os.W_OK)
    ):
        with own_scratch_dir(workload, params) as mine:
            yield mine
        return
    parent = str(params[name])
    workload.check_scratch_dir(os.path.realpath(parent))
    template = f"cvmctl-{workload.name}-XXXXXXXXXX"
    try:
        made = await run_command(
            ["mktemp", "-d", "-p", parent, "--", template],
            SCRATCH_COMMAND_TIMEOUT,
            workload.name,
            sandbox=sandbox,
        )
    except RemoteError as exc:
        raise CvmError(f"parameter {name}: cannot make a scratch directory in {parent!r}: {exc}") from None
    private = made.strip()
    if os.path.dirname(private) != os.path.normpath(parent) or not os.path.basename(private).startswith(
        template.rstrip("X")
    ):
        raise CvmError(f"parameter {name}: mktemp in {parent!r} answered {private!r}")
    try:
        yield {**params, name: private}
    finally:
        remove = ["rm", "-rf", "--one-file-system", "--", private]
        with trio.CancelScope(shield=True), suppress(CvmError):
            await run_command(remove, SCRATCH_COMMAND_TIMEOUT, workload.name, sandbox=sandbox)


async def run_guest_request(
    name: str, raw: Mapping[str, str], on_command: CommandCallback | None = None, sandbox: Sandbox = DIRECT
) -> tuple[list[Sample], list[Unavailable]]:
    """The agent's side of one guest repetition: a workload *name* and *text* params in.

    Validates (``UsageError`` for an unknown name or a bad value), checks the tools
    (``MissingToolError``), runs every case (its scratch files created and removed around
    it: the host may never ask again), and returns the samples with what could not be
    measured. Nothing from ``raw`` reaches a shell; argv lists come from the catalogue.
    """
    workload = get(name)
    if workload.kind != "guest":
        raise UsageError(f"{name} has no guest-only work (it is {workload.kind})")
    params = workload.validate(raw)
    workload.require_tools("guest")
    notes: list[Unavailable] | None = [] if sandbox.systemd and workload.in_process else None
    samples = await run_guest_work(workload, params, on_command, sandbox, notes)
    return samples, notes if notes is not None else workload.unavailable(params)


async def start_server_request(
    name: str, raw: Mapping[str, str], server: ServerProcess, probe_host: str = "127.0.0.1"
) -> int:
    """The agent's side of a client/server workload: validate, build the plan, start; the port."""
    workload = get(name)
    params = workload.validate(raw)
    plan = workload.guest_server(params)
    if plan is None:
        raise UsageError(f"{name} has no server")
    workload.require_tools("guest")
    return await server.start(plan, probe_host)


#: The TCP state "LISTEN" in /proc/net/tcp and tcp6 (include/net/tcp_states.h: TCP_LISTEN = 10).
_TCP_LISTEN = "0A"


def listening_ports(proc_root: Path = Path("/proc")) -> set[int]:
    """Local ports with a TCP socket in LISTEN state in this network namespace (proc_net_tcp:
    ``local_address`` is ``HEXADDR:HEXPORT``, ``st`` the state in hex)."""
    ports: set[int] = set()
    for name in ("tcp", "tcp6"):
        try:
            lines = (proc_root / "net" / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == _TCP_LISTEN:
                ports.add(int(fields[1].rpartition(":")[2], 16))
    return ports


async def wait_for_port(
    host: str, port: int, process: subprocess.Popen[bytes], timeout: float, proc_root: Path = Path("/proc")
) -> None:
    """Until something listens on TCP ``port``; fail early if ``process`` exits.

    Read from /proc/net/tcp{,6}, not by connecting: iperf3's server takes any connection as
    its one client of the moment, and a probe that connects and hangs up leaves it resetting
    the real client's control connection ("unable to receive control message: Connection
    reset by peer"). ``host`` is only named in the error.
    """
    with trio.move_on_after(timeout):
        while True:
            if process.poll() is not None:
                raise RemoteError(
                    f"the server exited with {process.returncode} before listening on port {port}"
                )
            if port in await trio.to_thread.run_sync(listening_ports, proc_root):
                return
            await trio.sleep(0.05)
    raise DeadlineExceeded(f"the server did not listen on {host}:{port} within {timeout:g} s")


# prctl(2), resolved before any fork so that the child only makes the call.
_LIBC = ctypes.CDLL(None, use_errno=True)
_PRCTL = _LIBC.prctl
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> Callable[[], None]:
    """A preexec_fn: SIGTERM this child when its parent thread dies (and if it already has).

    Also gives the child the CPU set the agent had before it pinned itself (cvmcore.affinity).
    """

    def set_pdeathsig() -> None:
        restore_in_child()
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died between fork and prctl
            os.kill(os.getpid(), signal.SIGTERM)

    return set_pdeathsig


def spawn_server(argv: list[str], stderr_fd: int) -> subprocess.Popen[bytes]:
    """Fork and exec a server *on the calling thread*, which must outlive it.

    The kernel's parent-death signal belongs to the thread that forked, not the process:
    trio's ``open_process`` forks on a worker thread that its cache retires after idling,
    which would kill the server mid-run. Called from trio's own thread (the CLI's, the
    agent's), the server gets SIGTERM when the program that started it dies, even by
    SIGKILL, instead of living on as an orphan.
    """
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=stderr_fd,
        preexec_fn=_die_with_parent(os.getpid()),  # only a pre-resolved prctl runs in the child
    )


async def wait_exit(process: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait up to ``timeout`` s for ``process`` to exit (on a pidfd, no polling); whether it did."""
    if process.poll() is not None:
        return True
    try:
        pidfd = os.pidfd_open(process.pid)
    except ProcessLookupError:  # already reaped
        return True
    try:
        with trio.move_on_after(timeout):
            await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)
    return process.poll() is not None


async def stop_process(process: subprocess.Popen[bytes], timeout: float = SERVER_STOP_TIMEOUT) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds; reaps."""
    with trio.CancelScope(shield=True):
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            if not await wait_exit(process, timeout):
                process.kill()
                await wait_exit(process, timeout)


class ServerProcess:
    """One server from a :class:`ServerPlan`: :meth:`start`, then :meth:`stop` (idempotent).

    With a ``systemd`` sandbox the server runs in a workload unit and the process here is
    ``systemd-run --wait``, which lives as long as the unit: its exit is the server's.
    """

    def __init__(self, sandbox: Sandbox = DIRECT) -> None:
        self.sandbox = sandbox
        self._unit: str | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._dir: PrivateDirectory | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    async def start(self, plan: ServerPlan, probe_host: str = "127.0.0.1") -> int:
        """Start the server and wait until ``probe_host:plan.port`` accepts; the port."""
        await self.stop()
        # A killed agent's or CLI's server directory is removed by the next server's start.
        self._dir = PrivateDirectory("cvmctl-server-")
        directory = self._dir.path
        argv, files = plan.materialise(str(directory))
        write_server_files(directory, files)
        if shutil.which(argv[0]) is None:
            await self.stop()
            raise MissingToolError(f"{argv[0]} is not installed")
        stderr_path = directory / "server.stderr"
        stderr_fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        if self.sandbox.systemd:
            self._unit = unit_name(Path(argv[0]).name)
            argv = run_argv(self.sandbox, self._unit, argv)
        try:
            self._process = spawn_server(argv, stderr_fd)
        finally:
            os.close(stderr_fd)  # the server has its own copy
        try:
            await wait_for_port(probe_host, plan.port, self._process, SERVER_START_TIMEOUT)
        except CvmError as exc:
            tail = stderr_path.read_bytes().decode(errors="replace").strip()[-STDERR_TAIL:]
            await self.stop()
            raise type(exc)(f"{exc}: {tail}" if tail else str(exc)) from None
        return plan.port

    async def stop(self) -> None:
        if self._unit is not None:
            await stop_unit(self._unit)  # systemd-run --wait then exits by itself
            self._unit = None
        if self._process is not None:
            await stop_process(self._process)
            self._process = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


def write_server_files(directory: Path, files: Mapping[str, bytes]) -> None:
    """Write ``files`` below ``directory`` (0644 files, 0755 dirs); refuse paths that escape it."""
    root = directory.resolve()
    os.chmod(root, 0o755)  # nginx's workers (nobody) read the page
    for relative, content in files.items():
        path = root / relative
        if root not in path.resolve().parents:
            raise UsageError(f"server file {relative!r} escapes the server directory")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        path.chmod(0o644)
    for sub in root.rglob("*"):
        if sub.is_dir():
            sub.chmod(0o755)

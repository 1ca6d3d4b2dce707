"""The agent on one CPU (cvmcore.affinity): the choice, the pinning of every thread, and
children that get the CPU set back."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cvmcore.affinity import _ChildMask, choose_cpu, format_cpu_list, parse_cpu_choice
from cvmcore.errors import UsageError
from tests.spine.agent_fixtures import agent_process
from tests.spine.test_programs import cvmctl

ALLOWED = frozenset(os.sched_getaffinity(0))
needs_two_cpus = pytest.mark.skipif(len(ALLOWED) < 2, reason="pinning is only visible with 2+ CPUs")


@pytest.mark.parametrize(("text", "choice"), [("auto", "auto"), ("ALL", "all"), (" 3 ", 3), ("0", 0)])
def test_parse_cpu_choice(text: str, choice: object) -> None:
    assert parse_cpu_choice(text) == choice


@pytest.mark.parametrize("text", ["", "-1", "one", "1-3", "1.5"])
def test_parse_cpu_choice_rejects(text: str) -> None:
    with pytest.raises(UsageError, match="expected auto, all or a CPU number"):
        parse_cpu_choice(text)


def test_choose_cpu() -> None:
    allowed = {0, 1, 2, 5}
    assert choose_cpu("auto", allowed) == 5
    assert choose_cpu("all", allowed) is None
    assert choose_cpu(2, allowed) == 2
    with pytest.raises(UsageError, match=r"--cpu 3: this process may run on CPUs 0-2,5 only"):
        choose_cpu(3, allowed)


@pytest.mark.parametrize(
    ("cpus", "text"), [({0}, "0"), ({0, 1, 2, 5}, "0-2,5"), ({1, 3, 4, 5, 9, 10}, "1,3-5,9-10")]
)
def test_format_cpu_list(cpus: set[int], text: str) -> None:
    assert format_cpu_list(cpus) == text


def cpus_allowed(status: str) -> str:
    return next(line.split()[1] for line in status.splitlines() if line.startswith("Cpus_allowed_list:"))


@needs_two_cpus
def test_every_agent_thread_runs_on_the_chosen_cpu(tmp_path: Path) -> None:
    sock = tmp_path / "a.sock"
    with agent_process(sock, tmp_path / "state") as process:  # --cpu auto, the default
        assert cvmctl("agent", "health", "--connect", f"unix://{sock}").stdout == "SERVING\n"
        tasks = list(Path(f"/proc/{process.pid}/task").iterdir())
        assert len(tasks) > 5  # trio's, grpcio's and grpc core's threads
        for task in tasks:
            try:
                status = (task / "status").read_text()
            except (FileNotFoundError, ProcessLookupError):  # a thread that ended since the listing
                continue
            assert cpus_allowed(status) == str(max(ALLOWED)), task.name


@needs_two_cpus
def test_children_get_the_cpu_set_back(tmp_path: Path) -> None:
    """Both ways the agent starts programs: guest commands and benchmark servers."""
    script = textwrap.dedent(
        f"""
        import os, trio
        from cvmcore.affinity import pin_process
        from workloads.execute import run_command, spawn_server
        pin_process({max(ALLOWED)})
        print("self", sorted(os.sched_getaffinity(0)))
        out = trio.run(run_command, ["grep", "Cpus_allowed_list", "/proc/self/status"], 10, "test")
        print("command", out.split()[1])
        with open({str(tmp_path / "server.txt")!r}, "w") as sink:
            server = ["sh", "-c", "grep Cpus_allowed_list /proc/self/status >&2"]  # stdout is /dev/null
            spawn_server(server, sink.fileno()).wait(10)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"self [{max(ALLOWED)}]"
    assert lines[1] == f"command {format_cpu_list(ALLOWED)}"
    assert cpus_allowed((tmp_path / "server.txt").read_text()) == format_cpu_list(ALLOWED)


def test_cpu_outside_the_allowed_set_is_one_line(tmp_path: Path) -> None:
    agent = Path(sys.executable).parent / "cvm-agent"
    done = subprocess.run(
        [str(agent), "--listen", f"unix://{tmp_path}/a.sock", "--cpu", "4096"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert done.returncode == 2
    assert done.stderr == (
        f"cvm-agent: error: --cpu 4096: this process may run on CPUs {format_cpu_list(ALLOWED)} only\n"
    )


def test_child_mask_layout_past_64_cpus() -> None:
    """A cpu_set_t is an array of longs: CPU n is bit n % 64 of long n // 64 (on 64-bit)."""
    mask = _ChildMask({0, 65, 127})
    assert list(mask._mask) == [1, (1 << 1) | (1 << 63)]


def test_child_mask_that_the_kernel_refuses_raises() -> None:
    before = os.sched_getaffinity(0)
    with pytest.raises(OSError, match="sched_setaffinity: Invalid argument"):
        _ChildMask({4000}).apply()  # no such CPU: EINVAL, and nothing changes
    assert os.sched_getaffinity(0) == before

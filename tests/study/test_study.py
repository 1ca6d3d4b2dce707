"""``cvmctl study`` end to end on ``--targets local,local``: a tiny profile, its HTML report in
headless Chromium, and interruptions (SIGINT, then ``kill -9``) followed by ``--resume``.

The CLI runs as a subprocess, as a user runs it, against a private data directory. The
headless-browser check keeps its screenshot under ``$CVM_TEST_ARTIFACTS`` (else
``var/test-artifacts`` in the checkout, which git ignores).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
TINY = [
    "--targets",
    "local,local",
    "--items",
    "vmexit,ping",
    "--repeat",
    "2",
    "--warmup",
    "0",
    "--duration",
    "1",
]
# Long enough for ping to be caught mid-run: 8 steps of about 2 s each.
INTERRUPTIBLE = ["--targets", "local,local", "--items", "vmexit,ping", "--repeat", "3", "--warmup", "1"]
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def cvmctl(*args: str, data_dir: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "cvmctl"), *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def manifest(data_dir: Path, cid: str = "c1") -> dict[str, Any]:
    data: dict[str, Any] = json.loads((data_dir / "campaigns" / cid / "campaign.json").read_text())
    return data


def item(data: dict[str, Any], name: str) -> dict[str, Any]:
    return next(i for i in data["items"] if i["name"] == name)


def runs(data_dir: Path) -> list[tuple[int, str, str, int]]:
    """(id, workload, status, measured samples) of every stored run."""
    with sqlite3.connect(data_dir / "results.sqlite3") as db:
        return [
            (row[0], row[1], row[2], row[3])
            for row in db.execute(
                "SELECT id, workload, status, (SELECT COUNT(*) FROM samples s WHERE s.run_id = runs.id)"
                " FROM runs ORDER BY id"
            )
        ]


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data_dir = tmp_path_factory.mktemp("study")
    done = cvmctl("study", *TINY, "--json", data_dir=data_dir)
    assert done.returncode == 0, done.stderr
    return data_dir


def test_tiny_study_completes_with_progress_and_report(tiny_study: Path) -> None:
    data = manifest(tiny_study)
    assert [i["state"] for i in data["items"]] == ["completed", "completed"]
    assert data["finished"] is not None
    stored = runs(tiny_study)
    assert [(r[1], r[2]) for r in stored] == [("vmexit", "completed"), ("ping", "completed")]
    report = tiny_study / "campaigns" / "c1" / "report.html"
    page = report.read_text()
    assert page.count('<figure class="item"') == 2
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")  # nothing to fetch
    for run_id, *_ in stored:
        with sqlite3.connect(tiny_study / "results.sqlite3") as db:
            (metadata,) = db.execute("SELECT metadata FROM runs WHERE id = ?", (run_id,)).fetchone()
        attestation = json.loads(metadata)["attestation"]
        assert {arm["status"] for arm in attestation["arms"].values()} == {"not attested"}


def test_study_progress_says_item_k_of_n_and_time_left(tmp_path: Path) -> None:
    done = cvmctl(
        "study", *TINY[:4], "--items", "vmexit", "--repeat", "1", "--warmup", "0", data_dir=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert re.search(r"== item 1 of 1: vmexit on local vs local \(about .+ left in the study\)", done.stderr)
    assert "report: " in done.stdout


def test_report_html_renders_in_headless_chromium(tiny_study: Path, tmp_path: Path) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Debian's chromium is not installed (scripts/setup.sh installs it)")
    out = cvmctl("report", "c1", "--html", "-o", str(tmp_path / "html"), data_dir=tiny_study)
    assert out.returncode == 0, out.stderr
    page = tmp_path / "html" / "report.html"
    artifacts = Path(os.environ.get("CVM_TEST_ARTIFACTS") or REPO / "var" / "test-artifacts")
    artifacts.mkdir(parents=True, exist_ok=True)
    screenshot = artifacts / "study-report.png"
    common = [chromium, *CHROMIUM_FLAGS, "--enable-logging=stderr", "--log-level=0"]
    dom = subprocess.run(
        [*common, f"--user-data-dir={tmp_path / 'profile-dom'}", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []  # no script error, no blocked fetch (CSP), no empty figure
    assert 'data-figures-drawn="2"' in dom.stdout
    assert dom.stdout.count('<figure class="item"') == 2
    shot = subprocess.run(
        [
            *common,
            f"--user-data-dir={tmp_path / 'profile-shot'}",
            "--window-size=1000,2400",
            f"--screenshot={screenshot}",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert screenshot.stat().st_size > 10_000


def _wait_for_ping_samples(data_dir: Path, proc: subprocess.Popen[str], deadline: float = 240) -> None:
    """Until vmexit completed and ping stored at least one repetition."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        assert proc.poll() is None, proc.communicate()
        try:
            data = manifest(data_dir)
            stored = runs(data_dir)
        except (FileNotFoundError, json.JSONDecodeError, sqlite3.OperationalError):
            stored, data = [], {}
        if (
            data
            and item(data, "vmexit")["state"] == "completed"
            and any(w == "ping" and n > 0 for _, w, _, n in stored)
        ):
            return
        time.sleep(0.2)
    pytest.fail("the study did not reach ping in time")


@pytest.mark.parametrize("how", ["SIGINT", "SIGKILL"])
def test_interrupted_study_resumes_without_rerunning(how: str, tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [str(BIN / "cvmctl"), "study", *INTERRUPTIBLE, "--data-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_ping_samples(tmp_path, proc)
        proc.send_signal(getattr(signal, how))
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if how == "SIGINT":
        assert proc.returncode == 130
        assert "cvmctl study --resume c1" in err
    else:
        assert proc.returncode == -signal.SIGKILL
    before = runs(tmp_path)
    vmexit_run = item(manifest(tmp_path), "vmexit")["runs"]
    assert [r[1] for r in before] == ["vmexit", "ping"]
    partial_ping = before[1]
    assert partial_ping[3] > 0  # the repetitions ping finished are stored

    resumed = cvmctl("study", "--resume", "c1", data_dir=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "already completed, not run again: vmexit" in resumed.stderr
    after = runs(tmp_path)
    data = manifest(tmp_path)
    assert item(data, "vmexit")["runs"] == vmexit_run  # never rerun
    assert [(r[1], r[2]) for r in after] == [
        ("vmexit", "completed"),
        ("ping", "aborted"),
        ("ping", "completed"),
    ]
    assert after[1] == (partial_ping[0], "ping", "aborted", partial_ping[3])  # nothing stored lost
    assert item(data, "ping")["state"] == "completed"
    assert item(data, "ping")["runs"] == [after[1][0], after[2][0]]
    assert (tmp_path / "campaigns" / "c1" / "report.html").is_file()


def test_resume_refuses_options_that_change_the_campaign(tiny_study: Path) -> None:
    done = cvmctl("study", "--resume", "c1", "--items", "ping", data_dir=tiny_study)
    assert done.returncode == 2
    assert "cannot change a campaign" in done.stderr


def test_unrunnable_item_is_refused_up_front(tmp_path: Path) -> None:
    done = cvmctl("study", "--targets", "local,local", "--items", "boot", data_dir=tmp_path)
    assert done.returncode == 2
    assert "boot is measured by the host daemon" in done.stderr
    assert not (tmp_path / "campaigns").exists() or not list((tmp_path / "campaigns").iterdir())


def _stored_a_run(data_dir: Path) -> bool:
    try:
        return bool(runs(data_dir))
    except sqlite3.OperationalError:  # not created yet
        return False


def test_ctrl_c_in_bench_is_one_line_and_the_run_aborted(tmp_path: Path) -> None:
    """Ctrl-C inside trio's nursery arrives in an exception group: still exit 130, no traceback."""
    proc = subprocess.Popen(
        [
            str(BIN / "cvmctl"),
            "bench",
            "ping",
            "--target",
            "local",
            "--duration",
            "20",
            "--data-dir",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    end = time.monotonic() + 60
    while time.monotonic() < end and not _stored_a_run(tmp_path):
        time.sleep(0.2)
    time.sleep(1.0)  # inside the first repetition
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "cvmctl: interrupted" in err and "Traceback" not in err
    assert [(r[1], r[2]) for r in runs(tmp_path)] == [("ping", "aborted")]


def test_a_target_this_host_cannot_run_is_refused_with_the_host_checks_reasons(tmp_path: Path) -> None:
    from host_daemon.hostcheck import evaluate, gather_host_facts

    if evaluate(gather_host_facts(), "sev-snp").ready:
        pytest.skip("this host can run SEV-SNP guests")
    done = cvmctl("study", "--targets", "vm,sev-snp", data_dir=tmp_path)
    assert done.returncode == 5
    assert "this host cannot run a sev-snp guest" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "campaigns").exists()  # nothing planned, booted or stored

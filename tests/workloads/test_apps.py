"""The application items: ml-inference (PyTorch), blender, and npb (listed as unavailable)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

from cvmcore.errors import RemoteError, UsageError
from cvmctl.cli.main import main
from workloads import catalogue
from workloads.apps import BLENDER_MARK


def test_ml_inference_commands_run_the_measuring_module_per_model() -> None:
    workload = catalogue.get("ml-inference")
    params = workload.validate({"models": "alexnet,bert", "seconds": "3"})
    commands = workload.guest_commands(params)
    assert [c[:3] for c in commands] == [[sys.executable, "-m", "workloads.mlbench"]] * 2
    assert commands[0][3] == "--model=alexnet" and "--seconds=3" in commands[0]
    assert "--seq-len=128" in commands[1]
    with pytest.raises(UsageError, match="parameter models"):
        workload.validate({"models": "gpt"})


def test_ml_inference_scaled_splits_the_duration_over_the_models() -> None:
    workload = catalogue.get("ml-inference")
    assert workload.scaled(workload.validate({}), 5)["seconds"] == 2
    assert workload.scaled(workload.validate({"models": "bert"}), 5)["seconds"] == 5


def test_ml_inference_parse() -> None:
    workload = catalogue.get("ml-inference")
    params = workload.validate({"models": "bert"})
    line = {
        "model": "bert",
        "batches": 4,
        "batch": 8,
        "samples_per_s": 12.5,
        "latency_ms_median": 600.0,
        "latency_ms_p99": 700.0,
        "threads": 2,
        "torch": "2.13.0+cpu",
    }
    samples = workload.parse_guest([f"noise\n{json.dumps(line)}\n"], params)
    assert [(s.metric, s.value, s.unit, s.direction) for s in samples] == [
        ("bert_samples_per_s", 12.5, "samples/s", "higher"),
        ("bert_latency_median", 600.0, "ms", "lower"),
        ("bert_latency_p99", 700.0, "ms", "lower"),
    ]
    with pytest.raises(RemoteError, match="no result line"):
        workload.parse_guest(["Traceback ..."], params)


def test_missing_torch_is_refused_up_front_and_listed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a)
    )
    assert main(["bench", "ml-inference", "--target", "local", "--data-dir", str(tmp_path)]) == 2
    assert (
        "ml-inference needs PyTorch, which is not installed: pip install 'cvmctl[ml]'"
        in capsys.readouterr().err
    )
    assert main(["bench", "--list"]) == 0
    listing = capsys.readouterr().out
    block = listing[listing.index("ml-inference  (guest)") : listing.index("blender  (guest)")]
    assert "not on local: ml-inference needs PyTorch" in block
    assert "runs on: none of" in block


def test_blender_script_and_parse() -> None:
    workload = catalogue.get("blender")
    params = workload.validate({"frames": "2", "resolution": "64", "samples": "4"})
    (argv,) = workload.guest_commands(params)
    assert argv[:4] == ["blender", "--background", "--factory-startup", "-noaudio"]
    assert "FRAMES = 2\n" in argv[-1] and "RESOLUTION = 64\n" in argv[-1]
    output = "Blender 3.4.1\n" + BLENDER_MARK + json.dumps({"seconds": [1.0, 3.0], "version": "3.4.1"}) + "\n"
    (sample,) = workload.parse_guest([output], params)
    assert (sample.metric, sample.value, sample.unit, sample.direction) == (
        "seconds_per_frame",
        2.0,
        "s",
        "lower",
    )


def test_npb_says_it_is_unavailable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "npb", "--target", "local", "--data-dir", str(tmp_path)]) == 2
    assert (
        "npb needs the NAS Parallel Benchmarks, which no Debian package provides" in capsys.readouterr().err
    )
    assert main(["results", "ls", "--json", "--data-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == "[]"  # nothing stored, nothing faked


def test_list_shows_the_metrics_with_units(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    assert "metrics: per model (bert_, alexnet_): samples_per_s (samples/s" in out
    assert "metrics: seconds_per_frame (s, lower is better" in out


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="the ml extra is not installed")
def test_ml_inference_runs_locally(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "ml-inference", "--target", "local", "--repeat", "1", "--warmup", "0", "--json"]
    args += [
        "--param",
        "models=alexnet",
        "--param",
        "seconds=1",
        "--param",
        "image_size=64",
        "--param",
        "batch=2",
    ]
    assert main([*args, "--data-dir", str(tmp_path)]) == 0
    data = json.loads(capsys.readouterr().out)
    metrics = {s["metric"]: s for s in data["samples"]}
    assert metrics["alexnet_samples_per_s"]["value"] > 0
    assert metrics["alexnet_samples_per_s"]["metadata"]["torch"].startswith("2.")


@pytest.mark.skipif(shutil.which("blender") is None, reason="blender is not installed")
def test_blender_renders_locally(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "blender", "--target", "local", "--repeat", "1", "--warmup", "0", "--json"]
    args += ["--param", "frames=1", "--param", "resolution=32", "--param", "samples=1", "--param", "grid=1"]
    assert main([*args, "--data-dir", str(tmp_path)]) == 0
    data = json.loads(capsys.readouterr().out)
    (sample,) = data["samples"]
    assert sample["metric"] == "seconds_per_frame" and sample["value"] > 0

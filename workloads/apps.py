"""Application workloads of the study: AI/ML inference, 3D rendering and HPC.

``ml-inference``
    The study's AI/ML pair - BERT (TensorFlow) and AlexNet (PyTorch) inference on the CPU,
    the workload behind its idle-polling finding - as a BERT-style encoder and an
    AlexNet-style CNN in PyTorch, built from a config with seeded random weights (nothing
    downloaded at run time; :mod:`workloads.mlbench` measures, in a process of its own).
    One framework for both keeps the comparison about the VM, not about two runtimes;
    PyTorch because its CPU build is what this project's machines carry (the ``ml``
    extra: ``pip install 'cvmctl[ml]'``). Metrics per model: samples/s (higher is
    better) and the per-batch latency's median and 99th percentile (ms, lower).
``blender``
    Debian's ``blender`` renders a scene the workload generates (a grid of shaded spheres
    on a plane, a sun and a camera) with Cycles on the CPU, ``frames`` frames at
    ``resolution`` with ``samples`` samples per pixel; seconds per frame (lower). The
    script times each ``bpy.ops.render.render`` itself and prints one marked JSON line, so
    the parse does not depend on Blender's log format.
``npb``
    The NAS Parallel Benchmarks: no Debian package provides them (checked with
    ``apt-cache search`` for "NAS Parallel" and "npb" on Debian 12), and building Fortran
    sources at run time is not what a catalogue item does. The entry says so in ``bench
    --list`` and refuses to run; nothing is ever estimated in its place.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from cvmcore.errors import RemoteError, UsageError
from workloads.model import Param, Sample, Workload

ML_MODELS = ("bert", "alexnet")
ML_EXTRA = "pip install 'cvmctl[ml]' (PyTorch, CPU build)"
BLENDER_MARK = "CVMCTL-BLENDER "

# Run by blender --python-expr with the parameters prepended as Python assignments.
BLENDER_SCENE = """
import bpy, json, time
bpy.ops.wm.read_factory_settings(use_empty=True)
scene = bpy.context.scene
scene.render.engine = "CYCLES"
scene.cycles.device = "CPU"
scene.cycles.samples = SAMPLES
scene.cycles.use_denoising = False  # Debian builds Blender without OpenImageDenoise
scene.render.resolution_x = scene.render.resolution_y = RESOLUTION
scene.render.resolution_percentage = 100
bpy.ops.mesh.primitive_plane_add(size=40)
for i in range(GRID):
    for j in range(GRID):
        bpy.ops.mesh.primitive_uv_sphere_add(radius=0.8, location=(2 * i - GRID, 2 * j - GRID, 1))
        material = bpy.data.materials.new(f"m{i}{j}")
        material.diffuse_color = (i / GRID, j / GRID, 0.5, 1)
        bpy.context.object.data.materials.append(material)
bpy.ops.object.light_add(type="SUN", location=(0, 0, 10))
bpy.ops.object.camera_add(location=(0, -3 * GRID, 2 * GRID), rotation=(0.9, 0, 0))
scene.camera = bpy.context.object
times = []
for frame in range(1, FRAMES + 1):
    scene.frame_set(frame)
    start = time.perf_counter()
    bpy.ops.render.render(write_still=False)
    times.append(time.perf_counter() - start)
print("CVMCTL-BLENDER " + json.dumps({"seconds": times, "version": bpy.app.version_string}), flush=True)
"""


def torch_missing() -> str | None:
    if importlib.util.find_spec("torch") is None:
        return f"ml-inference needs PyTorch, which is not installed: {ML_EXTRA}"
    return None


class MlInference(Workload):
    """BERT-style and AlexNet-style inference on the CPU (see the module docstring)."""

    name = "ml-inference"
    summary = "AI/ML inference on the CPU: a BERT-style encoder and an AlexNet-style CNN (PyTorch)"
    params = (
        Param("models", "str", "bert,alexnet", "models to run, comma-separated: bert, alexnet"),
        Param("seconds", "int", 30, "timed inference per model and repetition", minimum=1, maximum=3600),
        Param("batch", "int", 8, "samples per forward pass", minimum=1, maximum=1024),
        Param("threads", "int", 0, "torch threads (0: one per CPU)", minimum=0, maximum=1024),
        Param("hidden", "int", 256, "bert: hidden size", minimum=16, maximum=4096),
        Param("layers", "int", 4, "bert: encoder layers", minimum=1, maximum=48),
        Param("seq_len", "int", 128, "bert: tokens per sample", minimum=8, maximum=4096),
        Param("image_size", "int", 224, "alexnet: image side in pixels", minimum=64, maximum=1024),
    )
    duration_param = "seconds"
    metrics_help = (
        "per model (bert_, alexnet_): samples_per_s (samples/s, higher is better), "
        "latency_median and latency_p99 per batch (ms, lower is better)"
    )

    def check(self, params: dict[str, Any]) -> None:
        models = [m.strip() for m in params["models"].split(",")]
        if not models or any(m not in ML_MODELS for m in models) or len(set(models)) != len(models):
            raise UsageError(
                f"parameter models: {params['models']!r} is not allowed (expected a comma-separated "
                f"list of {', '.join(ML_MODELS)})"
            )
        if params["hidden"] % 4:
            raise UsageError("parameter hidden: must be a multiple of 4 (the number of attention heads)")

    def missing_here(self) -> str | None:
        return torch_missing()

    def missing_tools(self, side: Literal["guest", "host"]) -> dict[str, str]:
        if side == "guest" and torch_missing():
            return {"torch (Python module)": "cvmctl[ml]"}
        return {}

    def require_tools(self, side: Literal["guest", "host"]) -> None:
        from workloads.model import MissingToolError

        reason = torch_missing() if side == "guest" else None
        if reason:
            raise MissingToolError(reason)

    def _models(self, params: Mapping[str, Any]) -> list[str]:
        return [m.strip() for m in params["models"].split(",")]

    def scaled(self, params: dict[str, Any], duration_seconds: float) -> dict[str, Any]:
        per_model = duration_seconds / len(self._models(params))
        return {**params, "seconds": max(1, round(per_model))}

    def timeout(self, params: Mapping[str, Any]) -> float:
        # importing torch and building the model can take a minute on a loaded small VM
        return float(params["seconds"]) * 2 + 180.0

    def guest_commands(self, params: Mapping[str, Any]) -> list[list[str]]:
        self.require_tools("guest")
        common = [
            f"--seconds={params['seconds']}",
            f"--batch={params['batch']}",
            f"--threads={params['threads']}",
        ]
        model_args = {
            "bert": [
                f"--hidden={params['hidden']}",
                f"--layers={params['layers']}",
                f"--seq-len={params['seq_len']}",
            ],
            "alexnet": [f"--image-size={params['image_size']}"],
        }
        return [
            [sys.executable, "-m", "workloads.mlbench", f"--model={model}", *common, *model_args[model]]
            for model in self._models(params)
        ]

    def parse_guest(self, outputs: list[str], params: Mapping[str, Any]) -> list[Sample]:
        samples = []
        for model, output in zip(self._models(params), outputs, strict=True):
            result = _last_json(output, "", f"ml-inference {model}")
            meta = {
                "model": model,
                "batch": str(result["batch"]),
                "batches": str(result["batches"]),
                "threads": str(result["threads"]),
                "torch": str(result["torch"]),
            }
            samples += [
                Sample(f"{model}_samples_per_s", float(result["samples_per_s"]), "samples/s", "higher", meta),
                Sample(f"{model}_latency_median", float(result["latency_ms_median"]), "ms", "lower", meta),
                Sample(f"{model}_latency_p99", float(result["latency_ms_p99"]), "ms", "lower", meta),
            ]
        return samples


class Blender(Workload):
    """Cycles rendering of a generated scene with Debian's blender; seconds per frame."""

    name = "blender"
    summary = "3D rendering: Debian's blender renders a generated scene with Cycles on the CPU (s/frame)"
    params = (
        Param("frames", "int", 3, "frames rendered per repetition", minimum=1, maximum=10000),
        Param("resolution", "int", 320, "image side in pixels", minimum=16, maximum=8192),
        Param("samples", "int", 32, "Cycles samples per pixel", minimum=1, maximum=100000),
        Param("grid", "int", 4, "spheres per side of the scene's grid", minimum=1, maximum=50),
    )
    guest_tools: ClassVar[dict[str, str]] = {"blender": "blender"}
    metrics_help = "seconds_per_frame (s, lower is better; the mean over the frames rendered)"

    def scaled(self, params: dict[str, Any], duration_seconds: float) -> dict[str, Any]:
        # Frame cost is unknown before the first one; fewer, smaller frames for short runs.
        frames = max(1, min(params["frames"], round(duration_seconds / 2)))
        return {**params, "frames": frames, "resolution": min(params["resolution"], 160), "samples": 8}

    def timeout(self, params: Mapping[str, Any]) -> float:
        pixels = params["resolution"] ** 2 * params["samples"] * params["frames"]
        return 120.0 + float(pixels) * 2e-5

    def guest_commands(self, params: Mapping[str, Any]) -> list[list[str]]:
        prefix = "".join(
            f"{name} = {int(params[key])}\n"
            for name, key in (
                ("SAMPLES", "samples"),
                ("RESOLUTION", "resolution"),
                ("GRID", "grid"),
                ("FRAMES", "frames"),
            )
        )
        return [
            [
                "blender",
                "--background",
                "--factory-startup",
                "-noaudio",
                "--python-expr",
                prefix + BLENDER_SCENE,
            ]
        ]

    def parse_guest(self, outputs: list[str], params: Mapping[str, Any]) -> list[Sample]:
        result = _last_json(outputs[0], BLENDER_MARK, "blender")
        seconds = [float(s) for s in result["seconds"]]
        meta = {"frames": str(len(seconds)), "blender": str(result.get("version", "?"))}
        mean = sum(seconds) / len(seconds)
        return [Sample("seconds_per_frame", mean, "s", "lower", meta)]


class Npb(Workload):
    """The NAS Parallel Benchmarks: not packaged, so never run (see the module docstring)."""

    name = "npb"
    summary = "HPC: NAS Parallel Benchmarks - not available (no Debian package provides them)"
    params = ()

    def missing_here(self) -> str | None:
        return (
            "npb needs the NAS Parallel Benchmarks, which no Debian package provides (apt-cache "
            "search finds none): cvmctl does not run them and reports nothing in their place"
        )

    def guest_commands(self, params: Mapping[str, Any]) -> list[list[str]]:
        raise UsageError(self.missing_here() or "npb is not available")


def _last_json(output: str, mark: str, what: str) -> dict[str, Any]:
    """The last line of ``output`` that starts with ``mark`` and holds a JSON object."""
    for line in reversed(output.splitlines()):
        if line.startswith(mark):
            try:
                value = json.loads(line[len(mark) :])
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    raise RemoteError(f"{what}: no result line in its output (last line: {output.strip()[-200:]!r})")

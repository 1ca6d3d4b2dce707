"""The study's figures from stored runs: relative performance, boot phases, VMEXIT latency.

Data first, drawing second: :func:`relative_bars`, :func:`boot_stacks` and
:func:`vmexit_bars` are pure functions from stored samples to what is drawn (tested
without matplotlib); :func:`draw_all` draws them with matplotlib's Agg backend (no
display) to ``NAME.png`` and ``NAME.svg``.

Relative performance ("B relative to A", 1.0 = the same, below 1.0 = B does worse, for
every metric whatever its direction; lower-is-better metrics are inverted so that the
bars read the same way as the study's):

- a ``--compare`` run: the paired ratio per metric with its 95% CI
  (:func:`workloads.stats.paired_overhead`);
- several runs of one workload: each later run against the first, ratio of means; the CI
  of an unpaired ratio is approximated by adding the relative half-widths of the two
  means' CIs (first-order error propagation; conservative next to the paired case);
- one plain run: nothing is relative to anything, so no relative bars; the ``absolute``
  figure shows each metric's median with the 95% CI of its mean, in its own unit
  (:func:`absolute_bars`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from workloads.stats import paired_overhead
from workloads.store import Run, StoredSample, summaries_of

FIGURE_KINDS = ("relative", "absolute", "boot", "vmexit")


@dataclass(frozen=True)
class Bar:
    group: str  # the series (a run or a comparison)
    label: str  # the metric
    value: float
    low: float | None
    high: float | None


def _invert(value: float, direction: str) -> float:
    return value if direction == "higher" else 1.0 / value


def _ci_relative_half(summary_low: float | None, summary_high: float | None, mean: float) -> float | None:
    if summary_low is None or summary_high is None or mean == 0:
        return None
    return (summary_high - summary_low) / 2 / abs(mean)


def relative_bars(runs: Sequence[tuple[Run, list[StoredSample]]]) -> list[Bar]:
    """Relative performance bars (see the module docstring); external and vmexit runs skipped."""
    candidates = [(run, stored) for run, stored in runs if run.workload not in ("boot", "vmexit")]
    bars: list[Bar] = []
    plain = []
    for run, stored in candidates:
        if any(s.arm for s in stored):
            bars += _paired_bars(run, stored)
        else:
            plain.append((run, stored))
    if len(plain) > 1:
        base_run, base_stored = plain[0]
        base = summaries_of(base_stored)
        for run, stored in plain[1:]:
            for key, (sample, s) in summaries_of(stored).items():
                if key not in base or base[key][1].mean <= 0 or s.mean <= 0:
                    continue
                b = base[key][1]
                ratio = _invert(s.mean / b.mean, sample.direction)
                h1 = _ci_relative_half(b.ci95_low, b.ci95_high, b.mean)
                h2 = _ci_relative_half(s.ci95_low, s.ci95_high, s.mean)
                half = None if h1 is None or h2 is None else ratio * (h1 + h2)
                low, high = (None, None) if half is None else (ratio - half, ratio + half)
                bars.append(Bar(f"run {run.id} vs {base_run.id}", key[1], ratio, low, high))
    return bars


def absolute_bars(runs: Sequence[tuple[Run, list[StoredSample]]]) -> list[tuple[Bar, str]]:
    """(bar, unit) per metric of a single plain run: median, 95% CI of the mean; else []."""
    plain = [(run, stored) for run, stored in runs if not any(s.arm for s in stored)]
    if len(runs) != 1 or len(plain) != 1:
        return []
    run, stored = plain[0]
    return [
        (Bar(f"run {run.id}", metric, s.median, s.ci95_low, s.ci95_high), sample.unit)
        for (_, metric), (sample, s) in summaries_of(stored).items()
    ]


def _paired_bars(run: Run, stored: list[StoredSample]) -> list[Bar]:
    values: dict[tuple[str, str], dict[int, float]] = {}
    direction: dict[str, str] = {}
    for s in stored:
        if not s.warmup and s.arm in ("A", "B"):
            values.setdefault((s.arm, s.sample.metric), {})[s.repetition] = s.sample.value
            direction[s.sample.metric] = s.sample.direction
    bars = []
    for metric, d in direction.items():
        a, b = values.get(("A", metric), {}), values.get(("B", metric), {})
        reps = [r for r in sorted(set(a) & set(b)) if a[r] > 0 and b[r] > 0]
        if not reps:
            continue
        o = paired_overhead(
            [a[r] for r in reps], [b[r] for r in reps], "higher" if d == "higher" else "lower"
        )
        ends = (
            None
            if o.ci95_low is None or o.ci95_high is None
            else sorted((_invert(o.ci95_low, d), _invert(o.ci95_high, d)))
        )
        bars.append(
            Bar(
                f"run {run.id}: B/A",
                metric,
                _invert(o.ratio, d),
                ends[0] if ends else None,
                ends[1] if ends else None,
            )
        )
    return bars


def boot_stacks(runs: Sequence[tuple[Run, list[StoredSample]]]) -> dict[str, dict[str, float]]:
    """{run label: {phase: seconds}} for ``boot`` runs, per arm of a comparison, phases in recorded order.

    As the study: of the repetitions, the one with the median total boot time stands for
    the run (the lower middle one of an even count), so the phases shown add up to a boot
    that happened rather than to a mix of medians.
    """
    stacks = {}
    for run, stored in runs:
        if run.workload != "boot":
            continue
        by_arm: dict[str, dict[int, dict[str, float]]] = {}
        for s in stored:
            if not s.warmup:
                by_arm.setdefault(s.arm, {}).setdefault(s.repetition, {})[s.sample.metric] = s.sample.value
        arms = run.metadata.get("arms") or {}
        for arm, by_rep in by_arm.items():
            totals = sorted(
                (phases.get("total", sum(v for k, v in phases.items() if k != "total")), rep)
                for rep, phases in by_rep.items()
            )
            _, chosen = totals[(len(totals) - 1) // 2]
            target = arms.get(arm, run.target) if arm else run.target
            label = f"run {run.id}" + (f" {arm}" if arm else "") + f" ({target})"
            stacks[label] = {k: v for k, v in by_rep[chosen].items() if k != "total"}
    return stacks


def vmexit_bars(runs: Sequence[tuple[Run, list[StoredSample]]]) -> list[Bar]:
    """Mean ns per exit with its CI, per instruction (``*_ns`` metrics) of ``vmexit`` runs."""
    bars = []
    for run, stored in runs:
        if run.workload != "vmexit":
            continue
        for (arm, metric), (_, s) in summaries_of(stored).items():
            if metric.endswith("_ns"):
                group = f"run {run.id}" + (f" {arm}" if arm else "") + f" ({run.target})"
                bars.append(Bar(group, metric.removesuffix("_ns"), s.mean, s.ci95_low, s.ci95_high))
    return bars


# -- drawing ------------------------------------------------------------------------------


def draw_all(runs: Sequence[tuple[Run, list[StoredSample]]], out_dir: Path) -> list[Path]:
    """Draw every figure the runs have data for; the files written (PNG and SVG each)."""
    import matplotlib

    matplotlib.use("Agg")
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    relative = relative_bars(runs)
    if relative:
        ylabel = "relative performance (1.0 = same; < 1 worse)"
        title = "relative performance with 95% CI"
        written += _grouped_bars(relative, title, ylabel, "relative", out_dir, reference=1.0)
    absolute = absolute_bars(runs) if runs and runs[0][0].workload not in ("boot", "vmexit") else []
    if absolute:
        written += _absolute(absolute, out_dir)
    stacks = boot_stacks(runs)
    if stacks:
        written += _stacked(stacks, out_dir)
    vmexit = vmexit_bars(runs)
    if vmexit:
        title = "VMEXIT latency (user-space cpuid; pread for port I/O and MSRs)"
        written += _grouped_bars(
            vmexit, title, "ns per exit (mean, 95% CI)", "vmexit", out_dir, reference=None
        )
    return written


def _save(figure: object, name: str, out_dir: Path) -> list[Path]:
    from matplotlib.figure import Figure

    assert isinstance(figure, Figure)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.svg"]
    figure.tight_layout()
    for path in paths:
        figure.savefig(path, dpi=150 if path.suffix == ".png" else None)
    return paths


def _grouped_bars(
    bars: list[Bar], title: str, ylabel: str, name: str, out_dir: Path, reference: float | None
) -> list[Path]:
    from matplotlib.figure import Figure

    labels = list(dict.fromkeys(b.label for b in bars))
    groups = list(dict.fromkeys(b.group for b in bars))
    figure = Figure(figsize=(max(6.0, 0.6 * len(labels) * len(groups) + 2), 4.5))
    axes = figure.add_subplot()
    width = 0.8 / len(groups)
    for g_index, group in enumerate(groups):
        xs, ys, lower, upper = [], [], [], []
        for bar in (b for b in bars if b.group == group):
            xs.append(labels.index(bar.label) + (g_index - (len(groups) - 1) / 2) * width)
            ys.append(bar.value)
            # error bars stop at 0: a negative time or ratio is an artefact of a wide interval
            lower.append(0.0 if bar.low is None else max(0.0, bar.value - max(0.0, bar.low)))
            upper.append(0.0 if bar.high is None else max(0.0, bar.high - bar.value))
        axes.bar(xs, ys, width=width, yerr=[lower, upper], capsize=3, label=group)
    if reference is not None:
        axes.axhline(reference, color="black", linewidth=0.8)
    axes.set_ylim(bottom=0)
    axes.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.legend(fontsize="small")
    return _save(figure, name, out_dir)


def _absolute(bars: list[tuple[Bar, str]], out_dir: Path) -> list[Path]:
    """One row per metric, each on its own axis (the units differ)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.0, 0.9 + 0.55 * len(bars)))
    axes_list = figure.subplots(len(bars), 1, squeeze=False)[:, 0]
    for axes, (bar, unit) in zip(axes_list, bars, strict=True):
        low = None if bar.low is None else max(0.0, bar.value - max(0.0, bar.low))
        high = None if bar.high is None else max(0.0, bar.high - bar.value)
        xerr = None if low is None or high is None else [[low], [high]]
        axes.barh([0], [bar.value], xerr=xerr, capsize=3)
        axes.set_yticks([0], [bar.label])
        axes.set_xlim(left=0)
        axes.text(
            1.01, 0.5, f"{bar.value:.4g} {unit}", transform=axes.transAxes, va="center", fontsize="small"
        )
    axes_list[0].set_title(f"{bars[0][0].group}: median and 95% CI of the mean, per metric")
    return _save(figure, "absolute", out_dir)


def _stacked(stacks: dict[str, dict[str, float]], out_dir: Path) -> list[Path]:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.0, 1.2 + 0.6 * len(stacks)))
    axes = figure.add_subplot()
    phases = list(dict.fromkeys(p for stack in stacks.values() for p in stack))
    labels = list(stacks)
    left = [0.0] * len(labels)
    for phase in phases:
        widths = [stacks[label].get(phase, 0.0) for label in labels]
        axes.barh(labels, widths, left=left, label=phase)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    axes.set_xlabel("seconds (the repetition with the median total)")
    axes.set_title("boot phases")
    axes.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _save(figure, "boot", out_dir)

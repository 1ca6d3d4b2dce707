"""One self-contained HTML page for a campaign (or a few runs): figures, tables, environment.

``cvmctl report c3 --html -o DIR`` and the end of ``cvmctl study`` write ``DIR/report.html``:
one file, every figure an inline ``<svg>`` drawn here (no matplotlib, no script or font from
anywhere), a Content-Security-Policy that forbids every fetch, so it opens from disk, mails
as one attachment and renders the same offline.

What the page holds, top to bottom:

1. the campaign: targets (A and B), profile, when, and one row per item (state, run, time,
   attestation verdict);
2. per item, one ``<figure class="item">`` with the study's figure for it:

   - ``boot``: the boot phases stacked, per arm (the repetition with the median total);
   - ``vmexit``: ns per exit per instruction, per arm (mean with 95% CI);
   - every other item with two arms: relative performance B/A per metric with the paired
     95% CI (1.0 = the same, below 1 = B worse, whatever the metric's direction) - which is
     per datagram size for iperf-udp, per job for fio and per method for memory, those
     being the metrics' cases;
   - a single arm: the absolute values (median, 95% CI of the mean, unit) per metric, each
     on its own scale, never relative bars against itself;

   then the table of medians and CIs per arm and metric, and the paired overheads;
3. what was unavailable: items the targets cannot run here, metrics a run could not take;
4. the environment of each arm: kernel, command line, CPU and microcode, firmware, the
   QEMU argv, tool versions, cvmctl's version and commit;
5. each run's attestation verdict (:func:`cvmctl.attested.verify_run`).

Everything is computed by pure functions from stored runs (:mod:`workloads.figures`,
:mod:`workloads.stats`); this module only lays it out.
"""

from __future__ import annotations

import datetime
import html
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cvmcore.durable import write_durably
from cvmctl.cli.runview import overhead_rows
from workloads.campaign import Campaign, format_seconds
from workloads.figures import Bar, boot_stacks, relative_bars, vmexit_bars
from workloads.store import Run, Store, StoredSample, paired_overheads, summaries_of

REPORT_NAME = "report.html"
PALETTE = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")
WIDTH = 820.0
ROW = 22.0
LEFT = 210.0  # room for metric names
RIGHT = 200.0  # room for the value labels

CSS = """
body{font-family:sans-serif;margin:2em auto;max-width:60em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0;font-size:.85em}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:1em 0}figcaption{font-size:.85em;color:#555}
.verified{color:#1a7f37}.rejected{color:#b42318;font-weight:bold}.not-attested{color:#666}
pre{white-space:pre-wrap;font-size:.75em;background:#f6f6f6;padding:.5em}
"""

# Checks that every figure drew something; complaints go to the console, where the
# headless-browser test looks for them.
SCRIPT = """
document.addEventListener("DOMContentLoaded", function () {
  var ok = 0;
  document.querySelectorAll("figure.item svg").forEach(function (svg) {
    var box = svg.getBBox();
    if (box.width > 0 && box.height > 0) { ok += 1; }
    else { console.error("empty figure: " + svg.closest("figure").dataset.item); }
  });
  document.body.dataset.figuresDrawn = String(ok);
});
"""
CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"


@dataclass(frozen=True)
class RunData:
    run: Run
    stored: list[StoredSample]
    verdict: str  # verified | rejected | not attested | a reason it was not checked
    verdict_detail: str


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    magnitude = abs(value)
    if magnitude != 0 and (magnitude >= 1e6 or magnitude < 1e-3):
        return f"{value:.3e}"
    return f"{value:.4g}"


# -- SVG ------------------------------------------------------------------------------------


def _svg_title(title: str) -> str:
    head = f'<text x="{WIDTH / 2}" y="16" text-anchor="middle" font-size="13" font-weight="bold">'
    return f"{head}{_e(title)}</text>"


@dataclass(frozen=True)
class HBar:
    label: str
    group: str
    value: float
    low: float | None
    high: float | None
    text: str
    scale: float | None = None  # this row's own axis maximum (absolute values); None: shared


def hbar_svg(rows: Sequence[HBar], *, title: str, axis: str, reference: float | None = None) -> str:
    """Horizontal bars with CI whiskers; rows of one label are grouped, groups coloured."""
    groups = list(dict.fromkeys(r.group for r in rows))
    colour = {g: PALETTE[i % len(PALETTE)] for i, g in enumerate(groups)}
    shared = max([r.high or r.value for r in rows if r.scale is None] + [reference or 0.0, 1e-12])
    if reference is not None:
        # Ratios: an interval from 3 noisy pairs can reach 100; the axis follows the values
        # (whiskers stop at its edge, the numbers beside each bar say where they end).
        values = [r.value for r in rows if r.scale is None]
        shared = min(shared, max([2 * reference, *(1.25 * v for v in values)]))
    plot = WIDTH - LEFT - RIGHT
    legend = ROW if len(groups) > 1 else 0
    top = 26 + legend
    height = top + ROW * len(rows) + 34
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" role="img" aria-label="{_e(title)}">',
        _svg_title(title),
    ]
    for i, group in enumerate(groups if legend else []):
        x = LEFT + i * 170
        out.append(f'<rect x="{x}" y="24" width="10" height="10" fill="{colour[group]}"/>')
        out.append(f'<text x="{x + 14}" y="33" font-size="11">{_e(group)}</text>')
    last_label = None
    for i, r in enumerate(rows):
        y = top + i * ROW
        maximum = (r.scale or shared) * 1.05

        def px(v: float, m: float = maximum) -> float:
            return LEFT + max(0.0, min(v, m)) / m * plot

        if r.label != last_label:
            out.append(
                f'<text x="{LEFT - 6}" y="{y + 15}" text-anchor="end" font-size="11">{_e(r.label)}</text>'
            )
            last_label = r.label
        out.append(
            f'<rect x="{LEFT}" y="{y + 4}" width="{px(r.value) - LEFT:.1f}" height="{ROW - 8}" '
            f'fill="{colour[r.group]}"><title>{_e(r.label)} {_e(r.group)}: {_e(r.text)}</title></rect>'
        )
        if r.low is not None and r.high is not None:
            lo, hi, mid = px(r.low), px(r.high), y + ROW / 2
            whisker = f"M{lo:.1f} {mid}H{hi:.1f}M{lo:.1f} {mid - 4}V{mid + 4}M{hi:.1f} {mid - 4}V{mid + 4}"
            out.append(f'<path d="{whisker}" stroke="#000" stroke-width="1" fill="none"/>')
        out.append(f'<text x="{LEFT + plot + 6}" y="{y + 15}" font-size="11">{_e(r.text)}</text>')
    bottom = top + ROW * len(rows)
    out.append(f'<path d="M{LEFT} {top}V{bottom}H{LEFT + plot}" stroke="#444" fill="none"/>')
    if any(r.scale is None for r in rows):
        maximum = shared * 1.05
        for k in range(5):
            value = maximum * k / 4
            x = LEFT + value / maximum * plot
            tick = f'<text x="{x:.1f}" y="{bottom + 14}" text-anchor="middle" font-size="10">'
            out.append(f"{tick}{_fmt(value)}</text>")
    if reference is not None:
        x = LEFT + reference / (shared * 1.05) * plot
        out.append(f'<path d="M{x:.1f} {top}V{bottom}" stroke="#000" stroke-dasharray="4 3"/>')
    out.append(
        f'<text x="{LEFT + plot / 2}" y="{bottom + 30}" text-anchor="middle" font-size="11">{_e(axis)}</text>'
    )
    out.append("</svg>")
    return "".join(out)


def stacked_svg(stacks: dict[str, dict[str, float]], *, title: str, axis: str) -> str:
    """One horizontal stacked bar per label, one colour per phase (in first-seen order)."""
    phases = list(dict.fromkeys(p for stack in stacks.values() for p in stack))
    colour = {p: PALETTE[i % len(PALETTE)] for i, p in enumerate(phases)}
    total = max([sum(s.values()) for s in stacks.values()] + [1e-12]) * 1.05
    plot = WIDTH - LEFT - RIGHT
    legend_rows = (len(phases) + 3) // 4
    top = 26 + ROW * legend_rows
    height = top + ROW * len(stacks) + 34
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" role="img" aria-label="{_e(title)}">',
        _svg_title(title),
    ]
    for i, phase in enumerate(phases):
        x, y = LEFT + (i % 4) * 130, 24 + (i // 4) * ROW
        out.append(f'<rect x="{x}" y="{y}" width="10" height="10" fill="{colour[phase]}"/>')
        out.append(f'<text x="{x + 14}" y="{y + 9}" font-size="11">{_e(phase)}</text>')
    for i, (label, stack) in enumerate(stacks.items()):
        y = top + i * ROW
        out.append(f'<text x="{LEFT - 6}" y="{y + 15}" text-anchor="end" font-size="11">{_e(label)}</text>')
        x = float(LEFT)
        for phase, seconds in stack.items():
            w = seconds / total * plot
            out.append(
                f'<rect x="{x:.1f}" y="{y + 4}" width="{w:.1f}" height="{ROW - 8}" fill="{colour[phase]}">'
                f"<title>{_e(phase)}: {_fmt(seconds)} s</title></rect>"
            )
            x += w
        out.append(f'<text x="{x + 6:.1f}" y="{y + 15}" font-size="11">{_fmt(sum(stack.values()))} s</text>')
    bottom = top + ROW * len(stacks)
    out.append(f'<path d="M{LEFT} {top}V{bottom}H{LEFT + plot}" stroke="#444" fill="none"/>')
    out.append(
        f'<text x="{LEFT + plot / 2}" y="{bottom + 30}" text-anchor="middle" font-size="11">{_e(axis)}</text>'
    )
    out.append("</svg>")
    return "".join(out)


# -- the figure of one item ------------------------------------------------------------------


def item_figure(data: RunData) -> tuple[str, str]:
    """(SVG, caption) of the study's figure for one stored run."""
    run, stored = data.run, data.stored
    arms = run.metadata.get("arms") or {}
    paired = any(s.arm for s in stored)
    if run.workload == "boot":
        stacks = boot_stacks([(run, stored)])
        return (
            stacked_svg(stacks, title="boot phases", axis="seconds (the repetition with the median total)"),
            "Boot phases stacked per arm, from the host daemon's boot timeline.",
        )
    if run.workload == "vmexit":
        rows = [
            _bar_row(b, _arm_name(arm, arms, run.target), "ns")
            for (arm, _), b in vmexit_bars_by_arm(run, stored)
        ]
        return (
            hbar_svg(rows, title="VMEXIT latency per instruction", axis="ns per exit (mean, 95% CI)"),
            "Mean nanoseconds per exit per instruction, per arm, with the 95% CI.",
        )
    if paired:
        bars = relative_bars([(run, stored)])
        rows = [
            HBar(
                b.label,
                f"{arms.get('B', 'B')} / {arms.get('A', 'A')}",
                b.value,
                b.low,
                b.high,
                f"{b.value:.3f}" + ("" if b.low is None else f" [{b.low:.3f}, {b.high:.3f}]"),
            )
            for b in bars
        ]
        return (
            hbar_svg(
                rows,
                title=f"{run.workload}: relative performance of B",
                axis="relative performance B/A (1.0 = the same, < 1 = B worse), paired 95% CI",
                reference=1.0,
            ),
            "Relative performance per metric (lower-is-better metrics inverted), paired A B A B runs,"
            " geometric-mean ratio with its 95% confidence interval.",
        )
    rows = []
    for (_, metric), (sample, s) in summaries_of(stored).items():
        ci = "" if s.ci95_low is None or s.ci95_high is None else f" ± {_fmt((s.ci95_high - s.ci95_low) / 2)}"
        rows.append(
            HBar(
                metric,
                run.target,
                s.median,
                s.ci95_low,
                s.ci95_high,
                f"{_fmt(s.median)}{ci} {sample.unit}",
                scale=max(s.max, s.ci95_high or 0.0, 1e-12),
            )
        )
    return (
        hbar_svg(
            rows,
            title=f"{run.workload} on {run.target}",
            axis="absolute values, each metric on its own scale",
        ),
        "A single arm: the median of each metric (bar) and the 95% CI of the mean (whisker), with its unit.",
    )


def vmexit_bars_by_arm(run: Run, stored: list[StoredSample]) -> list[tuple[tuple[str, str], Bar]]:
    """:func:`workloads.figures.vmexit_bars` of each arm, keyed by (arm, instruction)."""
    out = []
    for arm in dict.fromkeys(s.arm for s in stored):
        for bar in vmexit_bars([(run, [s for s in stored if s.arm == arm])]):
            out.append(((arm, bar.label), bar))
    return out


def _arm_name(arm: str, arms: dict[str, str], target: str) -> str:
    """``A (vm)`` for an arm of a comparison, the target for a plain run."""
    return f"{arm} ({arms.get(arm, '?')})" if arm else target


def _bar_row(bar: Bar, group: str, unit: str) -> HBar:
    text = f"{_fmt(bar.value)} {unit}"
    if bar.low is not None and bar.high is not None:
        text += f" ± {_fmt((bar.high - bar.low) / 2)}"
    return HBar(bar.label, group, bar.value, bar.low, bar.high, text)


# -- tables -------------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[int] = ()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="n">{_e(c)}</td>' if i in numeric else f"<td>{_e(c)}</td>" for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def summary_table(data: RunData) -> str:
    arms = data.run.metadata.get("arms") or {}
    rows = []
    for (arm, metric), (sample, s) in summaries_of(data.stored).items():
        ci = "-" if s.ci95_low is None else f"{_fmt(s.ci95_low)} .. {_fmt(s.ci95_high)}"
        rows.append(
            [
                _arm_name(arm, arms, data.run.target),
                metric,
                sample.unit,
                "higher" if sample.direction == "higher" else "lower",
                str(s.n),
                _fmt(s.median),
                _fmt(s.mean),
                ci,
            ]
        )
    out = _table(
        ["arm", "metric", "unit", "better", "n", "median", "mean", "95% CI of the mean"],
        rows,
        numeric=(4, 5, 6),
    )
    overheads = paired_overheads(data.stored)
    if overheads:
        out += _table(
            ["metric", "B/A", "overhead of B", "95% CI (B/A)", "verdict"],
            overhead_rows(overheads, " .. "),
            numeric=(1, 2),
        )
    return out


ENV_HOST_KEYS = (
    "kernel",
    "cmdline",
    "cpu_model",
    "cpu_microcode",
    "cpus",
    "cpuidle_driver",
    "tee",
    "loadavg",
)
ENV_TARGET_KEYS = (
    "kind",
    "name",
    "target",
    "baseline_for",
    "accel",
    "tee",
    "kernel",
    "cmdline",
    "network",
    "agent_version",
)


def firmware_of(argv: Sequence[str]) -> str:
    """The firmware a QEMU argv boots: -bios FILE, a pflash drive's file, else QEMU's own."""
    for i, arg in enumerate(argv):
        if arg == "-bios" and i + 1 < len(argv):
            return argv[i + 1]
        if "if=pflash" in arg:
            for part in arg.split(","):
                if part.startswith("file="):
                    return part.removeprefix("file=")
    return "QEMU's default (SeaBIOS)"


def environment(runs: Sequence[RunData]) -> str:
    """Per arm: the host facts, the target's description (QEMU argv, firmware) and tools."""
    if not runs:
        return "<p>No completed run.</p>"
    meta = runs[-1].run.metadata
    host = meta.get("host") or {}
    parts = ["<h3>host (where cvmctl ran)</h3>"]
    parts.append(_table(["fact", "value"], [[k, str(host[k])] for k in ENV_HOST_KEYS if k in host]))
    tools: dict[str, str] = {}
    for data in runs:
        tools.update(data.run.metadata.get("tools") or {})
        tools.update(data.run.metadata.get("platform_tools") or {})
    versions = [["cvmctl", f"{meta.get('cvmctl_version', '?')} {meta.get('cvmctl_commit', '')}".strip()]]
    parts.append(_table(["tool", "version"], versions + sorted([k, v] for k, v in tools.items())))
    arms = meta.get("arms") or {"": runs[-1].run.target}
    targets = meta.get("targets") or {}
    for arm, name in arms.items():
        described = targets.get(arm) or {}
        parts.append(f"<h3>arm {_e(arm or '-')}: {_e(name)}</h3>")
        rows = [
            [k, json.dumps(described[k]) if not isinstance(described[k], str) else described[k]]
            for k in ENV_TARGET_KEYS
            if k in described
        ]
        guest = described.get("guest") or described.get("agent") or {}
        if isinstance(guest, dict):
            rows += [[f"guest {k}", str(v)] for k, v in guest.items() if not isinstance(v, dict | list)]
        argv = described.get("qemu_argv")
        if argv:
            rows.append(["firmware", firmware_of([str(a) for a in argv])])
        parts.append(_table(["fact", "value"], rows) if rows else "<p>(no description recorded)</p>")
        if argv:
            parts.append(f"<pre>{_e(' '.join(str(a) for a in argv))}</pre>")
        elif described.get("kind") == "local":
            parts.append("<p>No VM: the guest side ran on this machine.</p>")
    return "".join(parts)


def unavailable(campaign: Campaign | None, runs: Sequence[RunData]) -> str:
    rows = []
    if campaign is not None:
        rows += [[i.name, "(whole item)", i.reason or ""] for i in campaign.items if i.state == "unavailable"]
        rows += [
            [i.name, "(whole item, failed)", i.reason or ""] for i in campaign.items if i.state == "failed"
        ]
    for data in runs:
        for arm, notes in (data.run.metadata.get("unavailable") or {}).items():
            for note in notes:
                rows.append(
                    [data.run.workload, f"{note['metric']}{' (' + arm + ')' if arm else ''}", note["reason"]]
                )
    if not rows:
        return "<p>Everything planned was measured.</p>"
    return _table(["item", "metric", "why"], rows)


# -- the page -------------------------------------------------------------------------------


def render(
    title: str,
    intro: list[tuple[str, str]],
    items_table: str,
    runs: Sequence[RunData],
    campaign: Campaign | None,
) -> str:
    sections = []
    for data in runs:
        svg, caption = item_figure(data)
        run = data.run
        verdict_class = data.verdict.replace(" ", "-")
        sections.append(
            f'<section id="item-{_e(run.workload)}"><h2>{_e(run.workload)} '
            f"<small>(run {run.id}, {_e(run.target)})</small></h2>"
            f'<figure class="item" data-item="{_e(run.workload)}">{svg}'
            f"<figcaption>{_e(caption)}</figcaption></figure>"
            f'<p>attestation: <span class="{_e(verdict_class)}">{_e(data.verdict)}</span> '
            f"<small>{_e(data.verdict_detail)}</small></p>"
            f"{summary_table(data)}</section>"
        )
    head = _table(["", ""], intro)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f"<title>{_e(title)}</title><style>{CSS}</style><script>{SCRIPT}</script></head><body>"
        f"<h1>{_e(title)}</h1>{head}{items_table}"
        + "".join(sections)
        + f"<h2>What was unavailable</h2>{unavailable(campaign, runs)}"
        + f"<h2>Environment</h2>{environment(runs)}"
        + "<p><small>Written by cvmctl; self-contained (no network).</small></p></body></html>\n"
    )


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def load_runs(store: Store, run_ids: Sequence[int]) -> list[RunData]:
    """The runs with their samples and attestation verdicts (verified now)."""
    out = []
    for run_id in run_ids:
        run = store.run(run_id)
        verdict, detail = run_verdict(store, run_id)
        out.append(RunData(run, store.samples(run_id), verdict, detail))
    return out


def run_verdict(store: Store, run_id: int) -> tuple[str, str]:
    try:
        from cvmctl.attested import verify_run
    except ModuleNotFoundError:  # pragma: no cover - the verify extra
        return "not checked", "verifying needs the verify extra: pip install 'cvmctl[verify]'"
    try:
        result = verify_run(store, run_id, at=datetime.datetime.now(datetime.UTC))
    except ModuleNotFoundError as exc:
        return "not checked", f"verifying needs {exc.name}: pip install 'cvmctl[verify]'"
    by_detail: dict[str, list[str]] = {}
    for arm in result.arms:  # two arms of one plain VM say the same: once
        by_detail.setdefault(arm.detail, []).append(arm.arm or "run")
    detail = "; ".join(f"{', '.join(arms)}: {text}" for text, arms in by_detail.items())
    return result.verdict, detail


def campaign_html(store: Store, campaign: Campaign) -> str:
    done = [i for i in campaign.items if i.state == "completed" and i.run_id is not None]
    runs = load_runs(store, [i.run_id for i in done if i.run_id is not None])
    verdicts = {d.run.id: d.verdict for d in runs}
    arms = " vs ".join(f"{arm} = {name}" for arm, name in zip("AB", campaign.targets, strict=False))
    intro = [
        ("campaign", campaign.id),
        ("targets", arms if len(campaign.targets) == 2 else campaign.targets[0]),
        (
            "profile",
            f"{campaign.profile}: {campaign.repeat} measured repetitions per arm"
            f" after {campaign.warmup} warm-up"
            + (f", about {campaign.duration:g} s each" if campaign.duration else ", the study's parameters"),
        ),
        ("started", _when(campaign.created)),
        ("finished", _when(campaign.finished) if campaign.finished else "not yet (resumable)"),
        (
            "items",
            f"{len(done)} of {len(campaign.measured())} completed, "
            f"{sum(i.state == 'unavailable' for i in campaign.items)} unavailable here",
        ),
    ]
    table = _table(
        ["item", "state", "run", "took", "attestation"],
        [
            [
                i.name,
                i.state,
                "-" if i.run_id is None else str(i.run_id),
                "-" if i.seconds is None else format_seconds(i.seconds),
                verdicts.get(i.run_id or 0, "-"),
            ]
            for i in campaign.items
        ],
    )
    return render(f"cvmctl study {campaign.id}", intro, table, runs, campaign)


def runs_html(store: Store, run_ids: Sequence[int]) -> str:
    runs = load_runs(store, run_ids)
    intro = [("runs", ", ".join(str(i) for i in run_ids))]
    table = _table(
        ["run", "workload", "target", "status", "attestation"],
        [[str(d.run.id), d.run.workload, d.run.target, d.run.status, d.verdict] for d in runs],
    )
    return render("cvmctl report", intro, table, runs, None)


def write_html(text: str, out_dir: Path) -> Path:
    path = out_dir / REPORT_NAME
    write_durably(path, text.encode(), mode=0o644)
    return path


def write_campaign_report(store: Store, campaign: Campaign, out_dir: Path) -> Path:
    return write_html(campaign_html(store, campaign), out_dir)

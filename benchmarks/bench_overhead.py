"""Does ``cvmctl bench`` change what it measures? Plain wrk vs cvmctl against the same nginx.

The script starts one nginx on 127.0.0.1 (a free high port; the minimal config of the
``nginx`` workload: 1 worker, access_log off, one static page, in a temp dir), then
interleaves plain P and cvmctl C runs as P C P C ... C P (``--rounds`` C runs):

- plain: ``wrk -t8 -c300 -dDs --latency http://127.0.0.1:PORT/``;
- cvmctl: ``cvmctl bench nginx --target local:PORT --repeat 1 --warmup 0 --param duration=D
  --json`` (the same wrk arguments, run by the runner, parsed and stored in a temp store).

Each C is compared with the geometric mean of the P just before and just after it, which
cancels a linear drift of the machine over the round. It prints the req/s of each run and
the median of the per-round ratios cvmctl / plain. An unrecorded plain run warms nginx up.

    .venv/bin/python benchmarks/bench_overhead.py [--rounds 5] [--duration 10] [--json out.json]

Goal (issue 6): the median ratio within 2% of 1.0. What it can show: the Python process
waiting on wrk costs no CPU that wrk or nginx would have used; it cannot show anything
about VMs (there is none here). It also prints the paired ratio with its 95% CI
(:func:`workloads.stats.paired_overhead`) and the spread of the per-round ratios: on a
shared 2-core machine one wrk run differs from the next by 10-20%, and then a 2% verdict
from 5 rounds is chance; many short rounds (``--rounds 15 --duration 3``) narrow it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import trio

from workloads import parsers
from workloads.catalogue import get
from workloads.execute import run_command
from workloads.runner import LocalTarget, free_port
from workloads.stats import paired_overhead

CLI = (
    "import sys; import cvmctl.cli.main as m; "
    "m.COMMAND_MODULES = tuple(dict.fromkeys((*m.COMMAND_MODULES, 'bench', 'results', 'report'))); "
    "sys.exit(m.main(sys.argv[1:]))"
)


async def plain_wrk(port: int, duration: int, extra: dict[str, str]) -> float:
    workload = get("nginx")
    params = workload.validate({"duration": str(duration), **extra})
    argv = workload.host_command(params, "127.0.0.1", port)
    assert argv is not None
    output = await run_command(argv, duration * 2 + 30, "wrk")
    return parsers.parse_wrk(output).requests_per_second


async def via_cvmctl(port: int, duration: int, extra: dict[str, str], data_dir: str) -> float:
    argv = [sys.executable, "-c", CLI, "bench", "nginx", "--target", f"local:{port}", "--repeat", "1"]
    argv += ["--warmup", "0", "--param", f"duration={duration}", "--json", "--quiet"]
    argv += [f"--param={k}={v}" for k, v in extra.items()]
    env = {**os.environ, "CVMCTL_DATA_DIR": data_dir}
    with trio.fail_after(duration * 2 + 60):
        done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"cvmctl bench failed: {done.stderr.decode(errors='replace')}")
    data = json.loads(done.stdout)
    [rps] = [s["value"] for s in data["samples"] if s["metric"] == "requests_per_second" and not s["warmup"]]
    return float(rps)


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    workload = get("nginx")
    port = free_port()
    target = LocalTarget()
    plan = workload.guest_server(workload.validate({"listen": "127.0.0.1", "port": str(port)}))
    assert plan is not None
    rounds: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="cvmctl-overhead-") as data_dir:
        await target.start_server(plan)
        try:
            extra = {"threads": str(args.threads), "connections": str(args.connections)}
            await plain_wrk(port, min(args.duration, 5), extra)  # warm-up, not recorded
            await trio.sleep(args.pause)
            before = await plain_wrk(port, args.duration, extra)
            for i in range(args.rounds):
                await trio.sleep(args.pause)  # the same quiet gap before each run
                cvmctl = await via_cvmctl(port, args.duration, extra, data_dir)
                await trio.sleep(args.pause)
                after = await plain_wrk(port, args.duration, extra)
                plain = math.sqrt(before * after)  # the neighbours' geometric mean cancels linear drift
                result = {"plain_before": before, "cvmctl": cvmctl, "plain_after": after, "plain": plain}
                result["ratio"] = cvmctl / plain
                rounds.append(result)
                print(
                    f"round {i + 1}: plain {before:.0f} | cvmctl {cvmctl:.0f} | plain {after:.0f} req/s, "
                    f"ratio {result['ratio']:.4f}",
                    flush=True,
                )
                before = after
        finally:
            await target.stop_server()
    ratios = [r["ratio"] for r in rounds]
    median_ratio = statistics.median(ratios)
    medians = statistics.median(r["cvmctl"] for r in rounds) / statistics.median(r["plain"] for r in rounds)
    paired = paired_overhead([r["plain"] for r in rounds], [r["cvmctl"] for r in rounds], "higher")
    return {
        "rounds": rounds,
        "median_ratio": median_ratio,
        "ratio_of_medians": medians,
        "paired": {
            "geometric_mean_ratio": paired.ratio,
            "ci95": [paired.ci95_low, paired.ci95_high],
            "distinguishable_from_noise": paired.distinguishable_from_noise,
        },
        "per_round_ratio_stddev": statistics.stdev(ratios) if len(ratios) > 1 else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default 10)")
    parser.add_argument("--threads", type=int, default=8, help="wrk -t (the study: 8)")
    parser.add_argument("--connections", type=int, default=300, help="wrk -c (the study: 300)")
    parser.add_argument("--pause", type=float, default=0.5, help="seconds of quiet before each run (0.5)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    get("nginx").require_tools("host")
    get("nginx").require_tools("guest")
    report = trio.run(main_async, args)
    ratio = float(report["median_ratio"])  # type: ignore[arg-type]
    print(f"median of per-round ratios cvmctl / plain: {ratio:.4f} ({ratio - 1:+.2%})")
    print(f"ratio of median req/s: {float(report['ratio_of_medians']):.4f}")  # type: ignore[arg-type]
    print(f"{'within' if abs(ratio - 1) <= 0.02 else 'NOT within'} the 2% goal")
    paired: dict[str, Any] = report["paired"]  # type: ignore[assignment]
    low, high = paired["ci95"]
    spread = report["per_round_ratio_stddev"]
    print(
        f"paired (workloads.stats): ratio {paired['geometric_mean_ratio']:.4f}, 95% CI "
        + ("-" if low is None else f"{low:.4f}..{high:.4f}")
        + (", distinguishable from noise" if paired["distinguishable_from_noise"] else ", within noise")
        + ("" if spread is None else f"; per-round ratio stddev {spread:.1%} (the machine's noise)")
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

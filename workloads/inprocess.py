"""Running an in-process workload (vmexit) as a process of its own, for a workload unit.

An in-process workload (:attr:`Workload.in_process`) runs inside whoever asks: the CLI on
the host, the agent in a dev guest. Under systemd the agent's own sandbox refuses what such
a workload does (vmexit writes and runs a page of machine code and reads ``/dev/port``), so
the agent runs ``python -m workloads.inprocess NAME PARAMS_JSON`` in a workload unit
(:mod:`workloads.sandbox`) instead; it prints one JSON object per sample on stdout, then one
``{"unavailable": ...}`` object per measurement it cannot take *there* (the unit's devices and
capabilities decide that, not the agent's), which :func:`parse_output` turns back into
:class:`Sample` and :class:`Unavailable` objects.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Mapping
from typing import Any

from workloads.model import Sample, Unavailable


def in_process_argv(name: str, params: Mapping[str, Any]) -> list[str]:
    """The command that runs workload ``name`` with validated ``params`` in this interpreter."""
    return [sys.executable, "-m", "workloads.inprocess", name, json.dumps(dict(params), sort_keys=True)]


def render_output(samples: list[Sample], unavailable: list[Unavailable]) -> str:
    lines = [json.dumps(dataclasses.asdict(s), sort_keys=True) for s in samples]
    lines += [json.dumps({"unavailable": dataclasses.asdict(u)}, sort_keys=True) for u in unavailable]
    return "".join(line + "\n" for line in lines)


def parse_output(text: str) -> tuple[list[Sample], list[Unavailable]]:
    """Samples and notes from :func:`render_output`'s lines (a malformed line is a ValueError)."""
    samples, notes = [], []
    for line in text.splitlines():
        if line.strip():
            d = json.loads(line)
            if "unavailable" in d:
                notes.append(Unavailable(str(d["unavailable"]["metric"]), str(d["unavailable"]["reason"])))
                continue
            samples.append(
                Sample(
                    metric=str(d["metric"]),
                    value=float(d["value"]),
                    unit=str(d["unit"]),
                    direction=d["direction"],
                    metadata={str(k): str(v) for k, v in d.get("metadata", {}).items()},
                )
            )
    return samples, notes


def main(argv: list[str] | None = None) -> int:
    from workloads.catalogue import get

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m workloads.inprocess NAME PARAMS_JSON", file=sys.stderr)
        return 2
    workload = get(args[0])
    if not workload.in_process:
        print(f"{args[0]} is not an in-process workload", file=sys.stderr)
        return 2
    params = json.loads(args[1])
    sys.stdout.write(render_output(workload.run_in_process(params), workload.unavailable(params)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Running an in-process workload (vmexit) as a process of its own, for a workload unit.

An in-process workload (:attr:`Workload.in_process`) runs inside whoever asks: the CLI on
the host, the agent in a dev guest. Under systemd the agent's own sandbox refuses what such
a workload does (vmexit writes and runs a page of machine code and reads ``/dev/port``), so
the agent runs ``python -m workloads.inprocess NAME PARAMS_JSON`` in a workload unit
(:mod:`workloads.sandbox`) instead; it prints one JSON object per sample on stdout, which
:func:`parse_samples` turns back into :class:`Sample` objects.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Mapping
from typing import Any

from workloads.model import Sample


def in_process_argv(name: str, params: Mapping[str, Any]) -> list[str]:
    """The command that runs workload ``name`` with validated ``params`` in this interpreter."""
    return [sys.executable, "-m", "workloads.inprocess", name, json.dumps(dict(params), sort_keys=True)]


def render_samples(samples: list[Sample]) -> str:
    return "".join(json.dumps(dataclasses.asdict(s), sort_keys=True) + "\n" for s in samples)


def parse_samples(text: str) -> list[Sample]:
    """Samples from :func:`render_samples`' lines (a malformed line is a ValueError)."""
    samples = []
    for line in text.splitlines():
        if line.strip():
            d = json.loads(line)
            samples.append(
                Sample(
                    metric=str(d["metric"]),
                    value=float(d["value"]),
                    unit=str(d["unit"]),
                    direction=d["direction"],
                    metadata={str(k): str(v) for k, v in d.get("metadata", {}).items()},
                )
            )
    return samples


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
    sys.stdout.write(render_samples(workload.run_in_process(json.loads(args[1]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())

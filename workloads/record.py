"""A stored run's canonical record: the bytes an attestation report binds.

When a run is measured in a confidential guest, cvmctl asks that guest for evidence whose
64-byte REPORT_DATA is the SHA-512 of this record (:func:`record_digest`). Anyone holding
the store can rebuild the record from what is stored and compare: one altered sample,
parameter or metadata value gives another digest, and the evidence no longer matches.

The record is JSON with sorted keys and no insignificant white space (the store's own
encoding), of::

    {"format": 1, "run": {"id", "workload", "params", "target", "started", "metadata"},
     "samples": [[arm, repetition, warmup, metric, value, unit, direction, metadata], ...]}

``metadata`` leaves out ``attestation`` (the evidence cannot cover itself); status, end time
and the writer's pid are left out too, being the store's bookkeeping, not the measurement.
Samples keep the store's order (insertion). Floats are written as Python's ``repr``, which
reads back to the same double, so a record rebuilt from the store is byte-identical.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

from workloads.store import Run, StoredSample

RECORD_FORMAT = 1
ATTESTATION_KEY = "attestation"


def canonical_record(run: Run, samples: Sequence[StoredSample]) -> bytes:
    """The record of the module docstring, as bytes."""
    metadata = {k: v for k, v in run.metadata.items() if k != ATTESTATION_KEY}
    record = {
        "format": RECORD_FORMAT,
        "run": {
            "id": run.id,
            "workload": run.workload,
            "params": run.params,
            "target": run.target,
            "started": run.started,
            "metadata": metadata,
        },
        "samples": [
            [
                s.arm,
                s.repetition,
                s.warmup,
                s.sample.metric,
                s.sample.value,
                s.sample.unit,
                s.sample.direction,
                s.sample.metadata,
            ]
            for s in samples
        ],
    }
    return json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def record_digest(run: Run, samples: Sequence[StoredSample]) -> bytes:
    """SHA-512 of :func:`canonical_record`: exactly the 64 bytes of REPORT_DATA."""
    return hashlib.sha512(canonical_record(run, samples)).digest()

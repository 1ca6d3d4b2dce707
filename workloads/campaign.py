"""A campaign: the study's items run as one paired comparison, resumable after any crash.

``cvmctl study`` runs catalogue items one after another, each as one stored run of the
results store (a ``--compare A,B`` run when there are two targets). The campaign itself is a
small JSON manifest beside the store, ``<data dir>/campaigns/<id>/campaign.json``, that
names the targets, the profile and, per item, its state and the runs it made::

    {"id": "c3", "targets": ["vm", "vm+swiotlb"], "profile": "quick", "repeat": 3, ...,
     "items": [{"name": "nginx", "params": {...}, "state": "completed", "runs": [41],
                "seconds": 52.1}, ...]}

Item states: ``pending`` (not started), ``running`` (started by a process that may since
have died), ``completed`` (its run is stored and completed: never run again),
``failed`` (its run failed; a resume tries again) and ``unavailable`` (the targets cannot
run it here; ``reason`` says why, and the report lists it).

What a crash leaves, and how :meth:`Campaign.reconcile` repairs it on ``--resume``:

- the manifest is replaced whole with :func:`cvmcore.durable.write_durably`, so it is the
  old state or the new one, never torn;
- every run carries ``campaign`` and ``campaign_item`` in its metadata, so a run that
  completed in the store just before a ``kill -9`` (its id not yet in the manifest) is found
  and adopted instead of being run again;
- an item left ``running`` whose run is not completed is pending again; its aborted run
  stays in the store and in ``runs`` (nothing stored is lost or overwritten).

Campaign ids are ``c1``, ``c2``, ...: the directory is created with ``mkdir`` (exclusive),
so two studies started at once never share one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from cvmcore.durable import write_durably
from cvmcore.errors import UsageError
from workloads.store import Run

ItemState = Literal["pending", "running", "completed", "failed", "unavailable"]
CAMPAIGNS_DIR = "campaigns"
MANIFEST = "campaign.json"
FORMAT = 1


@dataclass
class Item:
    """One catalogue item of a campaign; ``params`` as text, as the store records them."""

    name: str
    params: dict[str, str] = field(default_factory=dict)
    state: ItemState = "pending"
    runs: list[int] = field(default_factory=list)  # every run made for it, the last one counts
    reason: str | None = None  # why unavailable, or the last failure
    seconds: float | None = None  # wall time of the completed run
    estimate: float = 0.0  # seconds, from the profile, for the time-left display
    repeat: int | None = None  # the profile's count for this item (None: the campaign's)
    warmup: int | None = None

    @property
    def run_id(self) -> int | None:
        """The run that stands for the item: its last one (None before it ran)."""
        return self.runs[-1] if self.runs else None


@dataclass
class Campaign:
    id: str
    targets: list[str]
    profile: str
    repeat: int
    warmup: int
    duration: float | None
    created: float
    items: list[Item]
    finished: float | None = None
    path: Path = Path()

    # -- persistence ------------------------------------------------------------------

    def save(self) -> None:
        """Replace the manifest durably (old or new on a crash, never a mixture)."""
        data = asdict(self)
        data.pop("path")
        data["format"] = FORMAT
        write_durably(self.path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode(), mode=0o644)

    @classmethod
    def create(
        cls,
        data_dir: Path,
        *,
        targets: list[str],
        profile: str,
        repeat: int,
        warmup: int,
        duration: float | None,
        items: list[Item],
    ) -> Campaign:
        """A new campaign with the next free id, saved before anything runs."""
        root = data_dir / CAMPAIGNS_DIR
        root.mkdir(parents=True, exist_ok=True)
        number = 1 + max((_number(p.name) for p in root.iterdir()), default=0)
        while True:
            try:
                (root / f"c{number}").mkdir()
                break
            except FileExistsError:
                number += 1
        campaign = cls(
            id=f"c{number}",
            targets=targets,
            profile=profile,
            repeat=repeat,
            warmup=warmup,
            duration=duration,
            created=time.time(),
            items=items,
            path=root / f"c{number}" / MANIFEST,
        )
        campaign.save()
        return campaign

    @classmethod
    def load(cls, data_dir: Path, campaign_id: str) -> Campaign:
        """The campaign ``campaign_id`` (``c3`` or ``3``); :class:`UsageError` if there is none."""
        cid = campaign_id if campaign_id.startswith("c") else f"c{campaign_id}"
        if _number(cid) == 0:
            raise UsageError(f"{campaign_id!r} is not a campaign id (c1, c2, ...; see cvmctl study --list)")
        path = data_dir / CAMPAIGNS_DIR / cid / MANIFEST
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise UsageError(f"no campaign {cid} in {data_dir} (cvmctl study --list)") from None
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read campaign {cid} ({path}): {exc}") from exc
        data.pop("format", None)
        items = [Item(**item) for item in data.pop("items")]
        return cls(**data, items=items, path=path)

    @staticmethod
    def list_ids(data_dir: Path) -> list[str]:
        root = data_dir / CAMPAIGNS_DIR
        if not root.is_dir():
            return []
        return [f"c{n}" for n in sorted(_number(p.name) for p in root.iterdir() if (p / MANIFEST).exists())]

    @property
    def directory(self) -> Path:
        return self.path.parent

    # -- state ------------------------------------------------------------------------

    def run_metadata(self, item: Item) -> dict[str, Any]:
        """What every run of ``item`` records, so a crash between the store and the manifest
        still ties the run to its campaign (:meth:`reconcile`)."""
        return {"campaign": self.id, "campaign_item": item.name, "campaign_profile": self.profile}

    def reconcile(self, runs: Iterable[Run]) -> list[str]:
        """Bring the manifest up to date with the store after an interruption; what changed.

        A completed run of this campaign that the manifest does not know is adopted (its
        item is completed); a ``running`` item without a completed run is pending again.
        """
        notes = []
        by_item: dict[str, list[Run]] = {}
        for run in runs:
            if run.metadata.get("campaign") == self.id:
                by_item.setdefault(str(run.metadata.get("campaign_item")), []).append(run)
        for item in self.items:
            if item.state in ("completed", "unavailable"):
                continue
            for run in sorted(by_item.get(item.name, []), key=lambda r: r.id):
                if run.id not in item.runs:
                    item.runs.append(run.id)
                    notes.append(f"{item.name}: found run {run.id} ({run.status}) in the store")
            done = [r for r in by_item.get(item.name, []) if r.status == "completed"]
            if done:
                run = max(done, key=lambda r: r.id)
                item.runs = [r for r in item.runs if r != run.id] + [run.id]
                item.state = "completed"
                item.seconds = None if run.finished is None else run.finished - run.started
            elif item.state == "running":
                item.state = "pending"
                notes.append(f"{item.name}: interrupted before it finished; runs again")
        return notes

    def pending(self) -> list[Item]:
        return [i for i in self.items if i.state in ("pending", "running", "failed")]

    def measured(self) -> list[Item]:
        """Items to run or run (not unavailable), in order: what "item k of n" counts."""
        return [i for i in self.items if i.state != "unavailable"]

    def time_left(self, now_item: Item | None = None) -> float:
        """Seconds left by the profile's estimates, scaled by how the finished items fared."""
        done = [i for i in self.items if i.state == "completed" and i.seconds and i.estimate]
        scale = sum(i.seconds or 0 for i in done) / sum(i.estimate for i in done) if done else 1.0
        left = [i for i in self.pending() if i is not now_item]
        return scale * sum(i.estimate for i in left)


def _number(name: str) -> int:
    digits = name[1:] if name.startswith("c") else ""
    return int(digits) if digits.isdigit() else 0


def format_seconds(seconds: float) -> str:
    """``75`` -> ``1 min 15 s``; for progress lines."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, rest = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {rest:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"

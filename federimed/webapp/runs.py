"""The runs folder as the operator dashboard and the metrics see it: read-only, per request.

A run is a folder the ServerApp made (``run_config.json`` from its start, ``rounds.jsonl`` a
line per round, ``summary.json`` at its end); the dashboard follows a live run by reading the
same per-round record, never logs.  A demo's ``report.json`` above a run adds the federated vs
local-only vs centralized comparison.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from federimed.research.measures import METHODS, Measures, measures, method_name
from federimed.runconfig import RunConfig
from federimed.runrecord import (
    REPORT_FILE,
    ROUNDS_FILE,
    RUN_CONFIG_FILE,
    Report,
    RoundRecord,
    RunFailure,
    RunSummary,
    read_failure,
    read_report,
    read_rounds,
    read_run_config,
    read_summary,
)
from federimed.tracks import track_for

IN_PROGRESS, STALLED, FAILED = "in progress", "stalled", "failed"
# Beyond the round's reply timeout: aggregating, scoring and checkpointing the round.
STALL_GRACE = 300.0
MAX_DEPTH = 4  # runs/<demo>/flower/<run id>/: deep enough for every layout FederiMed writes


@dataclass
class Run:
    id: str
    folder: Path
    config: RunConfig
    rounds: list[RoundRecord]
    summary: RunSummary | None
    report: Report | None

    last_written: float = 0.0  # when the ServerApp last wrote the record (epoch seconds)
    failure: RunFailure | None = None  # why the ServerApp gave the run up

    @property
    def state(self) -> str:
        """ "completed" or "deadline" from the summary; "failed" when the ServerApp gave the
        run up (its reason is on the run's page). Otherwise "in progress" while its record
        keeps growing, "stalled" when no round was written for longer than a round may take:
        a ServerApp that was killed writes neither (a stalled run that writes again is in
        progress again)."""
        if self.summary:
            return self.summary.status
        if self.failure:
            return FAILED
        quiet = time.time() - self.last_written
        limit = self.config.round_timeout + STALL_GRACE
        return STALLED if quiet > limit else IN_PROGRESS

    @property
    def track(self) -> str:
        return self.config.track

    @property
    def measure(self) -> tuple[str, str]:
        """The headline test metric of this run's track: (key, name)."""
        shown = track_for(self.track).measures
        return shown.headline, shown.headline_name

    @property
    def epsilon(self) -> dict[str, float]:
        """Each hospital's ε for the run, as its guard last reported it (DP-SGD runs only)."""
        spent: dict[str, float] = {}
        for record in self.rounds:
            spent |= record.epsilon
        return spent

    def headline(self) -> list[tuple[int, float | None]]:
        """(round, headline test score) per round, None where the round was not scored."""
        key, _ = self.measure
        return [(r.round, getattr(r.test, key, None) if r.test else None) for r in self.rounds]

    def comparison(self) -> dict[str, Any] | None:
        """Per hospital, each method's headline and unseen-condition score (the demo's report)."""
        if not self.report:
            return None
        shown: Measures = measures(self.report)
        rows = {}
        for hospital, entry in self.report.hospitals.items():
            rows[hospital] = {
                method: {"score": scores.get(shown.headline), "unseen": scores.get(shown.unseen)}
                for method in METHODS
                if (scores := entry.method(method)) is not None
            }
        present = [m for m in METHODS if any(m in methods for methods in rows.values())]
        return {
            "measure": shown.headline_name,
            "methods": [(method, method_name(method)) for method in present],
            "hospitals": rows,
        }

    def to_json(self, detail: bool = True) -> dict[str, Any]:
        key, name = self.measure
        last = self.rounds[-1] if self.rounds else None
        about: dict[str, Any] = {
            "id": self.id,
            "state": self.state,
            "track": self.track,
            "rounds_planned": self.config.num_server_rounds,
            "rounds_completed": len(self.rounds),
            "measure": {"key": key, "name": name},
            "latest_test": last.test.model_dump() if last and last.test else None,
            "modified": self.folder.stat().st_mtime,
        }
        if detail:
            about["config"] = self.config.to_flower()
            about["rounds"] = [r.model_dump() for r in self.rounds]
            about["summary"] = self.summary.model_dump() if self.summary else None
            about["failure"] = self.failure.model_dump() if self.failure else None
            about["comparison"] = self.comparison()
        return about


class RunIndex:
    """Finds runs under one folder; every call reads the files again (they change live)."""

    def __init__(self, root: Path | None):
        self.root = Path(root) if root else None

    def folders(self) -> dict[str, Path]:
        """Run id -> folder, newest last (a copied run with the same id: the newer one)."""
        if self.root is None or not self.root.is_dir():
            return {}
        found = [
            marker.parent
            for depth in range(1, MAX_DEPTH + 1)
            for marker in self.root.glob("/".join(["*"] * depth) + "/" + RUN_CONFIG_FILE)
        ]
        if (self.root / RUN_CONFIG_FILE).is_file():
            found.append(self.root)
        found.sort(key=lambda folder: (folder / RUN_CONFIG_FILE).stat().st_mtime)
        return {folder.name: folder for folder in found}

    def runs(self) -> list[Run]:
        """Newest first."""
        return [self._load(run_id, folder) for run_id, folder in reversed(self.folders().items())]

    def get(self, run_id: str) -> Run | None:
        folder = self.folders().get(run_id)
        return self._load(run_id, folder) if folder else None

    def _load(self, run_id: str, folder: Path) -> Run:
        config = read_run_config(folder)
        assert config is not None  # found by its marker, which no run removes
        written = [p.stat().st_mtime for p in (folder / RUN_CONFIG_FILE, folder / ROUNDS_FILE)
                   if p.is_file()]  # fmt: skip
        return Run(run_id, folder, config, read_rounds(folder), read_summary(folder),
                   self._report(run_id, folder), max(written), read_failure(folder))  # fmt: skip

    def _report(self, run_id: str, folder: Path) -> Report | None:
        """The demo's report.json about this run, in the run's folder or one above it (up to
        the runs folder itself)."""
        for parent in [folder, *folder.parents]:
            report = read_report(parent / REPORT_FILE)
            if report is not None and str(report.flower_run_id) == run_id:
                return report
            if self.root is None or parent == self.root:
                break
        return None

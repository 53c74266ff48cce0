"""What a report shows: the methods it compares, and the run's track's measures.

Apart from :mod:`federimed.research.report` (which draws with matplotlib) so that the web app's run
pages read them without loading a plotting library.
"""

from __future__ import annotations

from federimed.runrecord import Report
from federimed.tracks import Measures, track_for

# Equal budget (the federation's steps) first, then each method tuned on its own validation data.
METHODS = (
    "federated", "local", "centralized",
    "federated_tuned", "local_tuned", "centralized_tuned",
)  # fmt: skip
TUNED = {"federated_tuned": "federated", "local_tuned": "local", "centralized_tuned": "centralized"}


def method_name(method: str) -> str:
    return f"{TUNED[method]} (tuned)" if method in TUNED else method


def measures(report: Report) -> Measures:
    return track_for(report.setup.track).measures


def methods_in(report: Report) -> list[str]:
    """The methods this report has results for (``--no-baselines``: federated only)."""
    first = next(iter(report.hospitals.values()), None)
    return [method for method in METHODS if first and first.method(method) is not None]

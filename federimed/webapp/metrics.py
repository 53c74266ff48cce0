"""Prometheus metrics of the consortium and of the web app itself, on ``/metrics``.

The ServerApp lives for one run (Flower starts one per run, in its own process), so the
consortium's figures are read, at each scrape, from what every run leaves in the runs folder:
the per-round record.  The web app is the long-lived process beside that folder, so it exports
them; a scrape therefore shows exactly what ``rounds.jsonl`` says, a restarted exporter loses
nothing, and no process has to outlive its run.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from federimed.webapp.runs import Run, RunIndex

# The test scores a round can carry, both tracks (runrecord.Scores).
SCORES = (
    "accuracy", "top3_accuracy", "ece", "macro_f1", "loss",
    "unseen_style_accuracy", "unseen_style_top3_accuracy",
    "choice_accuracy", "exact_match", "token_f1", "perplexity",
)  # fmt: skip


class ConsortiumCollector(Collector):
    def __init__(self, index: RunIndex):
        self.index = index

    def collect(self) -> Iterator[Metric]:
        runs = self.index.runs()
        yield _gauge(
            "federimed_run_info",
            "A run's state and track (always 1)",
            ["run", "state", "track"],
            [((r.id, r.state, r.track), 1) for r in runs],
        )
        yield _counter(
            "federimed_rounds_completed",
            "Rounds the run has recorded",
            ["run"],
            [((r.id,), len(r.rounds)) for r in runs],
        )
        last = [r for r in runs if r.rounds]
        yield _gauge(
            "federimed_round_duration_seconds",
            "Wall time of the run's last round",
            ["run"],
            [((r.id,), r.rounds[-1].seconds) for r in last],
        )
        yield _gauge(
            "federimed_round_participants",
            "Hospitals aggregated in the last round",
            ["run"],
            [((r.id,), len(r.rounds[-1].participants)) for r in last],
        )
        yield _gauge(
            "federimed_round_dropped",
            "Hospitals sampled but dropped in the last round",
            ["run"],
            [((r.id,), len(r.rounds[-1].dropped)) for r in last],
        )
        yield _counter(
            "federimed_hospital_dropped",
            "Rounds in which the hospital was sampled and sent no update in time (every "
            "round counted, however often Prometheus scrapes)",
            ["run", "hospital"],
            list(_dropped(runs)),
        )
        yield _counter(
            "federimed_updates_rejected",
            "Updates that arrived and were not aggregated (the server's checks)",
            ["run"],
            [((r.id,), sum(len(x.rejected) for x in r.rounds)) for r in runs],
        )
        yield _counter(
            "federimed_bytes_received",
            "Update bytes received from each hospital",
            ["run", "hospital"],
            list(_bytes_received(runs)),
        )
        for score in SCORES:
            yield _gauge(
                f"federimed_test_{score}",
                f"The global model's test {score} after the last scored round",
                ["run"],
                list(_latest(runs, score)),
            )


def _bytes_received(runs: list[Run]) -> Iterator[tuple[tuple[str, ...], float]]:
    for run in runs:
        totals: dict[str, int] = {}
        for record in run.rounds:
            for hospital, traffic in record.traffic.items():
                totals[hospital] = totals.get(hospital, 0) + traffic.bytes_up
        yield from (((run.id, hospital), total) for hospital, total in sorted(totals.items()))


def _dropped(runs: list[Run]) -> Iterator[tuple[tuple[str, ...], float]]:
    for run in runs:
        counts = Tally(hospital for record in run.rounds for hospital in record.dropped)
        yield from (((run.id, hospital), n) for hospital, n in sorted(counts.items()))


def _latest(runs: list[Run], score: str) -> Iterator[tuple[tuple[str, ...], float]]:
    for run in runs:
        values = [getattr(r.test, score) for r in run.rounds if r.test is not None]
        values = [value for value in values if value is not None]
        if values:
            yield (run.id,), values[-1]


def _gauge(name: str, doc: str, labels: list[str], samples) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for values, value in samples:
        family.add_metric(list(values), value)
    return family


def _counter(name: str, doc: str, labels: list[str], samples) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=labels)
    for values, value in samples:
        family.add_metric(list(values), value)
    return family


class WebMetrics:
    """One registry per application (tests start several in one process)."""

    def __init__(self, index: RunIndex):
        self.registry = CollectorRegistry()
        self.registry.register(ConsortiumCollector(index))
        self.requests = Counter(
            "federimed_http_requests",
            "Requests to the web app",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "federimed_http_request_seconds",
            "Time to answer a request (streamed answers: until the stream starts)",
            ["route"],
            registry=self.registry,
        )

"""A hospital's Prometheus exporter, read from its egress ledger.

A ClientApp process lives for one message, so nothing at the hospital outlives a round except
the ledger its runner writes before each reply leaves.  The exporter is a small long-lived
process that reads that ledger at each scrape (read-only, the chain checked as it goes): the
figures are exactly what the hospital can prove left, a restarted exporter loses nothing,
and it needs no access to the data, the model or the network beyond its own port.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from federimed.hospital.ledger import LedgerError, entries
from federimed.hospital.policy import refusal_code


class LedgerCollector(Collector):
    def __init__(self, ledger: Path):
        self.ledger = Path(ledger)

    def _read(self) -> tuple[list[dict[str, Any]], bool]:
        """The entries up to the first that breaks the chain, and whether all verified."""
        read: list[dict[str, Any]] = []
        if not self.ledger.is_file():
            return read, True
        try:
            read.extend(entry for _, entry in entries(self.ledger))
        except LedgerError:
            return read, False
        return read, True

    def collect(self) -> Iterator[Metric]:
        read, valid = self._read()
        site = next((str(e["site"]) for e in read if e.get("site")), "")
        sent = [e for e in read if not e.get("error")]
        trains = [e for e in sent if e.get("kind") == "train"]
        yield _one(
            GaugeMetricFamily,
            "federimed_site_ledger_valid",
            "1 while the egress ledger's hash chain verifies, 0 from the line where it breaks",
            site,
            1 if valid else 0,
        )
        replies = CounterMetricFamily(
            "federimed_site_replies", "Replies that left, by kind", labels=["site", "kind"]
        )
        for kind, count in sorted(Counter(str(e.get("kind")) for e in sent).items()):
            replies.add_metric([site, kind], count)
        yield replies
        refused = CounterMetricFamily(
            "federimed_site_refused",
            "Tasks refused or failed at the hospital, by code",
            labels=["site", "code"],
        )
        codes = Counter(refusal_code(str(e["error"])) for e in read if e.get("error"))
        for code, count in sorted(codes.items()):
            refused.add_metric([site, code], count)
        yield refused
        totals = (
            ("federimed_site_bytes_sent", "Array bytes that left",
             sum(int(e.get("bytes") or 0) for e in sent)),
            ("federimed_site_steps", "Local training steps behind the updates that left",
             sum(int(e.get("steps") or 0) for e in trains)),
            ("federimed_site_examples_used", "Examples behind the updates that left "
             "(num_examples, summed over updates)",
             sum(float(e.get("metrics", {}).get("num_examples", 0)) for e in trains)),
        )  # fmt: skip
        for name, doc, total in totals:
            yield _one(CounterMetricFamily, name, doc, site, total)
        losses = [
            e["metrics"]["train_loss"] for e in trains if "train_loss" in e.get("metrics", {})
        ]
        if losses:
            yield _one(
                GaugeMetricFamily,
                "federimed_site_training_loss",
                "Training loss of the last update that left",
                site,
                float(losses[-1]),
            )


def _one(kind, name: str, doc: str, site: str, value: float) -> Metric:
    family = kind(name, doc, labels=["site"])
    family.add_metric([site], value)
    return family


def registry_for(ledger: Path) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(LedgerCollector(ledger))
    return registry


def serve(ledger: Path, host: str, port: int) -> None:
    """Serve ``/metrics`` until the process is stopped."""
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client import make_wsgi_app

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            """Scrapes every few seconds: no line per request."""

    with make_server(
        host, port, make_wsgi_app(registry_for(ledger)), handler_class=Quiet
    ) as server:
        server.serve_forever()

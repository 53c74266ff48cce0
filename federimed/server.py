"""The consortium side of a run: strategy choice, per-hospital bookkeeping, evaluation, saving.

Flower's strategies aggregate client metrics into one number per round; the report needs them
per hospital, plus the bytes each hospital exchanged, so :class:`RoundLog` records every reply
before the strategy aggregates it.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Strategy,
)
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from federimed.data.records import load_examples
from federimed.model import build_classifier, load_exchanged_state, load_tokenizer, save_model
from federimed.runconfig import RunConfig
from federimed.training import encode, evaluate, pick_device

log = logging.getLogger("flwr.federimed.server")


def record_bytes(record: ArrayRecord) -> int:
    """Payload size of an ArrayRecord as it travels (serialized array bytes)."""
    return sum(len(array.data) for array in record.values())


@dataclass
class RoundLog:
    """Per-round, per-hospital metrics and traffic; optionally an audit copy of each reply."""

    audit_dir: Path | None = None
    rounds: dict[int, dict[str, Any]] = field(default_factory=lambda: defaultdict(dict))

    def _entry(self, server_round: int) -> dict[str, Any]:
        entry = self.rounds[server_round]
        for key in ("train", "evaluate", "bytes"):
            entry.setdefault(key, {})
        return entry

    def _note(self, kind: str, contents: list[RecordDict]) -> None:
        for content in contents:
            node = content.get("node", {})
            hospital = str(node.get("hospital", "unknown"))
            server_round = int(node.get("server-round", 0))
            entry = self._entry(server_round)
            entry[kind][hospital] = dict(content["metrics"])
            if kind == "train":
                sent = record_bytes(content["arrays"])
                # The global model a hospital downloads has exactly the update's arrays.
                entry["bytes"][hospital] = {"uplink": sent, "downlink": sent}
            if self.audit_dir is not None:
                self._audit(kind, server_round, hospital, content)

    def _audit(self, kind: str, server_round: int, hospital: str, content: RecordDict) -> None:
        """Everything the server received from this hospital, byte for byte."""
        self.audit_dir.mkdir(parents=True, exist_ok=True)
        path = self.audit_dir / f"round-{server_round}-{kind}-{hospital}.bin"
        with path.open("wb") as handle:
            for record in content.array_records.values():
                for name, array in record.items():
                    handle.write(name.encode() + b"\0" + array.data)
            scalars = {
                key: dict(value)
                for key, value in content.items()
                if key not in content.array_records
            }
            handle.write(json.dumps(scalars, default=str).encode())

    def train_aggregation(self, contents: list[RecordDict], weighted_by_key: str) -> MetricRecord:
        self._note("train", contents)
        return aggregate_metricrecords(contents, weighted_by_key)

    def evaluate_aggregation(
        self, contents: list[RecordDict], weighted_by_key: str
    ) -> MetricRecord:
        self._note("evaluate", contents)
        return aggregate_metricrecords(contents, weighted_by_key)


def make_strategy(run: RunConfig, round_log: RoundLog) -> Strategy:
    common = {
        "fraction_train": run.fraction_train,
        "fraction_evaluate": run.fraction_evaluate,
        "min_train_nodes": run.min_nodes,
        "min_evaluate_nodes": run.min_nodes,
        "min_available_nodes": run.min_nodes,
        "train_metrics_aggr_fn": round_log.train_aggregation,
        "evaluate_metrics_aggr_fn": round_log.evaluate_aggregation,
    }
    if run.strategy == "fedprox":
        return FedProx(proximal_mu=run.proximal_mu, **common)
    if run.strategy == "fedadam":
        return FedAdam(eta=run.server_learning_rate, eta_l=run.learning_rate, **common)
    if run.strategy == "fedmedian":
        return FedMedian(**common)
    if run.strategy == "fedtrimmedavg":
        return FedTrimmedAvg(beta=0.2, **common)
    return FedAvg(**common)


class GlobalModel:
    """The server's copy of the model: evaluated on the common test set and checkpointed."""

    def __init__(self, run: RunConfig, out: Path):
        self.run = run
        self.out = out
        self.labels = run.label_list
        self.model = build_classifier(run.model, self.labels, run.lora, seed=run.seed)
        self.tokenizer = load_tokenizer(run.model)
        self.device = pick_device()
        self.test = None
        if run.test_path:
            examples = load_examples(Path(run.test_path), self.labels)
            self.test = encode(examples, self.tokenizer, self.labels, run.max_length)
        self.history: dict[int, dict[str, float]] = {}

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Strategy hook: called with round 0 (initial model) and after every round."""
        load_exchanged_state(self.model, arrays.to_torch_state_dict())
        if server_round > 0:
            self.model.save_pretrained(self.out / "checkpoints" / f"round-{server_round}")
        if self.test is None:
            return None
        metrics = evaluate(self.model, self.test, self.device)
        self.history[server_round] = metrics
        log.info(
            "round %d: test accuracy %.3f, macro-F1 %.3f",
            server_round,
            metrics["accuracy"],
            metrics["macro-f1"],
        )
        return MetricRecord(metrics)

    def save_final(self, arrays: ArrayRecord) -> Path:
        load_exchanged_state(self.model, arrays.to_torch_state_dict())
        return save_model(self.model, self.tokenizer, self.out / "final", self.run.model)

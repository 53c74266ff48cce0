"""The consortium side of a run: strategy choice, the round record, evaluation, saving.

Flower's strategies aggregate client metrics into one number per round; the record needs them
per hospital, plus who was sampled, who answered and the bytes each way, so the strategy is
wrapped (:class:`Recorded`) to note every message it sends and every reply it gets before it
aggregates, and :class:`RoundRecorder` appends the round to ``rounds.jsonl`` when it ends.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Strategy,
)

from federimed.data.records import load_examples
from federimed.model import (
    build_classifier,
    count_parameters,
    exchanged_state,
    load_exchanged_state,
    load_tokenizer,
    save_model,
)
from federimed.runconfig import RunConfig
from federimed.runrecord import (
    RoundRecord,
    RunSummary,
    Scores,
    Traffic,
    append_round,
    write_summary,
)
from federimed.training import encode, evaluate, pick_device

log = logging.getLogger("flwr.federimed.server")

# The metric replies are weighted by when Flower averages them (training.train reports it).
WEIGHT_KEY = "num_examples"


def record_bytes(record: ArrayRecord) -> int:
    """Payload size of an ArrayRecord as it travels (serialized array bytes)."""
    return sum(len(array.data) for array in record.values())


class RoundRecorder:
    """Collects one round from the messages the strategy sends and receives, then writes it."""

    def __init__(self, out: Path, audit: bool = False):
        self.out = out
        self.audit_dir = out / "audit" if audit else None
        self.names: dict[int, str] = {}  # node id -> the hospital it reported being
        self._reset()

    def _reset(self) -> None:
        self.started = time.monotonic()
        self.sampled: list[int] = []
        self.replied: dict[str, dict[str, dict[str, float]]] = {"train": {}, "evaluate": {}}
        self.errors: dict[str, str] = {}
        self.traffic: dict[int, dict[str, int]] = {}

    def _traffic(self, node_id: int) -> dict[str, int]:
        return self.traffic.setdefault(node_id, {"bytes_down": 0, "bytes_up": 0})

    def sent(self, kind: str, messages: list[Message]) -> None:
        for message in messages:
            node_id = message.metadata.dst_node_id
            if kind == "train":
                self.sampled.append(node_id)
            if "arrays" in message.content:
                self._traffic(node_id)["bytes_down"] += record_bytes(message.content["arrays"])

    def received(self, kind: str, server_round: int, replies: list[Message]) -> None:
        for reply in replies:
            if reply.has_error():
                self._error(kind, server_round, reply)
                continue
            node_id = reply.metadata.src_node_id
            content = reply.content
            node = content.get("node", {})
            hospital = self.names.setdefault(node_id, str(node.get("hospital", f"node-{node_id}")))
            metrics = next(iter(content.metric_records.values()), MetricRecord())
            self.replied[kind][hospital] = {k: float(v) for k, v in metrics.items()}
            if "arrays" in content:
                self._traffic(node_id)["bytes_up"] += record_bytes(content["arrays"])
            if self.audit_dir is not None:
                self._audit(kind, server_round, hospital, content)

    def _error(self, kind: str, server_round: int, reply: Message) -> None:
        name = self._name(reply.metadata.src_node_id)
        self.errors[name] = str(reply.error.reason)
        log.warning(
            "round %d %s: %s replied an error: %s", server_round, kind, name, reply.error.reason
        )

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

    def _name(self, node_id: int) -> str:
        return self.names.get(node_id, f"node-{node_id}")

    def finish(self, server_round: int, test: dict[str, float] | None) -> RoundRecord:
        """The round is over: append its line to ``rounds.jsonl`` and start the next."""
        participants = sorted(self.replied["train"])
        record = RoundRecord(
            round=server_round,
            participants=participants,
            dropped=sorted({self._name(n) for n in self.sampled} - set(participants)),
            errors=self.errors,
            train=self.replied["train"],
            evaluate=self.replied["evaluate"],
            test=Scores(**test) if test else None,
            traffic={self._name(n): Traffic(**t) for n, t in sorted(self.traffic.items())},
            seconds=time.monotonic() - self.started,
        )
        append_round(self.out, record)
        self._reset()
        return record


class Recorded:
    """Mixed in front of a Flower strategy: every message goes past the recorder first."""

    recorder: RoundRecorder

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.recorder.sent("train", messages)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> Any:
        replies = list(replies)
        self.recorder.received("train", server_round, replies)
        if replies and all(reply.has_error() for reply in replies):
            # Nobody trained: going on would repeat the same refusals for every round.
            reasons = "; ".join(f"{n}: {r}" for n, r in sorted(self.recorder.errors.items()))
            raise RuntimeError(f"round {server_round}: no hospital trained ({reasons})")
        return super().aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self.recorder.sent("evaluate", messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Any:
        replies = list(replies)
        self.recorder.received("evaluate", server_round, replies)
        return super().aggregate_evaluate(server_round, replies)


STRATEGY_CLASSES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
}


def _strategy_options(run: RunConfig) -> dict[str, Any]:
    if run.strategy == "fedprox":
        return {"proximal_mu": run.proximal_mu}
    if run.strategy == "fedadam":
        return {"eta": run.server_learning_rate, "eta_l": run.learning_rate}
    if run.strategy == "fedtrimmedavg":
        return {"beta": 0.2}
    return {}


def make_strategy(run: RunConfig, recorder: RoundRecorder) -> Strategy:
    """The run config's strategy, recording every round through ``recorder``."""
    base = STRATEGY_CLASSES[run.strategy]
    recorded = type(f"Recorded{base.__name__}", (Recorded, base), {"recorder": recorder})
    return recorded(
        fraction_train=run.fraction_train,
        fraction_evaluate=run.fraction_evaluate,
        min_train_nodes=run.min_nodes,
        min_evaluate_nodes=run.min_nodes,
        min_available_nodes=run.min_nodes,
        weighted_by_key=WEIGHT_KEY,
        **_strategy_options(run),
    )


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

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> dict[str, float] | None:
        """Load ``arrays``, checkpoint them (after round 0) and score them on the test set."""
        load_exchanged_state(self.model, arrays.to_torch_state_dict())
        if server_round > 0:
            self.model.save_pretrained(self.out / "checkpoints" / f"round-{server_round}")
        if self.test is None:
            return None
        metrics = evaluate(self.model, self.test, self.device)
        log.info(
            "round %d: test accuracy %.3f, macro-F1 %.3f",
            server_round,
            metrics["accuracy"],
            metrics["macro_f1"],
        )
        return metrics

    def save_final(self, arrays: ArrayRecord) -> Path:
        load_exchanged_state(self.model, arrays.to_torch_state_dict())
        return save_model(self.model, self.tokenizer, self.out / "final", self.run.model)


class ServerRun:
    """One run at the consortium: rounds through the strategy, the record written as they end."""

    def __init__(self, run: RunConfig, run_id: int, output_dir: Path):
        self.run = run
        self.run_id = run_id
        self.out = output_dir / str(run_id)
        self.out.mkdir(parents=True, exist_ok=True)
        self.recorder = RoundRecorder(self.out, audit=run.audit_messages)
        self.global_model = GlobalModel(run, self.out)
        self.scores: dict[int, dict[str, float] | None] = {}

    def _end_of_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower calls this before round 1 and as the last step of every round."""
        scores = self.global_model.evaluate(server_round, arrays)
        self.scores[server_round] = scores
        if server_round > 0:
            self.recorder.finish(server_round, scores)
        return MetricRecord(scores) if scores else None

    def start(self, grid: Grid) -> RunSummary:
        started = time.monotonic()
        initial = ArrayRecord(exchanged_state(self.global_model.model))
        result = make_strategy(self.run, self.recorder).start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=self.run.num_server_rounds,
            evaluate_fn=self._end_of_round,
        )
        final = self.global_model.save_final(result.arrays)
        trainable, total = count_parameters(self.global_model.model)
        last = self.run.num_server_rounds
        summary = RunSummary(
            run_id=self.run_id,
            status="completed",
            run_config=self.run.to_flower(),
            rounds_completed=last,
            initial_test=self.scores.get(0),
            final_test=self.scores.get(last),
            update_bytes=record_bytes(initial),
            trainable_parameters=trainable,
            total_parameters=total,
            final_model=str(final),
            wall_seconds=time.monotonic() - started,
        )
        write_summary(self.out, summary)
        return summary

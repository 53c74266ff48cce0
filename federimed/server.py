"""The consortium side of a run: strategy choice, the round record, evaluation, saving.

Flower's strategies aggregate client metrics into one number per round; the record needs them
per hospital, plus who was sampled, who answered and the bytes each way, so the strategy is
wrapped (:class:`Recorded`) to note every message it sends and every reply it gets before it
aggregates, and :class:`RoundRecorder` appends the round to ``rounds.jsonl`` when it ends.

The same wrapper is where a round survives a bad day: hospitals are named by the node Flower
authenticated (the name it was enrolled under), never by what a reply says about itself;
updates that are non-finite, mis-shaped or too large are dropped before aggregation; replies
whose metric keys differ (a hospital without validation data) are cut to the common keys;
and the run's deadline bounds every wait on the grid (:class:`DeadlineGrid`).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Strategy,
)

from federimed import wire
from federimed.batching import Encoded, encode, pick_device
from federimed.data.records import load_examples, load_flashcards
from federimed.decoder import build_generator, load_generator_tokenizer
from federimed.features import with_features
from federimed.generative import score_generator
from federimed.model import (
    build_classifier,
    count_parameters,
    exchanged_state,
    load_tokenizer,
    receive,
    save_model,
    to_wire,
)
from federimed.runconfig import RunConfig
from federimed.runrecord import (
    RoundRecord,
    RunFailure,
    RunSummary,
    Scores,
    Traffic,
    append_round,
    read_rounds,
    write_failure,
    write_provenance,
    write_summary,
)
from federimed.training import evaluate

log = logging.getLogger("flwr.federimed.server")

# The metric replies are weighted by when Flower averages them (training.train reports it).
WEIGHT_KEY = "num_examples"
# An enrolled name is used in paths (audit files) and reports only if it is this plain.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class RunDeadline(Exception):
    """The run's deadline passed: no new round starts."""


def hospital_name(node_id: int, enrolled: str) -> str:
    """The name the node was enrolled under, or ``node-<id>`` when it is not a safe name."""
    return enrolled if SAFE_NAME.match(enrolled) else f"node-{node_id}"


def update_problem(update: ArrayRecord, reference: ArrayRecord, max_norm: float) -> str | None:
    """Why ``update`` must not be aggregated into ``reference`` (the global model), or None.

    Keys, shapes and dtypes must match, every value must be finite, and with ``max_norm`` > 0
    the L2 norm of the change must stay within it: one broken or hostile hospital must not
    be able to wreck the global model for everyone.
    """
    if set(update) != set(reference):
        missing, extra = sorted(set(reference) - set(update)), sorted(set(update) - set(reference))
        return f"wrong keys (missing {missing[:3]}, unexpected {extra[:3]})"
    squared = 0.0
    for name, expected in reference.items():
        got = update[name]
        if list(got.shape) != list(expected.shape) or got.dtype != expected.dtype:
            wanted = f"{expected.dtype}{list(expected.shape)}"
            return f"{name}: {got.dtype}{list(got.shape)}, expected {wanted}"
        try:
            values = got.numpy().astype(np.float64)
        except ValueError as error:
            return f"{name}: unreadable array ({error})"
        if not np.isfinite(values).all():
            return f"{name}: non-finite values"
        squared += float(np.sum((values - expected.numpy()) ** 2))
    norm = math.sqrt(squared)
    if max_norm and norm > max_norm:
        return f"update norm {norm:.4g} above the bound {max_norm:g}"
    return None


def as_sent(arrays: ArrayRecord, precision: wire.Precision) -> ArrayRecord:
    """The global model (float32, in the wire's layout) as it is sent at ``precision``."""
    if precision == "float32" or set(arrays) != {wire.WIRE_ARRAY}:
        return arrays
    encoded = wire.encode(arrays[wire.WIRE_ARRAY].numpy(), precision)
    return ArrayRecord({name: Array(values) for name, values in encoded.items()})


def decoded_update(update: ArrayRecord, sent: ArrayRecord) -> tuple[ArrayRecord | None, str | None]:
    """The weights a hospital's reply stands for (its 8-bit change added to the float32 model
    ``sent`` to it, or its float32 weights), or why it cannot be read."""
    if set(sent) != {wire.WIRE_ARRAY}:
        return update, None  # not in the wire's layout: update_problem names what differs
    try:
        arrays = {name: array.numpy() for name, array in update.items()}
        weights = wire.apply_update(arrays, sent[wire.WIRE_ARRAY].numpy())
    except ValueError as error:
        return None, f"unreadable update ({error})"
    return ArrayRecord({wire.WIRE_ARRAY: Array(weights)}), None


def metrics_problem(content: RecordDict) -> str | None:
    """Why a reply's metrics cannot be averaged, or None."""
    if len(content.metric_records) != 1:
        return f"expected one MetricRecord, got {len(content.metric_records)}"
    metrics = next(iter(content.metric_records.values()))
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if not all(math.isfinite(v) for v in values):
            return f"metric {key}: non-finite value"
    weight = metrics.get(WEIGHT_KEY)
    if isinstance(weight, list) or weight is None or weight <= 0:
        return f"metric {WEIGHT_KEY}: missing or not positive ({weight!r})"
    return None


def keep_common_metrics(replies: list[Message]) -> None:
    """Cut every reply's metrics to the keys all of them have.

    Flower refuses to aggregate replies whose metric keys differ; a hospital without
    validation data (no ``val_*`` keys) must not fail everyone's round. Each hospital's full
    metrics are already in the round record.
    """
    records = [next(iter(r.content.metric_records.values())) for r in replies]
    if not records:
        return
    common = set.intersection(*(set(record) for record in records))
    for record in records:
        for key in set(record) - common:
            del record[key]


# Flower's grid waits 3 s between pulls for replies.  Every pull is a SuperLink request that
# can take its SQLite write lock (docs/scale.md): twice a second from the one ServerApp is
# little next to the hospitals' idle pulls (once a second each).
REPLY_POLL_SECONDS = 0.5


class DeadlineGrid:
    """The run's grid with its deadline: waiting for nodes or replies ends when it passes.

    Flower's strategies wait for ``min-nodes`` without end, polling the node list: past the
    deadline that raises :class:`RunDeadline` (no new round starts). Waiting for replies is cut
    to the time left, so a round in flight at the deadline ends with what arrived by then.
    Without a deadline (``math.inf``) it only polls for replies more often than Flower does.
    """

    def __init__(self, grid: Grid, deadline: float):
        self._grid = grid
        self._deadline = deadline

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def get_node_ids(self) -> Iterable[int]:
        if time.monotonic() >= self._deadline:
            raise RunDeadline("the run deadline passed")
        return self._grid.get_node_ids()

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Flower's own loop, polling every :data:`REPLY_POLL_SECONDS` instead of every 3 s:
        the last reply of a round would otherwise wait 1.5 s on average to be seen."""
        end = min(self._deadline, math.inf if timeout is None else time.monotonic() + timeout)
        waiting = set(self._grid.push_messages(messages))
        replies: list[Message] = []
        while True:
            pulled = list(self._grid.pull_messages(waiting))
            replies += pulled
            waiting -= {reply.metadata.reply_to_message_id for reply in pulled}
            if not waiting or time.monotonic() >= end:
                return replies
            time.sleep(min(REPLY_POLL_SECONDS, max(0.0, end - time.monotonic())))


def record_bytes(record: ArrayRecord) -> int:
    """Payload size of an ArrayRecord as it travels (serialized array bytes)."""
    return sum(len(array.data) for array in record.values())


class RoundRecorder:
    """Collects one round from the messages the strategy sends and receives, then writes it."""

    def __init__(self, out: Path, audit: bool = False):
        self.out = out
        self.audit_dir = out / "audit" if audit else None
        self.names: dict[int, str] = {}  # node id -> the name it was enrolled under
        self.rejected_total = 0
        self._reset()

    def _reset(self) -> None:
        self.restart_clock()
        self.sent_at = self.replied_at = None  # when the train tasks left, and replies were in
        self.sampled: list[int] = []
        self.outbox: list[Message] = []  # Flower sets each one's message id as it pushes it
        self.replied: dict[str, dict[str, dict[str, float]]] = {"train": {}, "evaluate": {}}
        self.errors: dict[str, str] = {}
        self.rejected: dict[str, str] = {}
        self.traffic: dict[int, dict[str, int]] = {}
        self.epsilon: dict[str, float] = {}  # hospital -> ε its guard says the run has spent

    def learn_names(self, grid: Grid) -> None:
        """Node id -> enrolled name, from the SuperLink's record of authenticated nodes."""
        for node in grid.get_nodes():
            self.names[node.node_id] = hospital_name(node.node_id, node.name)

    def restart_clock(self) -> None:
        """The round's time counts from now (``close`` starts the next one's clock too)."""
        self.started = time.monotonic()

    def _traffic(self, node_id: int) -> dict[str, int]:
        return self.traffic.setdefault(node_id, {"bytes_down": 0, "bytes_up": 0})

    def sent(self, kind: str, messages: list[Message]) -> None:
        if kind == "train":
            self.sent_at = time.monotonic()
        self.outbox += messages
        for message in messages:
            node_id = message.metadata.dst_node_id
            if kind == "train":
                self.sampled.append(node_id)
            if "arrays" in message.content:
                self._traffic(node_id)["bytes_down"] += record_bytes(message.content["arrays"])

    def received(self, kind: str, server_round: int, replies: list[Message]) -> None:
        if kind == "train":
            self.replied_at = time.monotonic()
        for reply in replies:
            if reply.has_error():
                self._error(kind, server_round, reply)
                continue
            node_id = reply.metadata.src_node_id
            content = reply.content
            hospital = self._name(node_id)
            node = content.get("node", {})
            claimed = node.get("hospital")
            if claimed is not None and claimed != hospital:
                log.warning("node %s (enrolled as %s) says it is %r", node_id, hospital, claimed)
            if isinstance(node.get("epsilon"), float):
                self.epsilon[hospital] = node["epsilon"]
            metrics = next(iter(content.metric_records.values()), MetricRecord())
            self.replied[kind][hospital] = {k: float(v) for k, v in metrics.items()}
            if "arrays" in content:
                self._traffic(node_id)["bytes_up"] += record_bytes(content["arrays"])
            if self.audit_dir is not None:
                self._audit(kind, server_round, hospital, content)

    def reject(self, server_round: int, reply: Message, problem: str) -> None:
        """An update that arrived but is not aggregated: counted, logged, in the record."""
        name = self._name(reply.metadata.src_node_id)
        self.rejected[name] = problem
        self.rejected_total += 1
        log.warning("round %d: update from %s dropped: %s", server_round, name, problem)

    def _addressee(self, reply: Message) -> int:
        """The node a reply is about: the SuperLink answers for a node that went offline."""
        if reply.metadata.src_node_id != SUPERLINK_NODE_ID:
            return reply.metadata.src_node_id
        asked = reply.metadata.reply_to_message_id
        return next(
            (m.metadata.dst_node_id for m in self.outbox if m.metadata.message_id == asked),
            SUPERLINK_NODE_ID,
        )

    def _error(self, kind: str, server_round: int, reply: Message) -> None:
        name = self._name(self._addressee(reply))
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

    def close(self, server_round: int) -> RoundRecord:
        """The hospitals' part of the round is over: its record, without the global model's test
        score (:meth:`write` adds it), and the next round's clock starts."""
        participants = sorted(set(self.replied["train"]) - set(self.rejected))
        answered = set(participants) | set(self.rejected)
        record = RoundRecord(
            round=server_round,
            participants=participants,
            dropped=sorted({self._name(n) for n in self.sampled} - answered),
            errors=self.errors,
            rejected=self.rejected,
            train=self.replied["train"],
            evaluate=self.replied["evaluate"],
            test=None,
            traffic={self._name(n): Traffic(**t) for n, t in sorted(self.traffic.items())},
            epsilon=self.epsilon,
            seconds=time.monotonic() - self.started,
        )
        self._log_phases(server_round)
        self._reset()
        return record

    def write(self, record: RoundRecord, test: dict[str, float] | None) -> RoundRecord:
        """Append the round's line to ``rounds.jsonl``, with the test score when there is one."""
        record = record.model_copy(update={"test": Scores(**test) if test else None})
        append_round(self.out, record)
        return record

    def _log_phases(self, server_round: int) -> None:
        """Where the round's wall time went, as the server saw it (the hospitals report theirs
        in the record): the part outside the hospitals' compute is the round's overhead."""
        if self.sent_at is None or self.replied_at is None:
            return
        now = time.monotonic()
        log.info(
            "round %d: %.1f s to send, %.1f s until every reply was in, %.1f s to aggregate and "
            "checkpoint (the test score follows while the next round runs)",
            server_round,
            self.sent_at - self.started,
            self.replied_at - self.sent_at,
            now - self.replied_at,
        )


def _refused(reply: Message) -> bool:
    """An error from a hospital that is there (a policy refusal, a failing app)."""
    return reply.has_error() and reply.error.code != ErrorCode.NODE_UNAVAILABLE


class Recorded:
    """Mixed in front of a Flower strategy: every message goes past the recorder first.

    ``round_offset`` shifts Flower's round numbers (1, 2, ...) to the run's own when a run
    resumes another: the hospitals then draw the same batches as the uninterrupted run would.
    """

    recorder: RoundRecorder
    max_update_norm: float = 0.0
    round_offset: int = 0
    wire_precision: wire.Precision = "float32"
    _sent: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        messages = self._at_precision(super().configure_train(server_round, arrays, config, grid))
        self.recorder.learn_names(grid)
        self.recorder.sent("train", messages)
        self._sent = arrays
        return messages

    def _at_precision(self, messages: Iterable[Message]) -> list[Message]:
        """The strategy's messages with the model as the run sends it (``wire-precision``); the
        strategy keeps its float32 copy, to which the hospitals' changes are added."""
        messages = list(messages)
        if messages and self.wire_precision != "float32":
            sent = as_sent(messages[0].content["arrays"], self.wire_precision)
            for message in messages:
                message.content["arrays"] = sent
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> Any:
        server_round += self.round_offset
        replies = list(replies)
        self.recorder.received("train", server_round, replies)
        if replies and all(_refused(reply) for reply in replies):
            # Nobody trained: going on would repeat the same refusals for every round.
            reasons = "; ".join(f"{n}: {r}" for n, r in sorted(self.recorder.errors.items()))
            raise RuntimeError(f"round {server_round}: no hospital trained ({reasons})")
        usable = []
        for reply in replies:
            if reply.has_error():
                continue
            problem = metrics_problem(reply.content)
            if problem is None and len(reply.content.array_records) != 1:
                problem = f"expected one ArrayRecord, got {len(reply.content.array_records)}"
            if problem is None:
                name, update = next(iter(reply.content.array_records.items()))
                update, problem = decoded_update(update, self._sent)
            if problem is None:
                reply.content[name] = update
                problem = update_problem(update, self._sent, self.max_update_norm)
            if problem is None:
                usable.append(reply)
            else:
                self.recorder.reject(server_round, reply, problem)
        keep_common_metrics(usable)
        return super().aggregate_train(server_round, usable)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        try:
            messages = self._at_precision(
                super().configure_evaluate(server_round, arrays, config, grid)
            )
        except RunDeadline:
            return []  # the round still ends (scored, checkpointed, recorded); none follows
        self.recorder.learn_names(grid)
        self.recorder.sent("evaluate", messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Any:
        server_round += self.round_offset
        replies = list(replies)
        self.recorder.received("evaluate", server_round, replies)
        usable = [r for r in replies if not r.has_error() and metrics_problem(r.content) is None]
        keep_common_metrics(usable)
        return super().aggregate_evaluate(server_round, usable)


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


def make_strategy(run: RunConfig, recorder: RoundRecorder, round_offset: int = 0) -> Strategy:
    """The run config's strategy, recording every round through ``recorder``."""
    base = STRATEGY_CLASSES[run.strategy]
    checks = {
        "recorder": recorder,
        "max_update_norm": run.max_update_norm,
        "round_offset": round_offset,
        "wire_precision": run.wire_precision,
    }
    recorded = type(f"Recorded{base.__name__}", (Recorded, base), checks)
    return recorded(
        fraction_train=run.fraction_train,
        fraction_evaluate=run.fraction_evaluate,
        min_train_nodes=run.min_nodes,
        min_evaluate_nodes=run.min_nodes,
        min_available_nodes=run.min_nodes,
        weighted_by_key=WEIGHT_KEY,
        **_strategy_options(run),
    )


class ResumeError(ValueError):
    """``resume-from`` names a run that cannot be continued; says which and why."""


RUN_CONFIG_FILE = "run_config.json"
# What may change when a run is resumed: how long it goes and waits, not what it computes.
RESUMABLE_CHANGES = {
    "resume-from",
    "num-server-rounds",
    "round-timeout",
    "run-deadline",
    "min-nodes",
    "audit-messages",
}


def checkpoint_dir(run_dir: Path, server_round: int) -> Path:
    return run_dir / "checkpoints" / f"round-{server_round}"


def checkpoint_file(run_dir: Path, server_round: int) -> Path:
    """The global model's exchanged weights after ``server_round`` (peft's adapter file)."""
    return checkpoint_dir(run_dir, server_round) / "adapter_model.safetensors"


def resume_point(run: RunConfig) -> tuple[list[RoundRecord], ArrayRecord]:
    """The rounds a dead run completed and its global model after the last of them.

    A round's line in ``rounds.jsonl`` is written after its checkpoint, so the last recorded
    round always has one. The dead run's configuration must match this one's, except for
    what only bounds the run (:data:`RESUMABLE_CHANGES`).
    """
    from safetensors.torch import load_file

    run_id = run.resume_from
    old = Path(run.output_dir) / run_id
    config_file = old / RUN_CONFIG_FILE
    if not config_file.is_file():
        raise ResumeError(f"resume-from={run_id}: {config_file} not found (no such run here?)")
    before = json.loads(config_file.read_text(encoding="utf-8"))
    now = run.to_flower()
    changed = sorted(k for k in now.keys() - RESUMABLE_CHANGES if before.get(k) != now[k])
    if changed:
        differences = ", ".join(f"{k}: {before.get(k)!r} -> {now[k]!r}" for k in changed)
        raise ResumeError(f"resume-from={run_id}: the run config differs ({differences})")
    rounds = read_rounds(old)
    if not rounds:
        raise ResumeError(f"resume-from={run_id}: {old} has no completed round to resume from")
    checkpoint = checkpoint_file(old, rounds[-1].round)
    if not checkpoint.is_file():
        raise ResumeError(f"resume-from={run_id}: checkpoint {checkpoint} is missing")
    return rounds, ArrayRecord(to_wire(load_file(checkpoint)))


class GlobalModel:
    """The server's copy of the model: evaluated on the common test set and checkpointed."""

    def __init__(self, run: RunConfig, out: Path):
        self.run = run
        self.out = out
        self.labels = run.label_list
        self.model = build_classifier(run.model, self.labels, run.lora, seed=run.seed)
        self.tokenizer = load_tokenizer(run.model)
        self.device = pick_device()
        self.test = self._encoded(run.test_set)
        self.unseen_style = self._encoded(run.unseen_style_test_set)

    def _encoded(self, path: Path | None) -> Encoded | None:
        """A test set with the frozen layers' output computed once per run: each round's
        scoring then runs only the adapted layers."""
        if path is None:
            return None
        examples = load_examples(path, self.labels)
        test = encode(examples, self.tokenizer, self.labels, self.run.max_length)
        return with_features(self.model, test, self.device, self.run.model)

    def load(self, server_round: int, arrays: ArrayRecord) -> None:
        """Take ``arrays`` as the global model after ``server_round`` and checkpoint them."""
        receive(self.model, arrays.to_torch_state_dict())
        if server_round > 0:
            self.model.save_pretrained(checkpoint_dir(self.out, server_round))

    def score(self, server_round: int) -> dict[str, float] | None:
        """The loaded model on the common test set (None without one)."""
        if self.test is None:
            return None
        metrics = evaluate(self.model, self.test, self.device)
        if self.unseen_style is not None:
            other = evaluate(self.model, self.unseen_style, self.device)
            metrics["unseen_style_accuracy"] = other["accuracy"]
            metrics["unseen_style_top3_accuracy"] = other["top3_accuracy"]
        log.info(
            "round %d: test accuracy %.3f (top-3 %.3f), macro-F1 %.3f, unseen style %s",
            server_round,
            metrics["accuracy"],
            metrics["top3_accuracy"],
            metrics["macro_f1"],
            metrics.get("unseen_style_accuracy", "n/a"),
        )
        return metrics

    def save_final(self) -> Path:
        return save_model(self.model, self.tokenizer, self.out / "final", self.run.model)


class GlobalGenerator(GlobalModel):
    """The generative track's global model: scored on the common test cards each round."""

    def __init__(self, run: RunConfig, out: Path):
        self.run = run
        self.out = out
        self.model = build_generator(run.generator, run.lora, seed=run.seed)
        self.tokenizer = load_generator_tokenizer(run.generator)
        self.device = pick_device()
        self.test = load_flashcards(run.test_set) if run.test_set else None

    def score(self, server_round: int) -> dict[str, float] | None:
        if self.test is None:
            return None
        metrics = score_generator(self.model, self.tokenizer, self.test, self.run, self.device)
        log.info(
            "round %d: test exact match %.3f, token-F1 %.3f, perplexity %.2f",
            server_round,
            metrics.get("exact_match", math.nan),
            metrics.get("token_f1", math.nan),
            metrics["perplexity"],
        )
        return metrics

    def save_final(self) -> Path:
        """The adapter and its tokenizer (``final/adapter``): what `peft` loads on the base
        model its config names (the run's ``generator``), a few MB instead of the model."""
        final = self.out / "final"
        self.model.save_pretrained(final / "adapter")
        self.tokenizer.save_pretrained(final / "adapter")
        return final


def global_model_for(run: RunConfig, out: Path) -> GlobalModel:
    return GlobalGenerator(run, out) if run.track == "generative" else GlobalModel(run, out)


class ServerRun:
    """One run at the consortium: rounds through the strategy, the record written as they end.

    With ``resume-from`` it continues a dead run: that run's rounds are copied into this run's
    record, its last checkpoint is the starting model, and only the rounds left are done.
    """

    def __init__(self, run: RunConfig, run_id: int):
        self.run = run
        self.run_id = run_id
        self.out = Path(run.output_dir) / str(run_id)
        self.recorder = RoundRecorder(self.out, audit=run.audit_messages)
        self.scores: dict[int, dict[str, float] | None] = {}
        self._scorer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="federimed-scoring")
        self._scoring: Future | None = None
        self.resumed: tuple[list[RoundRecord], ArrayRecord] | None = None
        if run.resume_from:
            self.resumed = resume_point(run)
            done = self.resumed[0][-1].round
            if done >= run.num_server_rounds:
                raise ResumeError(
                    f"resume-from={run.resume_from}: it completed {done} round(s), "
                    f"num-server-rounds is {run.num_server_rounds}: nothing is left to do"
                )
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / RUN_CONFIG_FILE).write_text(json.dumps(run.to_flower(), indent=2))
        self.global_model = global_model_for(run, self.out)
        self.offset = 0
        if self.resumed is not None:
            rounds, _ = self.resumed
            self.offset = rounds[-1].round
            for record in rounds:
                append_round(self.out, record)
                self.scores[record.round] = record.test.model_dump() if record.test else None

    def _end_of_round(self, flower_round: int, arrays: ArrayRecord) -> None:
        """Flower calls this before its round 1 and as the last step of every round.

        The global model is checkpointed and the round's record closed here; scoring the model
        on the common test set (seconds of CPU on a small server) runs beside the next round,
        whose hospitals spend its first seconds starting up, and then appends the round's line.
        The next call waits for it: a model is not replaced while it is scored, and the lines
        stay in round order."""
        server_round = flower_round + self.offset
        self.wait_for_scoring()
        self.global_model.load(server_round, arrays)
        record = self.recorder.close(server_round) if flower_round else None
        if flower_round == 0:
            self.recorder.restart_clock()  # round 1's time starts now, not with the server
            if self.offset:
                return  # a resumed checkpoint: its run scored it
        self._scoring = self._scorer.submit(self._score, server_round, record)

    def _score(self, server_round: int, record: RoundRecord | None) -> None:
        scores = self.global_model.score(server_round)
        self.scores[server_round] = scores
        if record is not None:
            self.recorder.write(record, scores)

    def wait_for_scoring(self) -> None:
        """Until the last round handed to the scoring thread is scored and recorded (its
        failure is raised here)."""
        if self._scoring is not None:
            scoring, self._scoring = self._scoring, None
            scoring.result()

    def _initial_arrays(self, seeded: ArrayRecord) -> ArrayRecord:
        if self.resumed is None:
            return seeded
        self.scores[0] = self.global_model.score(0)  # the seeded model, as the first run saw it
        return self.resumed[1]

    def start(self, grid: Grid) -> RunSummary:
        started = time.monotonic()
        seeded = ArrayRecord(to_wire(exchanged_state(self.global_model.model)))
        strategy = make_strategy(self.run, self.recorder, round_offset=self.offset)
        deadline = started + self.run.run_deadline if self.run.run_deadline else math.inf
        grid = DeadlineGrid(grid, deadline)
        status = "completed"
        try:
            strategy.start(
                grid=grid,
                initial_arrays=self._initial_arrays(seeded),
                num_rounds=self.run.num_server_rounds - self.offset,
                timeout=self.run.round_timeout,
                evaluate_fn=self._end_of_round,
            )
        except RunDeadline:
            status = "deadline"
            log.warning(
                "run-deadline of %g s passed: the run ends after round %d",
                self.run.run_deadline,
                max(self.scores, default=0),
            )
        except Exception as error:
            self._scorer.shutdown(wait=True)  # the rounds already done, recorded
            done = len(read_rounds(self.out))
            write_failure(self.out, RunFailure(run_id=self.run_id, reason=str(error),
                                               rounds_completed=done))  # fmt: skip
            raise
        finally:
            self._scorer.shutdown(wait=True)  # the last round's score, even when a round failed
        self.wait_for_scoring()
        final = self.global_model.save_final()
        trainable, total = count_parameters(self.global_model.model)
        last = max(self.scores, default=0)
        summary = RunSummary(
            run_id=self.run_id,
            status=status,
            run_config=self.run.to_flower(),
            rounds_completed=last,
            resumed_from=self.run.resume_from or None,
            updates_rejected=self.recorder.rejected_total,
            initial_test=self.scores.get(0),
            final_test=self.scores.get(last),
            update_bytes=record_bytes(as_sent(seeded, self.run.wire_precision)),
            trainable_parameters=trainable,
            total_parameters=total,
            final_model=str(final),
            wall_seconds=time.monotonic() - started,
        )
        write_summary(self.out, summary)
        write_provenance(final, self.run, summary, read_rounds(self.out))
        return summary

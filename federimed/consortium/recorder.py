"""The round record: who was sampled, who answered, what each reported, the bytes each way.

Flower's strategies aggregate client metrics into one number per round; the record needs them
per hospital, so :class:`RoundRecorder` notes every message the strategy sends and every reply
it gets, and appends the round to ``rounds.jsonl`` when it ends.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid

from federimed.consortium.checks import hospital_name, record_bytes
from federimed.runrecord import (
    RoundRecord,
    Scores,
    Traffic,
    append_round,
)

log = logging.getLogger("flwr.federimed.server")


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
        # when the train tasks left, and replies were in
        self.sent_at: float | None = None
        self.replied_at: float | None = None
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
            arrays = message.content.array_records.get("arrays")
            if arrays is not None:
                self._traffic(node_id)["bytes_down"] += record_bytes(arrays)

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
            node = content.config_records.get("node", ConfigRecord())
            claimed = node.get("hospital")
            if claimed is not None and claimed != hospital:
                log.warning("node %s (enrolled as %s) says it is %r", node_id, hospital, claimed)
            epsilon = node.get("epsilon")
            if isinstance(epsilon, float):
                self.epsilon[hospital] = epsilon
            metrics = next(iter(content.metric_records.values()), MetricRecord())
            # numbers only: a list-valued metric (which Flower allows) is no per-hospital figure
            self.replied[kind][hospital] = {
                k: float(v) for k, v in metrics.items() if isinstance(v, int | float)
            }
            arrays = content.array_records.get("arrays")
            if arrays is not None:
                self._traffic(node_id)["bytes_up"] += record_bytes(arrays)
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
        if self.audit_dir is None:
            return
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

    def in_name_order(self, replies: list[Message]) -> list[Message]:
        """``replies`` ordered by the hospital each came from: float sums depend on their
        order, and replies arrive in a different order every run, so this makes a run's
        global model the same to the bit every time (node ids change with each enrolment,
        names do not)."""
        return sorted(replies, key=lambda reply: self._name(reply.metadata.src_node_id))

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

"""The run config's Flower strategy, wrapped so every message passes the recorder and the
update checks (:mod:`federimed.consortium.checks`) before it is aggregated."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Strategy,
)

from federimed.consortium.checks import (
    WEIGHT_KEY,
    as_sent,
    decoded_update,
    keep_common_metrics,
    metrics_problem,
    update_problem,
)
from federimed.consortium.grid import RunDeadline
from federimed.consortium.recorder import RoundRecorder
from federimed.learning import wire
from federimed.runconfig import RunConfig


def _refused(reply: Message) -> bool:
    """An error from a hospital that is there (a policy refusal, a failing app)."""
    return reply.has_error() and reply.error.code != ErrorCode.NODE_UNAVAILABLE


if TYPE_CHECKING:
    _Strategy = FedAvg  # what the type checker holds the mixin's ``super()`` calls against
else:
    _Strategy = object


class Recorded(_Strategy):
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
            sent = as_sent(messages[0].content.array_records["arrays"], self.wire_precision)
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
        if self._sent is None:
            raise RuntimeError(f"round {server_round}: replies aggregated before any was asked")
        usable = []
        for reply in replies:
            if reply.has_error():
                continue
            problem = self._problem(reply, self._sent)
            if problem is None:
                usable.append(reply)
            else:
                self.recorder.reject(server_round, reply, problem)
        usable = self.recorder.in_name_order(usable)
        keep_common_metrics(usable)
        return super().aggregate_train(server_round, usable)

    def _problem(self, reply: Message, sent: ArrayRecord) -> str | None:
        """Why ``reply`` must not be aggregated into the model ``sent``, or None (its update
        then decoded in place: the weights it stands for)."""
        problem = metrics_problem(reply.content)
        if problem is not None:
            return problem
        if len(reply.content.array_records) != 1:
            return f"expected one ArrayRecord, got {len(reply.content.array_records)}"
        name, received = next(iter(reply.content.array_records.items()))
        update, problem = decoded_update(received, sent)
        if update is None:
            return problem
        reply.content[name] = update
        return update_problem(update, sent, self.max_update_norm)

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
        usable = self.recorder.in_name_order(usable)
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

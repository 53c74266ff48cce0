"""Tuned baselines: each method's learning rate picked on its own validation data from a small
grid, and training stopped when validation stops improving (with a cap).

An equal budget alone can favour one method (a pooled model given the federation's total steps
may be under-trained, or over-trained, at the federation's learning rate); a researcher trusts
the comparison once every method had its own best shot.  Every method gets the same plan, the
same early stopping and the same training code (:func:`federimed.training.train`); what differs
is the data each may see, and for the federation that it only ever averages hospitals' updates.

The federation is tuned in one process (:func:`fedavg_round`): the same FedAvg arithmetic,
hospital batches and seeds as the real ClientApps, without starting a federation per trial.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from federimed import wire
from federimed.batching import Encoded
from federimed.model import exchanged_state, from_wire, load_exchanged_state, to_wire
from federimed.runconfig import TrainSettings
from federimed.training import evaluate, train

# Learning rates tried, as multiples of the run's (the demo's 0.005 gives 0.002, 0.005, 0.0125).
GRID_FACTORS = (0.4, 1.0, 2.5)
PATIENCE = 2  # validation checks without improvement before a trial stops
CAP_FACTOR = 2  # a trial never runs more than this times the equal budget


@dataclass(frozen=True)
class TuningPlan:
    """``check_every`` and ``cap`` count steps, or rounds for the federation."""

    learning_rates: tuple[float, ...]
    check_every: int
    cap: int
    patience: int = PATIENCE

    @classmethod
    def around(cls, learning_rate: float, check_every: int, budget: int) -> TuningPlan:
        """The grid around ``learning_rate``, checks every ``check_every``, the cap at
        CAP_FACTOR times the equal ``budget``."""
        rates = tuple(round(learning_rate * f, 6) for f in GRID_FACTORS)
        return cls(rates, check_every, max(check_every, CAP_FACTOR * budget))


@dataclass
class Tuned:
    """The chosen trial: its learning rate, where its best validation score was (``best_at``,
    the budget the tuned model used) and how far it ran; every trial's best score."""

    learning_rate: float
    best_at: int
    ran: int
    capped: bool  # still improving when the cap stopped it
    validation_accuracy: float
    trials: dict[str, float] = field(default_factory=dict)  # learning rate -> best accuracy
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self) | {"seconds": round(self.seconds, 1)}


Advance = Callable[[torch.nn.Module, float, int], None]  # (model, learning rate, check index)
Validate = Callable[[torch.nn.Module], tuple[float, float]]  # higher is better


def early_stopped(
    fresh: Callable[[], torch.nn.Module], advance: Advance, validate: Validate, plan: TuningPlan
) -> tuple[OrderedDict[str, torch.Tensor], Tuned]:
    """Every learning rate of ``plan``, each on a fresh model; returns the best checkpoint over
    all trials (its exchanged weights; the first trial wins a tie) and how it was found."""
    started = time.monotonic()
    best, trials = None, {}
    for rate in plan.learning_rates:
        key, state, found = _trial(fresh(), rate, advance, validate, plan)
        trials[str(rate)] = key[0]
        if best is None or key > best[0]:
            best = key, state, found
    _, state, chosen = best
    chosen.trials, chosen.seconds = trials, time.monotonic() - started
    return state, chosen


def _trial(
    model: torch.nn.Module, rate: float, advance: Advance, validate: Validate, plan: TuningPlan
) -> tuple[tuple[float, float], OrderedDict[str, torch.Tensor], Tuned]:
    """One learning rate: ``model`` advanced ``check_every`` at a time and validated after
    each, until ``patience`` checks bring no improvement or the cap; its best validation key,
    the weights there, and where that was."""
    best_key, best_state, best_at, done, since = None, None, 0, 0, 0
    for check in range(1, plan.cap // plan.check_every + 1):
        advance(model, rate, check)
        done = check * plan.check_every
        key = validate(model)
        if best_key is None or key > best_key:
            best_key, best_state, best_at, since = key, exchanged_state(model), done, 0
        else:
            since += 1
            if since >= plan.patience:
                break
    capped = since < plan.patience
    return best_key, best_state, Tuned(rate, best_at, done, capped, best_key[0])


def validation_key(model: torch.nn.Module, data: Encoded, device: torch.device):
    """Accuracy first, lower loss on ties: the checkpoint a clinician would be given."""
    metrics = evaluate(model, data, device)
    return metrics["accuracy"], -metrics["loss"]


class WireInProcess:
    """What the network does to the weights in a ``wire-precision`` run, in one process: the
    server's float32 model sent at that precision, each hospital's update quantized with its own
    error feedback (as its guard does) and added back to the server's float32 model."""

    def __init__(self, precision: wire.Precision):
        self.precision = precision
        self.feedback: dict[str, wire.ErrorFeedback] = {}

    def sent(self, model: torch.nn.Module, master: Mapping[str, torch.Tensor]):
        if self.precision == "float32":
            return master
        arrays = wire.encode(_flat(master), self.precision)
        return from_wire(model, {n: torch.from_numpy(a) for n, a in arrays.items()})

    def replied(self, model, hospital: str, master, start, trained):
        if self.precision == "float32":
            return trained
        feedback = self.feedback.setdefault(hospital, wire.ErrorFeedback())
        next_round = max(feedback.residuals, default=0) + 1
        update = feedback.encode(_flat(start), _flat(trained), next_round)
        weights = wire.apply_update(update, _flat(master))
        return from_wire(model, {wire.WIRE_ARRAY: torch.from_numpy(weights)})


def _flat(state: Mapping[str, torch.Tensor]) -> np.ndarray:
    return to_wire(state)[wire.WIRE_ARRAY].numpy()


def fedavg_round(
    model: torch.nn.Module,
    hospitals: Mapping[str, Encoded],
    settings: Callable[[str], TrainSettings],
    device: torch.device,
    network: WireInProcess | None = None,
) -> None:
    """One FedAvg round in one process: each hospital trains from the global weights on its own
    data with its ``settings(name)``; ``model`` ends with the average weighted by examples,
    as the ServerApp's strategy computes it (through ``network``'s precision when given)."""
    network = network or WireInProcess("float32")
    master = exchanged_state(model)
    start = network.sent(model, master)
    total, summed = 0, OrderedDict()
    for name, data in hospitals.items():
        load_exchanged_state(model, start)
        train(model, data, settings(name), device)
        total += len(data)
        trained = network.replied(model, name, master, start, exchanged_state(model))
        for key, value in trained.items():
            summed[key] = summed.get(key, 0) + value * len(data)
    load_exchanged_state(model, OrderedDict((k, v / total) for k, v in summed.items()))


def pooled_validation(
    model: torch.nn.Module, validation: Mapping[str, Encoded], device: torch.device
):
    """The federation's view of its validation: each hospital scores the model on its own
    validation data and only the scores are averaged, weighted by the number of cases."""
    keys = [(validation_key(model, data, device), len(data)) for data in validation.values()]
    weights = np.array([n for _, n in keys], dtype=float)
    return tuple(float(np.dot([k[i] for k, _ in keys], weights) / weights.sum()) for i in (0, 1))

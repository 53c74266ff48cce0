"""Tuned baselines: each method's equal-budget run stopped early, or continued at its own
learning rate or a lower one, whichever its own validation data prefers (with a cap).

An equal budget alone can favour one method (a pooled model given the federation's total steps
may be under-trained, or over-trained, at the federation's learning rate); a researcher trusts
the comparison once every method had its own best shot.  Every method gets the same search,
the same early stopping and the same training code (:func:`federimed.learning.training.train`); what
differs is the data each may see, and for the federation that it only ever averages hospitals'
updates.

The search starts warm: the equal-budget run is validated after each of its rounds (the
federation's own checkpoints, or local and centralized training after each round's worth of
steps), so the tuned model can be any of its checkpoints, and from its end the training
continues at each rate of ``CONTINUE_FACTORS`` while validation improves.  Why these:
- From scratch at 0.4, 1 and 2.5 times the run's rate (this module before), the grid's lowest
  rate won all 15 tunings of seeds 0-2 and the highest lost all 15, by 4 to 70 points of
  validation accuracy; the searches took 288 s of the demo's 469.
- Warm, with continuations at 1 and 0.4 times the rate, the one at the run's rate beat the
  step down in none of the 15 tunings of seeds 0-2 (once a tie, which the validation loss
  broke for the step down): it only cost time, so the step down alone is kept.  Each
  continuation starts from the same weights with its own batches, so dropping one changes no
  other's result (docs/results.md, ``bench/results.py``).

The federation is continued in one process (:func:`fedavg_round`): the same FedAvg arithmetic,
hospital batches and seeds as the real ClientApps, without starting a federation per trial.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from federimed.learning import wire
from federimed.learning.batching import Encoded
from federimed.learning.model import exchanged_state, from_wire, load_exchanged_state, to_wire
from federimed.learning.training import evaluate, train
from federimed.runconfig import TrainSettings

# Learning rates the training continues at after the equal budget, as multiples of the run's
# (the demo's 0.005 gives 0.002).
CONTINUE_FACTORS = (0.4,)
PATIENCE = 2  # validation checks without improvement before a continuation stops
CAP_FACTOR = 2  # a tuned run never trains more than this times the equal budget

State = OrderedDict[str, torch.Tensor]


@dataclass(frozen=True)
class TuningPlan:
    """``budget`` and the cap count checks; ``check_every`` says how many steps (or, for the
    federation, rounds) one check is."""

    learning_rate: float
    check_every: int
    budget: int
    factors: tuple[float, ...] = CONTINUE_FACTORS
    patience: int = PATIENCE
    cap_factor: int = CAP_FACTOR

    @property
    def cap(self) -> int:
        return self.cap_factor * self.budget

    @property
    def continued_rates(self) -> tuple[float, ...]:
        return tuple(round(self.learning_rate * f, 6) for f in self.factors)


@dataclass
class Tuned:
    """The chosen checkpoint: the learning rate it was trained at last (the run's when it lies
    within the equal budget), where it was (``best_at``, the budget the tuned model used) and
    how far the search ran, in steps (rounds for the federation); the best validation accuracy
    of the equal-budget run and of each continuation."""

    learning_rate: float
    best_at: int
    ran: int
    capped: bool  # the chosen continuation was still improving when the cap stopped it
    validation_accuracy: float
    trials: dict[str, float] = field(default_factory=dict)  # "equal budget" or a rate -> best
    seconds: float = 0.0  # the search, the equal-budget run included
    equal_budget_seconds: float = 0.0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self) | {
            "seconds": round(self.seconds, 1),
            "equal_budget_seconds": round(self.equal_budget_seconds, 1),
        }


@dataclass
class Searched:
    """What the search leaves: the model at the end of the equal budget (the equal-budget
    baseline itself), the tuned checkpoint, and how it was found."""

    equal_budget: State
    tuned: State
    found: Tuned


Advance = Callable[[torch.nn.Module, float, int], None]  # (model, learning rate, check index)
Validate = Callable[[torch.nn.Module], tuple[float, float]]  # higher is better


class _Best:
    """The best validation key offered so far (the first one wins a tie) and where it was."""

    def __init__(self) -> None:
        self.key: tuple[float, float] | None = None
        self.state: State | None = None
        self.check, self.rate = 0, 0.0

    def offer(self, key, model: torch.nn.Module, check: int, rate: float) -> bool:
        if self.key is not None and key <= self.key:
            return False
        self.key, self.state, self.check, self.rate = key, exchanged_state(model), check, rate
        return True


def warm_started(
    model: torch.nn.Module,
    advance: Advance,
    validate: Validate,
    plan: TuningPlan,
    equal_budget: Iterable[Mapping[str, torch.Tensor]] | None = None,
    restart: Callable[[], None] = lambda: None,
) -> Searched:
    """The search on ``model`` (fresh): the equal-budget run, trained with ``advance`` at the
    plan's rate (or, given ``equal_budget``, its states after each check, as a real federation
    left them) and validated after each check; then from its end one continuation per rate of
    the plan, each stopped after ``patience`` checks that bring no improvement on the best of
    that continuation (its start included) or at the cap.  ``restart`` is called before each
    stretch of training that starts from loaded weights (a federation's hospitals start their
    error feedback anew)."""
    started = time.monotonic()
    best, end_key = _Best(), None
    if equal_budget is None:
        restart()
        for check in range(1, plan.budget + 1):
            advance(model, plan.learning_rate, check)
            end_key = validate(model)
            best.offer(end_key, model, check, plan.learning_rate)
    else:
        for check, state in enumerate(equal_budget, start=1):
            load_exchanged_state(model, state)
            end_key = validate(model)
            best.offer(end_key, model, check, plan.learning_rate)
    if best.key is None or end_key is None:
        raise ValueError("the equal-budget run has no checkpoint to start the search from")
    end, budget_seconds = exchanged_state(model), time.monotonic() - started
    trials, ran, capped = {"equal budget": best.key[0]}, plan.budget, False
    for rate in plan.continued_rates:
        load_exchanged_state(model, end)
        restart()
        segment_best, since = end_key, 0  # only its key: the weights worth keeping are best's
        for check in range(plan.budget + 1, plan.cap + 1):
            advance(model, rate, check)
            ran = max(ran, check)
            key = validate(model)
            best.offer(key, model, check, rate)
            if key > segment_best:
                segment_best, since = key, 0
            else:
                since += 1
            if since >= plan.patience:
                break
        trials[str(rate)] = segment_best[0]
        if best.rate == rate and best.check > plan.budget:
            capped = since < plan.patience
    found = Tuned(
        learning_rate=best.rate,
        best_at=best.check * plan.check_every,
        ran=ran * plan.check_every,
        capped=capped,
        validation_accuracy=best.key[0],
        trials=trials,
        seconds=time.monotonic() - started,
        equal_budget_seconds=budget_seconds,
    )
    return Searched(end, best.state or end, found)


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
    total, summed = 0, OrderedDict[str, torch.Tensor]()
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

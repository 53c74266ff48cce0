"""Record-level differential privacy: what a run's DP-SGD costs a hospital, as ε at its δ.

The training (:func:`federimed.learning.training.train`) clips each case's gradient to ``C`` and
adds Gaussian noise of standard deviation ``σ·C`` to their sum at every step, on a batch drawn by
Poisson sampling: each case joins a step's batch with probability ``q = batch size / cases``,
independently.  That is the mechanism the standard RDP analysis of DP-SGD bounds (Abadi et
al. 2016; Mironov et al. 2019), so the accountant here composes exactly that event:
``PoissonSampledDpEvent(q, GaussianDpEvent(σ))`` once per local step, over every round the
hospital trained in, with Google's ``dp-accounting`` (the library Flower's ``[dp]`` extra
uses).  Neighbouring datasets differ by one case (add or remove).

The guard at the hospital's SuperNode (:mod:`federimed.hospital.guard`) computes ε from the
task's own numbers and the hospital's own case count before a task runs, refuses what the
hospital's budget does not allow, and ledgers what each reply spent; ``federimed privacy
show`` reads it back.  Only the training records are covered: the validation cases a model is
scored on, and the number of cases a hospital has, are not.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the policy module reads YAML; this one is imported by the guard too
    from federimed.hospital.policy import SitePolicy

# dp-accounting logs a warning for every Rényi order whose series does not converge at small
# alphas (it then leaves that order out); these orders avoid them, from 1.5 up, as Opacus does.
RDP_ORDERS = (
    *(1 + x / 10.0 for x in range(5, 10)),
    *range(2, 64),
    128.0,
    256.0,
    512.0,
)


@dataclass(frozen=True)
class Mechanism:
    """One hospital's DP-SGD in one run: everything its ε depends on."""

    noise_multiplier: float  # σ: the noise's standard deviation over the clip norm
    sample_rate: float  # q: the chance that one case joins one step's batch
    steps_per_round: int  # local steps in one training round

    @classmethod
    def for_hospital(
        cls, noise_multiplier: float, batch_size: int, cases: int, steps: int
    ) -> Mechanism:
        """A hospital with ``cases`` training cases samples each with ``batch_size / cases``."""
        if cases <= 0:
            raise ValueError("a hospital with no training cases has no privacy to account")
        return cls(noise_multiplier, min(1.0, batch_size / cases), steps)

    @property
    def private(self) -> bool:
        return self.noise_multiplier > 0

    def epsilon(self, rounds: int, delta: float) -> float:
        """ε after ``rounds`` training rounds at ``delta`` (infinite without noise; 0 for none)."""
        if rounds <= 0:
            return 0.0
        if not self.private:
            return math.inf
        return _epsilon(
            self.noise_multiplier, self.sample_rate, self.steps_per_round * rounds, delta
        )


@lru_cache(maxsize=4096)
def _epsilon(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    orders: tuple[float, ...] = RDP_ORDERS,
) -> float:
    import dp_accounting
    from dp_accounting import rdp

    logging.getLogger("absl").setLevel(logging.ERROR)
    accountant = rdp.RdpAccountant(list(orders))
    event = dp_accounting.PoissonSampledDpEvent(
        sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
    )
    accountant.compose(event, steps)
    return float(accountant.get_epsilon(delta))


def noise_for_epsilon(
    target: float, sample_rate: float, steps: int, delta: float, tolerance: float = 0.01
) -> float:
    """The smallest σ (within ``tolerance``) whose ε after ``steps`` steps is at most
    ``target``: how a consortium turns a target ε into the run config's noise multiplier."""
    if not math.isfinite(target):
        return 0.0
    low, high = 0.0, 1.0
    while _epsilon(high, sample_rate, steps, delta) > target:
        low, high = high, high * 2
        if high > 1e4:
            raise ValueError(f"no noise multiplier reaches ε={target} in {steps} steps")
    while high - low > tolerance:
        middle = (low + high) / 2
        if _epsilon(middle, sample_rate, steps, delta) > target:
            low = middle
        else:
            high = middle
    return high


def spent_by_run(ledger_path: Path) -> dict[int, float]:
    """ε each run has spent at this hospital, summed from its ledger's training replies (a
    run that trained without noise: infinity).  Runs compose by addition (basic composition:
    a bound that holds whatever the runs were)."""
    spent: dict[int, float] = defaultdict(float)
    if not Path(ledger_path).exists():
        return {}
    with Path(ledger_path).open() as handle:
        for text in handle:
            try:
                entry = json.loads(text)
            except ValueError:
                continue  # a torn line: `ledger verify` reports it
            if entry.get("kind") != "train" or entry.get("error") is not None:
                continue
            epsilon = entry.get("epsilon")
            spent[entry.get("run_id")] += math.inf if epsilon is None else float(epsilon)
    return dict(spent)


def lifetime_spent(ledger_path: Path, excluding_run: int | None = None) -> float:
    """ε all runs but ``excluding_run`` have spent at this hospital."""
    return sum(e for run, e in spent_by_run(ledger_path).items() if run != excluding_run)


def _figure(epsilon: float) -> str:
    return "∞ (trained without DP-SGD)" if math.isinf(epsilon) else f"{epsilon:.3f}"


def _left(budget: float | None, spent: float) -> str:
    return (
        "no budget set" if budget is None else f"{max(0.0, budget - spent):.3f} left of {budget:g}"
    )


def budget_report(policy: SitePolicy) -> str:
    """What `federimed privacy show` prints: per run and in all, spent and left."""
    privacy = policy.privacy
    runs = spent_by_run(policy.ledger)
    lines = [
        f"{policy.site}: privacy budget at δ={privacy.delta:g} "
        f"(DP-SGD {'required' if privacy.required else 'not required'}; ledger {policy.ledger})"
    ]
    for run_id, spent in sorted(runs.items()):
        lines.append(f"  run {run_id}: ε {_figure(spent)}; {_left(privacy.epsilon_per_run, spent)}")
    total = sum(runs.values())
    lines.append(f"  all runs: ε {_figure(total)}; {_left(privacy.lifetime_epsilon, total)}")
    return "\n".join(lines)

"""Tuned baselines: the warm-started search over length and rate, FedAvg in one process (fast)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_run

from federimed.data.records import load_hospital
from federimed.learning.batching import encode
from federimed.learning.model import (
    build_classifier,
    exchanged_state,
    load_exchanged_state,
    load_tokenizer,
)
from federimed.learning.training import train
from federimed.research.tuning import TuningPlan, fedavg_round, pooled_validation, warm_started
from federimed.runconfig import TrainSettings

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def run(tiny_model):
    return make_run(model=tiny_model, max_length=64)


@pytest.fixture(scope="module")
def hospitals(synth_data, run):
    tokenizer = load_tokenizer(run.model)
    encoded = {}
    for name in ("hospital-1", "hospital-2"):
        data = load_hospital(synth_data / name, run.label_list)
        encoded[name] = (
            encode(data.train[: 40 if name == "hospital-1" else 24], tokenizer, run.label_list, 64),
            encode(data.validation, tokenizer, run.label_list, 64),
        )
    return encoded


def _marked(model: torch.nn.Module) -> torch.Tensor:
    return next(p for n, p in model.named_parameters() if "classifier" in n and p.requires_grad)


def _fresh(run):
    return build_classifier(run.model, run.label_list, run.lora, seed=0)


def _mark(model, rate, check):
    with torch.no_grad():
        _marked(model).fill_(rate * 1000 + check)  # the checkpoint names its rate and check


def _read(model) -> tuple[float, int]:
    value = float(_marked(model).detach().flatten()[0])
    rate = 0.1 if value >= 100 else 0.04
    return rate, round(value - rate * 1000)


def test_the_search_continues_the_equal_budget_and_keeps_the_best_checkpoint(run):
    """Scripted validation: the equal budget (3 checks at 0.1) peaks at check 2; continued at
    0.1 it never beats its start and stops after two checks; continued at 0.04 it improves
    until the cap (6 checks), whose last checkpoint is the tuned one."""
    scripted = {
        (0.1, 1): 0.2, (0.1, 2): 0.5, (0.1, 3): 0.4, (0.1, 4): 0.3, (0.1, 5): 0.35,
        (0.04, 4): 0.6, (0.04, 5): 0.7, (0.04, 6): 0.8,
    }  # fmt: skip
    seen, restarts = [], []

    def advance(model, rate, check):
        seen.append((rate, check))
        _mark(model, rate, check)

    plan = TuningPlan(0.1, check_every=5, budget=3, factors=(1.0, 0.4), patience=2)
    searched = warm_started(
        _fresh(run),
        advance,
        lambda model: (scripted[_read(model)], 0.0),
        plan,
        restart=lambda: restarts.append(len(seen)),
    )
    assert seen == [(0.1, 1), (0.1, 2), (0.1, 3), (0.1, 4), (0.1, 5), (0.04, 4), (0.04, 5),
                    (0.04, 6)]  # fmt: skip
    assert restarts == [0, 3, 5]  # before the equal budget and before each continuation
    found = searched.found
    assert found.learning_rate == 0.04 and found.best_at == 30 and found.ran == 30
    assert found.capped and found.validation_accuracy == 0.8
    assert found.trials == {"equal budget": 0.5, "0.1": 0.4, "0.04": 0.8}
    for state, expected in ((searched.equal_budget, (0.1, 3)), (searched.tuned, (0.04, 6))):
        model = _fresh(run)
        load_exchanged_state(model, state)
        assert _read(model) == expected


def test_a_real_runs_rounds_are_validated_and_an_earlier_round_can_win(run):
    """Given the real run's states, none of the equal budget is trained again; when no
    continuation beats round 2, the tuned model is round 2 at the run's rate."""
    scores = {(0.1, 1): 0.2, (0.1, 2): 0.9, (0.1, 3): 0.4}
    rounds = []
    for check in (1, 2, 3):
        model = _fresh(run)
        _mark(model, 0.1, check)
        rounds.append(exchanged_state(model))
    seen = []

    def advance(model, rate, check):
        seen.append((rate, check))
        _mark(model, rate, check)

    plan = TuningPlan(0.1, check_every=1, budget=3, factors=(0.4,), patience=1)
    searched = warm_started(
        _fresh(run), advance, lambda m: (scores.get(_read(m), 0.1), 0.0), plan, rounds
    )
    assert seen == [(0.04, 4)]
    assert searched.found.learning_rate == 0.1 and searched.found.best_at == 2
    assert not searched.found.capped and searched.found.ran == 4
    model = _fresh(run)
    load_exchanged_state(model, searched.tuned)
    assert _read(model) == (0.1, 2)


def test_the_plan_continues_at_a_step_down_and_caps_at_twice_the_budget():
    plan = TuningPlan(0.005, check_every=15, budget=6)
    assert plan.continued_rates == (0.002,)
    assert plan.cap == 12 and plan.check_every == 15


def test_fedavg_round_is_the_example_weighted_mean_of_each_hospitals_training(run, hospitals):
    model = build_classifier(run.model, run.label_list, run.lora, seed=0)
    start = exchanged_state(model)
    data = {name: train_set for name, (train_set, _) in hospitals.items()}

    def settings(name):
        return TrainSettings(steps=3, batch_size=8, learning_rate=0.01, seed=len(name))

    trained = {}
    for name, train_set in data.items():
        load_exchanged_state(model, start)
        train(model, train_set, settings(name), CPU)
        trained[name] = exchanged_state(model)
    load_exchanged_state(model, start)
    fedavg_round(model, data, settings, CPU)
    averaged = exchanged_state(model)
    sizes = {name: len(d) for name, d in data.items()}
    assert sizes == {"hospital-1": 40, "hospital-2": 24}
    for key, value in averaged.items():
        expected = sum(trained[n][key] * sizes[n] for n in data) / sum(sizes.values())
        torch.testing.assert_close(value, expected)
        assert not torch.equal(value, start[key]) or key.endswith("bias")


def test_pooled_validation_weights_each_hospitals_score_by_its_cases(run, hospitals):
    model = build_classifier(run.model, run.label_list, run.lora, seed=0)
    validation = {name: v for name, (_, v) in hospitals.items()}
    one = pooled_validation(model, {"hospital-1": validation["hospital-1"]}, CPU)
    two = pooled_validation(model, {"hospital-2": validation["hospital-2"]}, CPU)
    both = pooled_validation(model, validation, CPU)
    n1, n2 = len(validation["hospital-1"]), len(validation["hospital-2"])
    assert both[0] == pytest.approx((one[0] * n1 + two[0] * n2) / (n1 + n2))

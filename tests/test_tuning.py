"""Tuned baselines: early stopping over a learning-rate grid, FedAvg in one process (fast)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_run

from federimed.batching import encode
from federimed.data.records import load_hospital
from federimed.model import build_classifier, exchanged_state, load_exchanged_state, load_tokenizer
from federimed.runconfig import TrainSettings
from federimed.training import train
from federimed.tuning import TuningPlan, early_stopped, fedavg_round, pooled_validation

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


def test_early_stopping_keeps_the_best_checkpoint_of_the_best_rate(run):
    """Scripted validation scores: rate 0.1 peaks at check 2 and stops after two worse checks;
    rate 0.2 keeps improving until the cap; the best checkpoint is rate 0.2's last."""
    scripted = {0.1: [0.2, 0.5, 0.4, 0.3, 0.9], 0.2: [0.3, 0.6, 0.7, 0.8]}
    seen: list[tuple[float, int]] = []

    def fresh():
        return build_classifier(run.model, run.label_list, run.lora, seed=0)

    def advance(model, rate, check):
        seen.append((rate, check))
        with torch.no_grad():
            _marked(model).fill_(rate * 100 + check)  # the checkpoint names its trial and check

    def validate(model):
        value = float(_marked(model).detach().flatten()[0])
        rate = 0.1 if value < 20 else 0.2
        return scripted[rate][round(value - rate * 100) - 1], 0.0

    plan = TuningPlan((0.1, 0.2), check_every=5, cap=20, patience=2)
    state, found = early_stopped(fresh, advance, validate, plan)
    assert seen == [(0.1, 1), (0.1, 2), (0.1, 3), (0.1, 4), (0.2, 1), (0.2, 2), (0.2, 3), (0.2, 4)]
    assert found.learning_rate == 0.2 and found.best_at == 20 and found.ran == 20
    assert found.capped and found.validation_accuracy == 0.8
    assert found.trials == {"0.1": 0.5, "0.2": 0.8}
    model = fresh()
    load_exchanged_state(model, state)
    assert float(_marked(model).detach().flatten()[0]) == pytest.approx(24.0)


def test_the_plan_spans_a_grid_around_the_run_rate_and_caps_at_twice_the_budget():
    plan = TuningPlan.around(0.005, check_every=15, budget=60)
    assert plan.learning_rates == (0.002, 0.005, 0.0125)
    assert plan.cap == 120 and plan.check_every == 15


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

"""Training, evaluation and the server's bookkeeping, on a tiny model (fast)."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg

from federimed.data.records import load_hospital
from federimed.model import build_classifier, exchanged_state, load_exchanged_state, load_tokenizer
from federimed.runconfig import RunConfig
from federimed.server import RoundLog, make_strategy, record_bytes
from federimed.settings import RuntimeSettings
from federimed.training import TrainSettings, encode, evaluate, pick_device, train


@pytest.fixture(scope="module")
def hospital(synth_data, tiny_model):
    run = RunConfig(model=tiny_model, max_length=64)
    data = load_hospital(synth_data / "hospital-1", run.label_list)
    tokenizer = load_tokenizer(tiny_model)
    return run, encode(data.train, tokenizer, run.label_list, 64)


def test_training_lowers_the_loss_on_its_own_data(hospital):
    run, data = hospital
    model = build_classifier(run.model, run.label_list, run.lora)
    device = torch.device("cpu")
    before = evaluate(model, data, device)["loss"]
    train(model, data, TrainSettings(steps=40, learning_rate=5e-3, batch_size=16), device)
    assert evaluate(model, data, device)["loss"] < before - 0.2


def test_proximal_term_keeps_weights_closer_to_the_global_model(hospital):
    run, data = hospital
    drift = {}
    for mu in (0.0, 50.0):
        model = build_classifier(run.model, run.label_list, run.lora)
        start = {k: v.clone() for k, v in exchanged_state(model).items()}
        train(
            model,
            data,
            TrainSettings(steps=10, learning_rate=1e-2, proximal_mu=mu),
            torch.device("cpu"),
        )
        end = exchanged_state(model)
        drift[mu] = sum(float(((end[k] - start[k]) ** 2).sum()) for k in start)
    assert drift[50.0] < drift[0.0]


def test_same_seed_same_model_and_state_round_trips(tiny_model):
    labels = ["A", "B"]
    first = build_classifier(tiny_model, labels, RunConfig().lora, seed=3)
    second = build_classifier(tiny_model, labels, RunConfig().lora, seed=3)
    a, b = exchanged_state(first), exchanged_state(second)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="missing"):
        load_exchanged_state(second, {k: v for k, v in list(a.items())[1:]})


def test_device_selection_falls_back_to_cpu_and_refuses_missing_cuda():
    assert pick_device(RuntimeSettings(device="cpu")).type == "cpu"
    if not torch.cuda.is_available():
        assert pick_device(RuntimeSettings(device="auto")).type == "cpu"
        with pytest.raises(RuntimeError, match="FEDERIMED_DEVICE=cuda"):
            pick_device(RuntimeSettings(device="cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mixed_precision_training_on_gpu(hospital):
    run, data = hospital
    model = build_classifier(run.model, run.label_list, run.lora)
    metrics = train(model, data, TrainSettings(steps=5), torch.device("cuda"))
    assert metrics["train-loss"] > 0


def test_run_config_errors_name_the_key():
    with pytest.raises(ValueError, match="local-steps"):
        RunConfig.from_flower({"local-steps": 0})
    with pytest.raises(ValueError, match="strategy"):
        RunConfig.from_flower({"strategy": "fedwhatever"})
    with pytest.raises(ValueError, match="no-such-key"):
        RunConfig.from_flower({"no-such-key": 1})


@pytest.mark.parametrize(
    "name, cls",
    [
        ("fedavg", FedAvg),
        ("fedprox", FedProx),
        ("fedadam", FedAdam),
        ("fedmedian", FedMedian),
        ("fedtrimmedavg", FedTrimmedAvg),
    ],
)
def test_strategy_is_chosen_by_run_config(name, cls):
    strategy = make_strategy(RunConfig(strategy=name), RoundLog())
    assert type(strategy) is cls


def test_round_log_keeps_each_hospital_and_its_bytes(tmp_path):
    arrays = ArrayRecord({"w": torch.zeros(10)})
    replies = [
        RecordDict(
            {
                "arrays": arrays,
                "metrics": MetricRecord({"train-loss": loss, "num-examples": n}),
                "node": ConfigRecord({"hospital": name, "server-round": 2}),
            }
        )
        for name, loss, n in (("hospital-1", 1.0, 10), ("hospital-2", 3.0, 30))
    ]
    log = RoundLog(audit_dir=tmp_path)
    aggregated = log.train_aggregation(replies, "num-examples")
    assert aggregated["train-loss"] == pytest.approx(2.5)
    assert log.rounds[2]["train"]["hospital-2"]["train-loss"] == 3.0
    assert log.rounds[2]["bytes"]["hospital-1"]["uplink"] == record_bytes(arrays) > 40
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "round-2-train-hospital-1.bin",
        "round-2-train-hospital-2.bin",
    ]

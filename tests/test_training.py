"""Training, evaluation and the server's bookkeeping, on a tiny model (fast)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_run
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.supercore.task_identity import TaskIdentity

from federimed.consortium.checks import record_bytes
from federimed.consortium.recorder import RoundRecorder
from federimed.consortium.strategy import STRATEGY_CLASSES, make_strategy
from federimed.data.records import load_hospital
from federimed.learning import wire
from federimed.learning.batching import encode, pick_device
from federimed.learning.model import (
    build_classifier,
    exchanged_state,
    load_exchanged_state,
    load_tokenizer,
)
from federimed.learning.training import evaluate, train
from federimed.runconfig import STRATEGIES, RunConfig, TrainSettings
from federimed.runrecord import ROUNDS_FILE, RoundRecord, append_round, read_rounds
from federimed.settings import RuntimeSettings


@pytest.fixture(scope="module")
def hospital(synth_data, tiny_model):
    run = make_run(model=tiny_model, max_length=64)
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
            TrainSettings(steps=10, batch_size=16, learning_rate=1e-2, proximal_mu=mu),
            torch.device("cpu"),
        )
        end = exchanged_state(model)
        drift[mu] = sum(float(((end[k] - start[k]) ** 2).sum()) for k in start)
    assert drift[50.0] < drift[0.0]


def test_same_seed_same_model_and_state_round_trips(tiny_model):
    labels = ["A", "B"]
    first = build_classifier(tiny_model, labels, make_run().lora, seed=3)
    second = build_classifier(tiny_model, labels, make_run().lora, seed=3)
    a, b = exchanged_state(first), exchanged_state(second)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="missing"):
        load_exchanged_state(second, {k: v for k, v in list(a.items())[1:]})


def test_exchanged_state_is_a_snapshot_that_later_training_leaves_alone(hospital):
    run, data = hospital
    model = build_classifier(run.model, run.label_list, run.lora)
    sent = exchanged_state(model)
    kept = {k: v.clone() for k, v in sent.items()}
    train(
        model, data, TrainSettings(steps=3, batch_size=16, learning_rate=1e-2), torch.device("cpu")
    )
    assert all(torch.equal(sent[k], kept[k]) for k in sent)
    assert not all(torch.equal(exchanged_state(model)[k], kept[k]) for k in kept)


def test_encoder_dropout_is_off_unless_the_run_keeps_it_and_training_is_then_repeatable(hospital):
    run, data = hospital

    def encoder_dropout(model) -> set[float]:
        return {
            m.p
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Dropout) and "lora" not in n
        }

    kept = build_classifier(
        run.model, run.label_list, make_run(model=run.model, encoder_dropout=True).lora
    )
    assert max(encoder_dropout(kept)) > 0  # the tiny model's config has dropout to switch off
    updates = []
    for _ in range(2):
        model = build_classifier(run.model, run.label_list, run.lora)
        assert encoder_dropout(model) == {0.0}
        train(
            model,
            data,
            TrainSettings(steps=3, batch_size=16, learning_rate=1e-2),
            torch.device("cpu"),
        )
        updates.append(exchanged_state(model))
    assert all(torch.equal(updates[0][k], updates[1][k]) for k in updates[0])


def test_device_selection_falls_back_to_cpu_and_refuses_missing_cuda():
    assert pick_device(RuntimeSettings(device="cpu")).type == "cpu"
    if not torch.cuda.is_available():
        assert pick_device(RuntimeSettings(device="auto")).type == "cpu"
        with pytest.raises(RuntimeError, match="FEDERIMED_DEVICE=cuda"):
            pick_device(RuntimeSettings(device="cuda"))


def test_full_precision_can_be_asked_for_on_gpus():
    """FEDERIMED_PRECISION=fp32 turns autocast off on CUDA too (bench/gpu_check.py compares)."""
    import contextlib

    from federimed.learning.batching import autocast, mixed_precision

    pick_device(RuntimeSettings(device="cpu", precision="fp32"))
    assert isinstance(autocast(torch.device("cuda")), contextlib.nullcontext)
    assert not mixed_precision()
    pick_device(RuntimeSettings(device="cpu"))
    assert mixed_precision()
    with pytest.raises(ValueError, match="precision"):
        RuntimeSettings(precision="fp16")


@pytest.mark.parametrize("hardware", [True, False])
def test_cpus_with_bf16_in_hardware_compute_in_bf16_unless_fp32_is_asked_for(monkeypatch, hardware):
    from federimed.learning import batching

    monkeypatch.setattr(batching, "native_cpu_bf16", lambda: hardware)
    cpu = torch.device("cpu")
    pick_device(RuntimeSettings(device="cpu"))
    with batching.autocast(cpu):
        assert torch.is_autocast_enabled("cpu") is hardware
        product = torch.ones(4, 4) @ torch.ones(4, 4)
    assert product.dtype == (torch.bfloat16 if hardware else torch.float32)
    assert batching.precision_name(cpu) == ("bf16" if hardware else "fp32")
    pick_device(RuntimeSettings(device="cpu", precision="fp32"))
    with batching.autocast(cpu):
        assert not torch.is_autocast_enabled("cpu")
    assert batching.precision_name(cpu) == "fp32"


def test_bf16_training_on_cpu_keeps_float32_weights_and_learns_as_float32_does(
    monkeypatch, hospital
):
    """The same steps from the same start: bf16 products, float32 weights and updates, a loss
    within a few percent of float32's (bench/cpu_precision.py measures accuracy and speed)."""
    from federimed.learning import batching

    run, data = hospital
    settings = TrainSettings(steps=8, batch_size=16, learning_rate=5e-3)
    losses = {}
    for hardware in (False, True):
        monkeypatch.setattr(batching, "native_cpu_bf16", lambda hardware=hardware: hardware)
        device = pick_device(RuntimeSettings(device="cpu"))
        model = build_classifier(run.model, run.label_list, run.lora, seed=0)
        before = {k: v.clone() for k, v in exchanged_state(model).items()}
        losses[hardware] = train(model, data, settings, device)["train_loss"]
        after = exchanged_state(model)
        assert all(v.dtype == torch.float32 for v in after.values())
        assert any(not torch.equal(before[k], after[k]) for k in after)
    assert losses[True] == pytest.approx(losses[False], rel=0.05)
    assert losses[True] != losses[False]  # the products really ran in bf16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mixed_precision_training_on_gpu(hospital):
    run, data = hospital
    model = build_classifier(run.model, run.label_list, run.lora)
    metrics = train(
        model, data, TrainSettings(steps=5, batch_size=16, learning_rate=5e-3), torch.device("cuda")
    )
    assert metrics["train_loss"] > 0


def test_run_config_errors_name_the_key():
    complete = make_run().to_flower()
    with pytest.raises(ValueError, match="local-steps"):
        RunConfig.from_flower({**complete, "local-steps": 0})
    with pytest.raises(ValueError, match=r"strategy.*fedavg"):
        RunConfig.from_flower({**complete, "strategy": "fedwhatever"})
    with pytest.raises(ValueError, match=r"track: .*no such track \(known: classify, generative\)"):
        RunConfig.from_flower({**complete, "track": "translate"})
    with pytest.raises(ValueError, match=r"no-such-key.*allowed keys: track, generator, .*model"):
        RunConfig.from_flower({**complete, "no-such-key": 1})
    missing = dict(complete)
    del missing["seed"]
    with pytest.raises(ValueError, match="seed: missing"):
        RunConfig.from_flower(missing)


@pytest.mark.parametrize("name, cls", STRATEGY_CLASSES.items())
def test_strategy_is_chosen_by_run_config(name, cls, tmp_path):
    strategy = make_strategy(make_run(strategy=name), RoundRecorder(tmp_path))
    assert isinstance(strategy, cls)


def test_every_strategy_choice_has_a_class():
    assert set(STRATEGIES) == set(STRATEGY_CLASSES)


class _Grid:
    """What a strategy asks of Flower's Grid: the online nodes and the names they enrolled as."""

    def __init__(self, names=None):
        self.names = names or {11: "hospital-1", 12: "hospital-2", 13: "../hospital-3"}

    def get_node_ids(self):
        return list(self.names)

    def get_nodes(self):
        return [NodeInfo(node_id=n, name=name) for n, name in self.names.items()]


def test_round_record_names_participants_dropped_bytes_and_metrics(tmp_path):
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # as in a ServerApp
    strategy = make_strategy(make_run(min_nodes=3), RoundRecorder(tmp_path, audit=True))
    arrays = ArrayRecord({"w": torch.zeros(10)})
    sent = list(strategy.configure_train(1, arrays, ConfigRecord(), _Grid()))
    sent.sort(key=lambda m: m.metadata.dst_node_id)
    assert sorted(m.metadata.dst_node_id for m in sent) == [11, 12, 13]
    replies = [
        Message(
            RecordDict(
                {
                    "arrays": ArrayRecord({"w": torch.full((10,), value)}),
                    "metrics": MetricRecord({"train_loss": value, "num_examples": n}),
                    "node": ConfigRecord({"hospital": name, "server-round": 1}),
                }
            ),
            reply_to=message,
        )
        for message, name, value, n in zip(
            sent[:2], ("hospital-1", "hospital-2"), (1.0, 3.0), (10, 30), strict=False
        )
    ]
    replies[0].content["node"]["hospital"] = "hospital-2"  # a claim is not an identity
    aggregated, metrics = strategy.aggregate_train(1, replies)
    assert aggregated["w"].numpy()[0] == pytest.approx(2.5)
    assert metrics["train_loss"] == pytest.approx(2.5)
    test = {"accuracy": 0.5, "macro_f1": 0.4, "loss": 1.2, "num_examples": 20}
    strategy.recorder.write(strategy.recorder.close(1), test)

    (record,) = read_rounds(tmp_path)
    silent = "node-13"  # enrolled under a name that is no safe path component
    assert record.participants == ["hospital-1", "hospital-2"]
    assert record.dropped == [silent]
    assert record.train["hospital-2"] == {"train_loss": 3.0, "num_examples": 30.0}
    assert record.test.accuracy == 0.5
    size = record_bytes(arrays)
    assert record.traffic["hospital-1"].bytes_down == size > 40
    assert record.traffic["hospital-1"].bytes_up == size
    assert record.traffic[silent].bytes_up == 0
    assert sorted(p.name for p in (tmp_path / "audit").iterdir()) == [
        "round-1-train-hospital-1.bin",
        "round-1-train-hospital-2.bin",
    ]


def test_an_int8_run_sends_8_bit_weights_and_averages_the_hospitals_changes_in_float32(tmp_path):
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    run = make_run(min_nodes=2, wire_precision="int8")
    strategy = make_strategy(run, RoundRecorder(tmp_path))
    model = torch.linspace(-1, 1, 20_000)
    arrays = ArrayRecord({wire.WIRE_ARRAY: model})
    sent = list(strategy.configure_train(1, arrays, ConfigRecord(), _Grid()))
    sent.sort(key=lambda m: m.metadata.dst_node_id)
    (weights,) = {m.content["arrays"][wire.WIRE_ARRAY].numpy().tobytes() for m in sent}
    received = wire.decode({wire.WIRE_ARRAY: np.frombuffer(weights, dtype=np.int8)})
    assert np.abs(received - model.numpy()).max() <= 1 / 127 / 2 + 1e-7  # 8 bits, one step
    replies = []
    for message, change, n in zip(sent[:2], (0.01, -0.03), (10, 30), strict=False):
        update = wire.ErrorFeedback().encode(received, received + change, 1)
        content = {
            "arrays": ArrayRecord({k: Array(v) for k, v in update.items()}),
            "metrics": MetricRecord({"train_loss": 1.0, "num_examples": n}),
        }
        replies.append(Message(RecordDict(content), reply_to=message))
    aggregated, _ = strategy.aggregate_train(1, replies)
    # Each change is added to the server's float32 model, not to its 8-bit copy.
    expected = model.numpy() + (0.01 * 10 - 0.03 * 30) / 40
    assert np.allclose(aggregated[wire.WIRE_ARRAY].numpy(), expected, atol=1e-6)
    record = strategy.recorder.close(1)
    assert record.traffic["hospital-1"].bytes_down == record_bytes(sent[0].content["arrays"])
    assert record.traffic["hospital-1"].bytes_up < 20_000 * 4 / 3.9
    assert record.participants == ["hospital-1", "hospital-2"] and not record.rejected


def test_rounds_file_is_read_line_by_line_as_it_grows(tmp_path):
    record = RoundRecord(
        round=1,
        participants=["a"],
        dropped=[],
        train={},
        evaluate={},
        test=None,
        traffic={},
        seconds=1.0,
    )
    append_round(tmp_path, record)
    with (tmp_path / ROUNDS_FILE).open("a") as handle:
        handle.write('{"round": 2, "partic')  # a line still being written
    assert read_rounds(tmp_path) == [record]

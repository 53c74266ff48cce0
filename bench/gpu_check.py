"""The GPU paths, checked and timed on a CUDA machine: one short script, JSON out.

    python bench/gpu_check.py [--model minilm] [--generator smollm2] [--out results.json]
    python bench/gpu_check.py --cpu-only --generator DIR   # the decoder part, on the CPU only

1. The reference step (bench/reference_step.py) on the CPU (2 threads, the CI machines' size,
   and all cores) and on the GPU with bf16 autocast and in fp32.
2. FederiMed's own training path (``federimed.learning.training.train`` and ``evaluate``, as the
   ClientApp runs them) on the GPU with FEDERIMED_PRECISION=auto (bf16) and fp32 on the same
   synthetic hospital: losses must be finite and fall, and both precisions must land close.
3. The generative track's round at one hospital (its flashcards, the track's batch and length,
   ``federimed.learning.training.train`` and greedy answers as the ClientApp and server run them):
   training tokens per second on the CPU (2 threads) and on the GPU in bf16 and fp32, with and
   without gradient checkpointing, answer tokens per second, and the GPU's memory peak.

Exits 1 when a check fails; the numbers go into the README's GPU section.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference_step import step_seconds

from federimed.config import resolve
from federimed.data.flashcards import from_cases
from federimed.data.records import Example
from federimed.data.synth import SynthConfig, generate
from federimed.learning.batching import encode, pick_device
from federimed.learning.model import build_classifier, load_tokenizer, quiet_libraries
from federimed.learning.training import evaluate, train
from federimed.settings import RuntimeSettings
from federimed.tracks.generative.decoder import (
    build_generator,
    encode_cards,
    generate_answers,
    load_generator_tokenizer,
)


def product_path(model: str, precision: str, steps: int) -> dict[str, float | str]:
    """Train and score as a hospital does, on the GPU, in one precision."""
    run = resolve(flags={"model": model}, environ={}).run
    device = pick_device(RuntimeSettings(device="cuda", precision=precision))
    dataset = generate(SynthConfig(hospitals=1, cases_per_hospital=400, seed=3))
    tokenizer = load_tokenizer(model)
    cases = [Example(**row) for row in dataset.hospitals[0].train]
    test = [Example(**row) for row in dataset.test]
    data = encode(cases, tokenizer, run.label_list, run.max_length)
    net = build_classifier(model, run.label_list, run.lora, seed=0)
    losses: list[float] = []
    started = time.perf_counter()
    settings = run.train_settings(steps=steps)
    train(net, data, settings, device, on_step=lambda _, loss: losses.append(loss))
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    scores = evaluate(net, encode(test, tokenizer, run.label_list, run.max_length), device)
    return {
        "precision": precision,
        "steps": steps,
        "seconds_per_step": round(seconds / steps, 5),
        "first_loss": round(sum(losses[:5]) / 5, 4),
        "last_loss": round(sum(losses[-5:]) / 5, 4),
        "test_accuracy": round(scores["accuracy"], 4),
        "test_loss": round(scores["loss"], 4),
    }


def decoder_path(
    generator: str,
    device_name: str,
    precision: str = "auto",
    steps: int = 8,
    checkpointing: bool = False,
    threads: int = 2,
) -> dict[str, float | str | bool]:
    """A hospital's generative round on one device: training and answer tokens per second
    (tokens that are not padding), the losses, and the GPU's memory peak."""
    run = resolve(flags={"track": "generative", "generator": generator}, environ={}).run
    runtime = RuntimeSettings(device=device_name, precision=precision, torch_threads=threads)
    device = pick_device(runtime)
    cards = from_cases(generate(SynthConfig(hospitals=1, cases_per_hospital=200, seed=3)))
    tokenizer = load_generator_tokenizer(generator)
    data = encode_cards(cards.hospitals[0].train, tokenizer, run.max_length)
    net = build_generator(generator, run.lora, seed=0, checkpointing=checkpointing)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    settings = run.train_settings(steps=steps)
    losses: list[float] = []
    started = time.perf_counter()
    train(net, data, settings, device, on_step=lambda _, loss: losses.append(loss))
    _synchronize(device)
    train_seconds = time.perf_counter() - started
    tokens_per_card = float(data.attention_mask.sum()) / len(data)  # batches draw cards evenly
    questions = cards.test[:16]
    started = time.perf_counter()
    answers = generate_answers(
        net, tokenizer, questions, device, run.max_new_tokens, run.max_length
    )
    _synchronize(device)
    answer_seconds = time.perf_counter() - started
    answer_tokens = sum(len(tokenizer(a)["input_ids"]) for a in answers)
    return {
        "device": device.type,
        "precision": precision if device.type == "cuda" else "fp32",
        "gradient_checkpointing": checkpointing,
        "threads": threads,
        "steps": steps,
        "seconds_per_step": round(train_seconds / steps, 4),
        "train_tokens_per_second": round(
            tokens_per_card * settings.batch_size * steps / train_seconds, 1
        ),
        "answer_tokens_per_second": round(answer_tokens / answer_seconds, 1),
        "first_loss": round(losses[0], 4),
        "last_loss": round(losses[-1], 4),
        "gpu_memory_peak_mib": (
            round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else 0.0
        ),
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def decoder_checks(generator: str, steps: int, cpu_only: bool) -> tuple[list[dict], list[str]]:
    """The decoder on the CPU (the CI machines' 2 threads) and, unless ``cpu_only``, the GPU."""
    timings = [decoder_path(generator, "cpu", steps=max(2, steps // 2))]
    if not cpu_only:
        timings += [
            decoder_path(generator, "cuda", "auto", steps),
            decoder_path(generator, "cuda", "fp32", steps),
            decoder_path(generator, "cuda", "auto", steps, checkpointing=True),
        ]
    failures = [
        f"decoder {t['device']} {t['precision']}: loss not finite ({t['last_loss']})"
        for t in timings
        if not math.isfinite(t["last_loss"])
    ]
    return timings, failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--generator", default="smollm2")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--decoder-steps", type=int, default=16)
    parser.add_argument("--cpu-only", action="store_true", help="the decoder's CPU timing only")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    quiet_libraries()
    if args.cpu_only:
        timings, failures = decoder_checks(args.generator, args.decoder_steps, cpu_only=True)
        return _report({"decoder": timings, "failures": failures}, args.out)
    if not torch.cuda.is_available():
        print("no CUDA device visible", file=sys.stderr)
        return 1
    cores = os.cpu_count() or 1
    reference = [
        step_seconds("cpu", 2, "fp32", 10, args.model),
        step_seconds("cpu", cores, "fp32", 10, args.model),
        step_seconds("cuda", cores, "fp32", 50, args.model),
        step_seconds("cuda", cores, "auto", 50, args.model),
    ]
    training = [product_path(args.model, p, args.steps) for p in ("auto", "fp32")]
    failures = [
        f"{t['precision']}: loss did not fall ({t['first_loss']} -> {t['last_loss']})"
        for t in training
        if not t["last_loss"] < t["first_loss"]
    ]
    bf16, fp32 = training
    if abs(bf16["test_accuracy"] - fp32["test_accuracy"]) > 0.1:
        apart = f"{bf16['test_accuracy']} vs {fp32['test_accuracy']}"
        failures.append(f"bf16 and fp32 test accuracy too far apart: {apart}")
    decoder, decoder_failures = decoder_checks(args.generator, args.decoder_steps, cpu_only=False)
    result = {
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(),
        "cpu_cores": cores,
        "reference_step": reference,
        "training_path": training,
        "decoder": decoder,
        "failures": failures + decoder_failures,
    }
    return _report(result, args.out)


def _report(result: dict, out: Path | None) -> int:
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        out.write_text(text)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The GPU paths, checked and timed on a CUDA machine: one short script, JSON out.

    python bench/gpu_check.py --model DIR [--out results.json]

1. The reference step (bench/reference_step.py) on the CPU (2 threads, the CI machines' size,
   and all cores) and on the GPU with bf16 autocast and in fp32.
2. FederiMed's own training path (``federimed.training.train`` and ``evaluate``, as the
   ClientApp runs them) on the GPU with FEDERIMED_PRECISION=auto (bf16) and fp32 on the same
   synthetic hospital: losses must be finite and fall, and both precisions must land close.

Exits 1 when a check fails; the numbers go into the README's GPU section.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference_step import step_seconds

from federimed.config import resolve
from federimed.data.records import Example
from federimed.data.synth import SynthConfig, generate
from federimed.model import build_classifier, load_tokenizer, quiet_libraries
from federimed.settings import RuntimeSettings
from federimed.training import encode, evaluate, pick_device, train


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    quiet_libraries()
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
    result = {
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(),
        "cpu_cores": cores,
        "reference_step": reference,
        "training_path": training,
        "failures": failures,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())

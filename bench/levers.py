"""What each compute lever buys: the demo's federated training, in one process, per variant.

    .venv/bin/python bench/levers.py [--data runs/demo/data] [--out runs/bench-levers.jsonl]
        [--variant NAME ...] [--seeds 0 1 2]

The federation's arithmetic without its processes (FedAvg over the demo's hospitals, the same
training code, batches and seeds as the ClientApp), so that a lever's effect on accuracy and
on compute is measured alone, on the same data, in minutes.  Per variant one JSON line:
global test accuracy after each round, accuracy on each hospital's unseen conditions, the
seconds spent computing the frozen layers once and training (with the averaging), and the
update size.  Process starts, the network and scoring are the federation's business
(bench/demo_time.sh).  One seed moves the accuracy by several points at this size: compare
variants over seeds (the run config's ``seed``: model initialisation and every hospital's
batches).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord

from federimed.config import resolve
from federimed.consortium.checks import as_sent, record_bytes
from federimed.data.records import UNSEEN_STYLE_TEST, Federation, load_examples, load_hospital
from federimed.learning.batching import encode
from federimed.learning.features import with_features
from federimed.learning.metrics import classification_metrics, probability_metrics
from federimed.learning.model import (
    build_classifier,
    exchanged_state,
    load_tokenizer,
    quiet_libraries,
    to_wire,
)
from federimed.learning.training import predict_proba
from federimed.research.compare import unseen_labels
from federimed.research.tuning import WireInProcess, fedavg_round
from federimed.tracks.classify.task import training_cases
from federimed.tracks.hospital_round import round_seed

# name -> run-config overrides (on top of pyproject.toml's defaults)
VARIANTS = {
    "all-layers": {"lora-layers": 0},  # adapters everywhere: nothing to keep between steps
    "top-3": {"lora-layers": 3},
    "top-2": {"lora-layers": 2},
    # The dropout the encoder was pretrained with, and the adapter's, kept while training.
    "top-2-dropout": {"lora-layers": 2, "encoder-dropout": True, "lora-dropout": 0.05},
    "top-2-lora-dropout": {"lora-layers": 2, "lora-dropout": 0.05},
    # The same steps in fewer, longer rounds: less per-round overhead (process starts, scoring).
    "3-rounds": {"num-server-rounds": 3, "local-steps": 20},
    "2-rounds": {"num-server-rounds": 2, "local-steps": 30},
    "top-1": {"lora-layers": 1},
    # The adapters' scale (alpha / r): a larger one moves the adapters faster, not the head.
    "top-2-alpha-32": {"lora-layers": 2, "lora-alpha": 32},
    "top-1-alpha-32": {"lora-layers": 1, "lora-alpha": 32},
    # A larger learning rate moves the head too.
    "top-2-lr-0.01": {"lora-layers": 2, "learning-rate": 0.01},
    "top-1-lr-0.01": {"lora-layers": 1, "learning-rate": 0.01},
    # The wire's two precisions, without textbook texts, as they were measured against each
    # other (federimed/learning/wire.py: 8 bits a value both ways, the hospitals' rounding fed
    # back).
    "top-2-float32": {"lora-layers": 2, "wire-precision": "float32", "textbook-cases": 0},
    "top-2-int8": {"lora-layers": 2, "wire-precision": "int8", "textbook-cases": 0},
    # Public textbook texts per condition beside each hospital's cases (data/textbook.py).
    "textbook-4": {"textbook-cases": 4},
    "textbook-8": {"textbook-cases": 8},
    "textbook-16": {"textbook-cases": 16},
    "textbook-32": {"textbook-cases": 32},
    "textbook-64": {"textbook-cases": 64},
}


def run_variant(name: str, overrides: dict, federation: Federation) -> dict:
    run = resolve(flags=overrides, environ={}).run
    labels, device = run.label_list, torch.device("cpu")
    tokenizer = load_tokenizer(run.model)
    train_sets = {h: load_hospital(p, labels).train for h, p in federation.hospitals.items()}
    unseen = {h: {labels.index(c) for c in unseen_labels(t, labels)} for h, t in train_sets.items()}
    model = build_classifier(run.model, labels, run.lora, seed=run.seed)
    started = time.perf_counter()

    def encoded_with_features(cases):
        return with_features(
            model, encode(cases, tokenizer, labels, run.max_length), device, run.model
        )

    encoded = {h: encoded_with_features(training_cases(run, t)) for h, t in train_sets.items()}
    test = encoded_with_features(load_examples(federation.test_path, labels))
    style_path = federation.test_path.parent / UNSEEN_STYLE_TEST
    style = (
        encoded_with_features(load_examples(style_path, labels)) if style_path.is_file() else None
    )
    frozen_seconds = time.perf_counter() - started
    curve, training = [], 0.0
    network = WireInProcess(run.wire_precision)
    for server_round in range(1, run.num_server_rounds + 1):
        t0 = time.perf_counter()
        fedavg_round(
            model,
            encoded,
            lambda hospital, r=server_round: run.train_settings(seed=round_seed(run, hospital, r)),
            device,
            network,
        )
        training += time.perf_counter() - t0
        predicted = predict_proba(model, test, device).argmax(axis=1)
        curve.append(float((predicted == test.labels.numpy()).mean()))
    truth = test.labels.numpy()
    style_scores = {}
    if style is not None:
        scores = probability_metrics(style.labels.numpy(), predict_proba(model, style, device))
        style_scores = {
            "unseen_style_accuracy": scores["accuracy"],
            "unseen_style_top3": scores["top3_accuracy"],
        }
    unseen_accuracy = {
        h: classification_metrics(truth, predicted, codes)["unseen_accuracy"]
        for h, codes in unseen.items()
    }
    return {
        "variant": name,
        "overrides": overrides,
        "accuracy": curve[-1],
        "accuracy_per_round": curve,
        "unseen_accuracy": unseen_accuracy,
        "unseen_mean": float(np.mean(list(unseen_accuracy.values()))),
        **style_scores,
        "frozen_layers_seconds": round(frozen_seconds, 1),
        "training_seconds": round(training, 1),
        "steps": run.num_server_rounds * run.local_steps * len(encoded),
        "update_parameters": sum(v.numel() for v in exchanged_state(model).values()),
        "update_bytes": record_bytes(  # as Flower sends it: the arrays' bytes and headers
            as_sent(ArrayRecord(to_wire(exchanged_state(model))), run.wire_precision)
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("runs/demo/data"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench-levers.jsonl"))
    parser.add_argument("--variant", action="append", choices=sorted(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    quiet_libraries()
    torch.set_num_threads(args.threads)
    federation = Federation.from_folder(args.data)
    for name in args.variant or list(VARIANTS):
        for seed in args.seeds:
            line = json.dumps(run_variant(name, VARIANTS[name] | {"seed": seed}, federation))
            print(line, flush=True)
            with args.out.open("a") as handle:
                handle.write(line + "\n")


if __name__ == "__main__":
    main()

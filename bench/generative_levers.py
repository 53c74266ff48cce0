"""What the generative track's levers buy: one model trained on some hospitals' cards, scored
on the test set's diagnosis cards by multiple choice, at step checkpoints.

    .venv/bin/python bench/generative_levers.py --data DIR [--hospitals hospital-1]
        [--layers 8] [--targets all-linear|attention] [--learning-rate 0.003]
        [--batch-size 8] [--lora-r 8] [--textbook-cases 4] [--checks 50 100 150]
        [--federated STEPS]

``DIR`` is what ``federimed data synth --track generative`` writes (the demo's seed-0
consortium: ``runs/bench-demo/data``).  Per checkpoint one line: the seconds spent training
since the last one, the training loss, and the multiple-choice accuracy over the condition
names (:func:`federimed.tracks.generative.decoder.choice_log_likelihoods`) on the 32 test
diagnosis cards (one card is 3.1 points).  The frozen layers below the adapters are computed
once and cached in ``--cache``, as a hospital's are.  A hospital that never saw some
conditions cannot name them from its own cards: compare variants on the same hospitals.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import AutoModelForCausalLM

from federimed.config import resolve
from federimed.data.records import (
    DIAGNOSIS_KIND,
    TEST_FLASHCARDS,
    load_flashcards,
    load_hospital_cards,
)
from federimed.learning.batching import Encoded, pick_device
from federimed.learning.features import with_features
from federimed.learning.model import quiet_libraries, top_layers
from federimed.learning.training import train
from federimed.research.tuning import WireInProcess, fedavg_round
from federimed.runconfig import TrainSettings
from federimed.settings import RuntimeSettings
from federimed.tracks.generative.decoder import (
    choice_log_likelihoods,
    encode_cards,
    linear_maps,
    load_generator_tokenizer,
)
from federimed.tracks.generative.smollm2 import resolve_generator
from federimed.tracks.generative.task import condition_choices, training_cards
from federimed.tracks.hospital_round import round_seed


def build(generator: str, layers: int, targets: str, r: int, seed: int) -> torch.nn.Module:
    """The track's model (:func:`build_generator`) with the adapter's targets as asked."""
    model = AutoModelForCausalLM.from_pretrained(resolve_generator(generator), dtype=torch.float32)
    torch.manual_seed(seed)
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=r,
        lora_alpha=2 * r,
        target_modules=linear_maps(model) if targets == "all-linear" else ["q_proj", "v_proj"],
        layers_to_transform=top_layers(model, layers),
    )
    return get_peft_model(model, config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--hospitals", nargs="+", default=["hospital-1"])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--targets", choices=("all-linear", "attention"), default="all-linear")
    parser.add_argument("--learning-rate", type=float, default=0.003)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--textbook-cases", type=int, default=4)
    parser.add_argument(
        "--checks", type=int, nargs="+", default=[50, 100, 150],
        help="steps (rounds with --federated) after which the model is scored",
    )  # fmt: skip
    parser.add_argument(
        "--federated", type=int, metavar="STEPS", default=0,
        help="FedAvg over --hospitals in one process, STEPS local steps a round (the "
        "ClientApps' batches and seeds, the ServerApp's average, 8-bit wire)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=Path("runs/bench-generative-cache"))
    args = parser.parse_args()
    quiet_libraries()
    # the precision the hospitals compute in: FEDERIMED_PRECISION (bf16 on CPUs that have it)
    device = pick_device(RuntimeSettings(device="cpu", torch_threads=args.threads))
    flags = {"track": "generative", "textbook-cases": args.textbook_cases, "seed": args.seed}
    flags |= {"batch-size": args.batch_size, "learning-rate": args.learning_rate}
    run = resolve(flags=flags | {"local-steps": args.federated or 1}, environ={}).run
    tokenizer = load_generator_tokenizer(run.generator)
    test = [c for c in load_flashcards(args.data / TEST_FLASHCARDS) if c.kind == DIAGNOSIS_KIND]
    choices = condition_choices(run, test)
    truth = np.array([choices.index(card.answer) for card in test])
    model = build(run.generator, args.layers, args.targets, args.lora_r, args.seed)

    def encoded(hospitals: list[str]) -> Encoded:
        own = [card for h in hospitals for card in load_hospital_cards(args.data / h)[0]]
        cards = encode_cards(training_cards(run, own), tokenizer, run.max_length)
        return with_features(model, cards, device, "bench", args.cache)

    started = time.perf_counter()
    if args.federated:
        hospitals = {name: encoded([name]) for name in args.hospitals}
        network = WireInProcess(run.wire_precision)
    else:
        data = encoded(args.hospitals)
    print(f"frozen layers {time.perf_counter() - started:.0f} s", flush=True)
    done = 0
    for check in args.checks:
        started = time.perf_counter()
        if args.federated:
            for server_round in range(done + 1, check + 1):

                def settings(name: str, server_round: int = server_round) -> TrainSettings:
                    return run.train_settings(seed=round_seed(run, name, server_round))

                fedavg_round(model, hospitals, settings, device, network)
            loss = float("nan")
        else:
            settings = TrainSettings(check - done, args.batch_size, args.learning_rate, seed=done)
            loss = train(model, data, settings, device)["train_loss"]
        seconds, done = time.perf_counter() - started, check
        scores = choice_log_likelihoods(model, tokenizer, test, choices, device, run.max_length)
        accuracy = float((scores.argmax(1) == truth).mean())
        where = (
            f"round {check} ({args.federated} steps each)" if args.federated else f"step {check}"
        )
        print(
            f"layers {args.layers} {args.targets} lr {args.learning_rate} batch "
            f"{args.batch_size} r {args.lora_r} textbook {args.textbook_cases}: {where}: "
            f"{seconds:.0f} s, loss {loss:.3f}, multiple-choice accuracy {accuracy:.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()

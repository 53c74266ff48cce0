"""The generative track's round at a hospital, and how its models are scored.

The same round as the encoder's (:mod:`federimed.tracks.classify.task`): score the incoming model
on the hospital's own validation cards, train it on its flashcards, send the adapter in the wire
format, clipped to the site's bound.  A model is scored on test cards by exact match of the
diagnosis, token-F1 of the free-text answers and the perplexity of the reference answers
(:class:`federimed.consortium.global_model.GlobalGenerator` does it each round at the server).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from federimed.data.conditions import BY_CODE
from federimed.data.flashcards import public_cards
from federimed.data.records import DIAGNOSIS_KIND, Flashcard, load_hospital_cards
from federimed.learning.batching import pick_device
from federimed.learning.model import exchanged_state, receive, to_wire
from federimed.runconfig import RunConfig
from federimed.settings import RuntimeSettings
from federimed.tracks.generative.decoder import (
    answer_loss,
    answer_token_losses,
    build_generator,
    encode_cards,
    generate_answers,
    load_generator_tokenizer,
    pick_choices,
    score_answers,
)
from federimed.tracks.hospital_round import (
    NodeIdentity,
    local_training,
    require_validation,
    with_cached_features,
)

log = logging.getLogger("flwr.federimed.client")


def training_cards(run: RunConfig, own: list[Flashcard]) -> list[Flashcard]:
    """What a hospital trains on: its own cards and the run's public ones (``textbook-cases``
    per condition: :func:`federimed.data.flashcards.public_cards`, the same at every
    hospital), the public cards it already holds dropped."""
    held = {(card.question, card.answer) for card in own}
    public = public_cards(run.label_list, run.textbook_cases, run.seed)
    return own + [card for card in public if (card.question, card.answer) not in held]


def global_generator(
    run: RunConfig, wire: Mapping[str, torch.Tensor], runtime: RuntimeSettings | None = None
):
    """The model the server sent, its tokenizer, and the received state by name."""
    checkpointing = (runtime or RuntimeSettings()).gradient_checkpointing
    model = build_generator(run.generator, run.lora, seed=run.seed, checkpointing=checkpointing)
    return model, load_generator_tokenizer(run.generator), receive(model, wire)


def train_round(
    run: RunConfig,
    node: NodeIdentity,
    global_wire: Mapping[str, torch.Tensor],
    server_round: int,
    proximal_mu: float = 0.0,
    runtime: RuntimeSettings | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """:func:`federimed.tracks.classify.task.train_round` for flashcards: ``val_loss`` is the
    incoming model's loss per answer token on the hospital's validation cards."""
    started = time.perf_counter()
    runtime = runtime or RuntimeSettings()
    device = pick_device(runtime)
    cards, validation_cards = load_hospital_cards(node.data_path)
    model, tokenizer, _ = global_generator(run, global_wire, runtime)
    data = encode_cards(training_cards(run, cards), tokenizer, run.max_length)
    validation = validation_cards and encode_cards(validation_cards, tokenizer, run.max_length)
    loaded = time.perf_counter()
    metrics = {"load_seconds": loaded - started}
    data = with_cached_features(model, data, device, run, runtime, node)
    validation = validation and with_cached_features(model, validation, device, run, runtime)
    if validation:
        metrics["val_loss"] = answer_loss(model, validation, device)
    seen = f"validation loss per answer token {metrics.get('val_loss', float('nan')):.3f}"
    metrics |= local_training(run, node, server_round, proximal_mu, model, data, device, seen)
    metrics["compute_seconds"] = time.perf_counter() - loaded
    return to_wire(exchanged_state(model)), metrics


def evaluate_round(
    run: RunConfig,
    node: NodeIdentity,
    global_wire: Mapping[str, torch.Tensor],
    runtime: RuntimeSettings | None = None,
) -> dict[str, float]:
    """The global model on this hospital's validation cards."""
    _, validation_cards = load_hospital_cards(node.data_path)
    runtime = runtime or RuntimeSettings()
    model, tokenizer, _ = global_generator(run, global_wire, runtime)
    device = pick_device(runtime)
    data = encode_cards(require_validation(validation_cards, node), tokenizer, run.max_length)
    data = with_cached_features(model, data, device, run, runtime)
    return {"loss": answer_loss(model, data, device), "num_examples": float(len(data))}


def condition_choices(run: RunConfig, cards: list[Flashcard]) -> list[str]:
    """The names a diagnosis is chosen from: every condition of the run's label list that the
    catalogue names, and any other diagnosis the cards give (a consortium's own dataset)."""
    names = [BY_CODE[code].name for code in run.label_list if code in BY_CODE]
    given = {card.answer for card in cards if card.kind == DIAGNOSIS_KIND}
    return names + sorted(given - set(names))


@dataclass(frozen=True)
class Outputs:
    """What a model makes of test cards: its greedy answers (None: not generated), each
    reference answer's summed loss and token count, and its likeliest diagnosis among
    :func:`condition_choices`."""

    answers: list[str] | None
    losses: tuple[np.ndarray, np.ndarray]
    picks: list[str | None]

    def scores(self, cards: list[Flashcard], unseen: set[str] | None = None) -> dict[str, float]:
        return score_answers(cards, self.answers, unseen, self.losses, self.picks)

    def save(self, path: Path, cards: list[Flashcard]) -> None:
        """Written beside the server's final adapter, so that a report can split the scores
        per hospital without scoring the same weights again."""
        sums, counts = self.losses
        record = {"cards": _fingerprint(cards), "answers": self.answers, "picks": self.picks,
                  "loss_sums": sums.tolist(), "loss_counts": counts.tolist()}  # fmt: skip
        path.write_text(json.dumps(record), encoding="utf-8")

    @classmethod
    def load(cls, path: Path, cards: list[Flashcard]) -> Outputs | None:
        """What :meth:`save` wrote for these very ``cards``; None without a file, or for
        other cards."""
        if not path.is_file():
            return None
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("cards") != _fingerprint(cards):
            return None
        losses = (np.array(record["loss_sums"]), np.array(record["loss_counts"]))
        return cls(record["answers"], losses, record["picks"])


OUTPUTS_FILE = "test-outputs.json"  # the final model's Outputs, in the run's final/ folder


def _fingerprint(cards: list[Flashcard]) -> str:
    text = json.dumps([(card.question, card.answer, card.kind, card.code) for card in cards])
    return hashlib.sha256(text.encode()).hexdigest()


def model_outputs(
    model: torch.nn.Module,
    tokenizer,
    cards: list[Flashcard],
    run: RunConfig,
    device,
    answers: bool = True,
) -> Outputs:
    """``answers=False``: no greedy answers (about 30% of the scoring time: 9 of 31 s for
    SmolLM2 on the 64 test cards, where the multiple choice takes 17 s)."""
    generated = (
        generate_answers(model, tokenizer, cards, device, run.max_new_tokens, run.max_length)
        if answers
        else None
    )
    data = encode_cards(cards, tokenizer, run.max_length)
    choices = condition_choices(run, cards)
    return Outputs(
        generated,
        answer_token_losses(model, data, device),
        pick_choices(model, tokenizer, cards, choices, device, run.max_length),
    )

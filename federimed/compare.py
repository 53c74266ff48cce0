"""Federated vs local-only vs centralized, scored the same way on the same common test set.

Baselines use the federation's own training code and budget: a hospital alone gets the steps
it trained in the federation (rounds x local steps); the pooled model gets the federation's
total (that times the number of hospitals). Only where the data may go differs.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from federimed.data.records import (
    Example,
    Federation,
    load_examples,
    load_flashcards,
    load_hospital,
    load_hospital_cards,
)
from federimed.decoder import (
    build_generator,
    encode_cards,
    load_generator_tokenizer,
    score_answers,
)
from federimed.features import keeps_frozen_layers, with_features
from federimed.generative import answers_and_perplexity
from federimed.metrics import classification_metrics
from federimed.model import build_classifier, load_tokenizer
from federimed.runconfig import RunConfig
from federimed.training import (
    Encoded,
    encode,
    pick_device,
    predict_proba,
    step_reporter,
    train,
)

Progress = Callable[[str], None]


def unseen_labels(train: list[Example], labels: list[str]) -> list[str]:
    present = {e.label for e in train}
    return [label for label in labels if label not in present]


def score(
    model: torch.nn.Module, test: Encoded, labels: list[str], unseen: dict[str, list[str]]
) -> dict[str, dict[str, float]]:
    """One pass over the test set; per hospital: accuracy, macro-F1, accuracy on its unseen."""
    predicted = predict_proba(model, test, pick_device()).argmax(axis=1)
    truth = test.labels.numpy()
    index = {label: i for i, label in enumerate(labels)}
    return {
        hospital: classification_metrics(truth, predicted, {index[c] for c in codes} or None)
        for hospital, codes in unseen.items()
    }


class Baselines:
    """What both tracks' comparisons share: each hospital's training data (``encoded``), and
    training a fresh model with the federation's code and budget, then scoring it."""

    run: RunConfig
    progress: Progress
    encoded: dict[str, Encoded]
    steps_per_hospital: int

    def _fresh_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def _score(self, model: torch.nn.Module) -> dict[str, dict[str, float]]:
        """hospital -> the model's scores on the common test set and on what it never saw."""
        raise NotImplementedError

    def _train_and_score(self, name: str, data: Encoded, steps: int) -> tuple[dict, float]:
        started = time.monotonic()
        model = self._fresh_model()
        settings = self.run.train_settings(steps=steps, seed=self.run.seed)

        def emit(step: int, total: int, loss: float) -> None:
            self.progress(f"  {name}: step {step}/{total} loss {loss:.3f}")

        report = step_reporter(steps, emit, times=5)
        train(model, data, settings, pick_device(), on_step=report)
        return self._score(model), time.monotonic() - started

    def local_only(self) -> tuple[dict[str, dict[str, float]], float]:
        """Each hospital alone, scored on the common test set and on what it never saw."""
        results, seconds = {}, 0.0
        for name, data in self.encoded.items():
            scores, spent = self._train_and_score(f"local {name}", data, self.steps_per_hospital)
            results[name] = scores[name]
            seconds += spent
        return results, seconds

    def centralized(self) -> tuple[dict[str, dict[str, float]], float]:
        """All records pooled: the upper bound no hospital could legally build."""
        pooled = Encoded.concat(list(self.encoded.values()))
        steps = self.steps_per_hospital * len(self.encoded)
        return self._train_and_score("centralized", pooled, steps)


class Comparison(Baselines):
    """The classify track's: holds the tokenized data (and the frozen layers' output for it)
    once; trains and scores each baseline."""

    def __init__(
        self,
        federation: Federation,
        run: RunConfig,
        progress: Progress = print,
        feature_caches: Mapping[str, Path] | None = None,
    ):
        """``feature_caches``: hospital -> the folder its own runs keep the frozen layers'
        output in (the local federation's), so that they are not computed a second time."""
        self.run = run
        self.labels = run.label_list
        self.progress = progress
        self.tokenizer = load_tokenizer(run.model)
        self.train_sets = {
            name: load_hospital(path, self.labels).train
            for name, path in federation.hospitals.items()
        }
        self.unseen = {
            name: unseen_labels(cases, self.labels) for name, cases in self.train_sets.items()
        }
        # Every baseline starts from the same frozen layers: their output is computed once.
        self._frozen = self._fresh_model()
        caches = feature_caches or {}
        self.encoded = {
            name: self._encode(cases, caches.get(name)) for name, cases in self.train_sets.items()
        }
        self.test = self._encode(load_examples(federation.test_path, self.labels))
        self.steps_per_hospital = run.num_server_rounds * run.local_steps

    def _fresh_model(self) -> torch.nn.Module:
        return build_classifier(self.run.model, self.labels, self.run.lora, seed=self.run.seed)

    def _encode(self, cases: list[Example], cache: Path | None = None) -> Encoded:
        encoded = encode(cases, self.tokenizer, self.labels, self.run.max_length)
        return with_features(self._frozen, encoded, pick_device(), self.run.model, cache)

    def _score(self, model: torch.nn.Module) -> dict[str, dict[str, float]]:
        return score(model, self.test, self.labels, self.unseen)

    def federated(self, model: torch.nn.Module) -> dict[str, dict[str, float]]:
        """The saved global model as users get it (adapter merged).  Its frozen layers are
        scored from the test set's features when its weights there are the base model's (as
        they are when only the top layers were adapted); otherwise every layer is computed."""
        test = self.test
        if test.features is not None and not keeps_frozen_layers(
            model, self._frozen, test.frozen_layers
        ):
            test = dataclasses.replace(test, features=None, frozen_layers=0)
        return score(model, test, self.labels, self.unseen)


class GenerativeComparison(Baselines):
    """The generative track's: each hospital's flashcards and the common test cards; a model
    answers every test card once, and each hospital reads its scores off those answers:
    overall, and on the conditions it has no card about."""

    def __init__(self, federation: Federation, run: RunConfig, progress: Progress = print):
        self.run = run
        self.progress = progress
        self.tokenizer = load_generator_tokenizer(run.generator)
        self.train_sets = {
            name: load_hospital_cards(path)[0] for name, path in federation.hospitals.items()
        }
        self.test = load_flashcards(federation.test_path)
        codes = {card.code for card in self.test if card.code}
        self.unseen = {
            name: sorted(codes - {card.code for card in cards})
            for name, cards in self.train_sets.items()
        }
        self.encoded = {
            name: encode_cards(cards, self.tokenizer, run.max_length)
            for name, cards in self.train_sets.items()
        }
        self.steps_per_hospital = run.num_server_rounds * run.local_steps

    def _fresh_model(self) -> torch.nn.Module:
        return build_generator(self.run.generator, self.run.lora, seed=self.run.seed)

    def _score(self, model: torch.nn.Module) -> dict[str, dict[str, float]]:
        answers, perplexity = answers_and_perplexity(
            model, self.tokenizer, self.test, self.run, pick_device()
        )
        return {
            name: score_answers(self.test, answers, set(unseen)) | {"perplexity": perplexity}
            for name, unseen in self.unseen.items()
        }

    def federated(self, model: torch.nn.Module) -> dict[str, dict[str, float]]:
        return self._score(model)

"""Federated vs local-only vs centralized, scored the same way on the same common test set.

Baselines use the federation's own training code and budget: a hospital alone gets the steps
it trained in the federation (rounds x local steps); the pooled model gets the federation's
total (that times the number of hospitals). Only where the data may go differs.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from federimed.data.records import (
    UNSEEN_STYLE_TEST,
    Example,
    Federation,
    load_examples,
    load_flashcards,
    load_hospital,
    load_hospital_cards,
)
from federimed.learning.batching import Encoded, encode, pick_device
from federimed.learning.features import keeps_frozen_layers, with_features
from federimed.learning.metrics import probability_metrics
from federimed.learning.model import (
    build_classifier,
    exchanged_state,
    from_wire,
    load_exchanged_state,
    load_tokenizer,
    to_wire,
)
from federimed.learning.training import predict_proba, step_reporter, train
from federimed.research.tuning import (
    Advance,
    State,
    Tuned,
    TuningPlan,
    Validate,
    WireInProcess,
    fedavg_round,
    pooled_validation,
    validation_key,
    warm_started,
)
from federimed.runconfig import RunConfig, TrainSettings
from federimed.tracks.classify.task import training_cases
from federimed.tracks.generative.decoder import (
    build_generator,
    encode_cards,
    load_generator_tokenizer,
)
from federimed.tracks.generative.task import (
    OUTPUTS_FILE,
    Outputs,
    model_outputs,
    training_cards,
)
from federimed.tracks.hospital_round import round_seed

Progress = Callable[[str], None]


@dataclass
class Tuning:
    """Every method's search: scores under the report's method names (``local``,
    ``federated_tuned`` ...), how each tuned checkpoint was found (the report's
    ``tuning.methods``), and the seconds of the equal-budget runs and of the rest."""

    scores: dict[str, dict[str, dict[str, float]]]
    found: dict[str, Any]
    seconds: dict[str, float]


def unseen_labels(train: list[Example], labels: list[str]) -> list[str]:
    present = {e.label for e in train}
    return [label for label in labels if label not in present]


def score(
    model: torch.nn.Module,
    test: Encoded,
    labels: list[str],
    unseen: dict[str, list[str]],
    unseen_style: Encoded | None = None,
) -> dict[str, dict[str, float]]:
    """One pass over the test set; per hospital: accuracy, top-3, calibration, macro-F1,
    accuracy on its unseen conditions; and on the notes in a style no hospital writes."""
    device = pick_device()
    proba = predict_proba(model, test, device)
    truth = test.labels.numpy()
    index = {label: i for i, label in enumerate(labels)}
    style = {}
    if unseen_style is not None:
        other = probability_metrics(
            unseen_style.labels.numpy(), predict_proba(model, unseen_style, device)
        )
        style = {
            "unseen_style_accuracy": other["accuracy"],
            "unseen_style_top3_accuracy": other["top3_accuracy"],
        }
    return {
        hospital: probability_metrics(truth, proba, {index[c] for c in codes} or None) | style
        for hospital, codes in unseen.items()
    }


def checkpoint_states(comparison: Comparison, paths: Sequence[Path]) -> Iterator[State]:
    """The exchanged weights in the ServerApp's checkpoint files, one at a time, by name."""
    model = comparison._frozen
    for path in paths:
        yield from_wire(model, to_wire(load_file(path)))


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

    def _emitter(self, name: str) -> Callable[[int, int, float], None]:
        def emit(step: int, total: int, loss: float) -> None:
            self.progress(f"  {name}: step {step}/{total} loss {loss:.3f}")

        return emit

    def _train_and_score(self, name: str, data: Encoded, steps: int) -> tuple[dict, float]:
        started = time.monotonic()
        model = self._fresh_model()
        settings = self.run.train_settings(steps=steps, seed=self.run.seed)

        report = step_reporter(steps, self._emitter(name), times=5)
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
        splits = {
            name: load_hospital(path, self.labels) for name, path in federation.hospitals.items()
        }
        self.train_sets = {name: split.train for name, split in splits.items()}
        self.unseen = {
            name: unseen_labels(cases, self.labels) for name, cases in self.train_sets.items()
        }
        # Every baseline starts from the same frozen layers: their output is computed once.
        self._frozen = self._fresh_model()
        caches = feature_caches or {}
        self.encoded = {
            name: self._encode(training_cases(run, cases), caches.get(name))
            for name, cases in self.train_sets.items()
        }
        self._caches = caches
        self._validation_cases = {
            name: split.validation for name, split in splits.items() if split.validation
        }
        self.test = self._encode(load_examples(federation.test_path, self.labels))
        style_path = federation.test_path.parent / UNSEEN_STYLE_TEST
        self.unseen_style = (
            self._encode(load_examples(style_path, self.labels)) if style_path.is_file() else None
        )
        self.steps_per_hospital = run.num_server_rounds * run.local_steps
        self._network = WireInProcess(run.wire_precision)  # the wire, for in-process FedAvg

    def _fresh_model(self) -> torch.nn.Module:
        return build_classifier(self.run.model, self.labels, self.run.lora, seed=self.run.seed)

    def _encode(self, cases: list[Example], cache: Path | None = None) -> Encoded:
        encoded = encode(cases, self.tokenizer, self.labels, self.run.max_length)
        return with_features(self._frozen, encoded, pick_device(), self.run.model, cache)

    def _score(self, model: torch.nn.Module) -> dict[str, dict[str, float]]:
        return score(model, self.test, self.labels, self.unseen, self.unseen_style)

    def federated(
        self, model: torch.nn.Module, _folder: Path | None = None
    ) -> dict[str, dict[str, float]]:
        """The saved global model as users get it (adapter merged).  Its frozen layers are
        scored from the test set's features when its weights there are the base model's (as
        they are when only the top layers were adapted); otherwise every layer is computed."""
        test, style = self.test, self.unseen_style
        if test.features is not None and not keeps_frozen_layers(
            model, self._frozen, test.frozen_layers
        ):
            test = dataclasses.replace(test, features=None, frozen_layers=0)
            style = style and dataclasses.replace(style, features=None, frozen_layers=0)
        return score(model, test, self.labels, self.unseen, style)

    # ---- tuned: each method's length and learning rate picked on its own validation data ----

    def _search(
        self,
        name: str,
        advance: Advance,
        validate: Validate,
        plan: TuningPlan,
        equal_budget: Callable[[], Iterable[Mapping[str, torch.Tensor]]] | None = None,
        restart: Callable[[], None] = lambda: None,
    ):
        """One method's search (:func:`warm_started`): its scores at the equal budget and
        tuned, and how the tuned checkpoint was found.  ``equal_budget``: trains the equal-budget
        run and returns its checkpoints (by default the search trains it with ``advance``)."""
        every = plan.check_every
        self.progress(
            f"  {name}: the equal budget ({plan.budget} x {every}) checked every {every}, then "
            f"continued at {', '.join(map(str, plan.continued_rates))}, at most {plan.cap * every}"
        )
        started = time.monotonic()
        states = equal_budget() if equal_budget else None
        trained = time.monotonic() - started
        searched = warm_started(self._fresh_model(), advance, validate, plan, states, restart)
        found = searched.found
        found.seconds += trained
        found.equal_budget_seconds += trained
        self.progress(
            f"  {name}: learning rate {found.learning_rate}, best at {found.best_at} of "
            f"{found.ran}{' (capped)' if found.capped else ''}, validation accuracy "
            f"{found.validation_accuracy:.3f}"
        )
        equal = self._score_state(searched.equal_budget)
        same = all(torch.equal(v, searched.tuned[k]) for k, v in searched.equal_budget.items())
        return equal, equal if same else self._score_state(searched.tuned), found

    def _trajectory(self, name: str, data: Encoded, plan: TuningPlan) -> Callable[[], list]:
        """The equal-budget run as :meth:`local_only` and :meth:`centralized` train it (one
        stretch, one optimizer), its weights kept after each check's worth of steps."""

        def run() -> list[State]:
            model, states = self._fresh_model(), []
            steps = plan.budget * plan.check_every
            report = step_reporter(steps, self._emitter(name), times=5)

            def keep(step: int, loss: float) -> None:
                report(step, loss)
                if step % plan.check_every == 0:
                    states.append(exchanged_state(model))

            settings = self.run.train_settings(steps=steps, seed=self.run.seed)
            train(model, data, settings, pick_device(), on_step=keep)
            return states

        return run

    def _score_state(self, state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, float]]:
        model = self._fresh_model()
        load_exchanged_state(model, state)
        return self._score(model)

    def _steps(self, data: Encoded, seed_of: Callable[[int], int]) -> Advance:
        def advance(model: torch.nn.Module, rate: float, check: int) -> None:
            settings = self.run.train_settings(seed=seed_of(check), learning_rate=rate)
            train(model, data, settings, pick_device())

        return advance

    def _validates(self, data: Encoded) -> Validate:
        return lambda model: validation_key(model, data, pick_device())

    @property
    def untunable(self) -> list[str]:
        """Hospitals without validation data, on which nothing can be tuned."""
        return [name for name in self.encoded if name not in self._validation_cases]

    @cached_property
    def validation(self) -> dict[str, Encoded]:
        """Each hospital's validation data, encoded when tuning first needs it."""
        return {
            name: self._encode(cases, self._caches.get(name))
            for name, cases in self._validation_cases.items()
        }

    def tuned(self, federation: Iterable[Mapping[str, torch.Tensor]] | None = None) -> Tuning:
        """Every method's search.  ``federation``: the real run's global model after each
        round, which the federation's search starts from; without it the equal-budget
        federation is computed in one process too, and its scores are returned as
        ``federated``.  Local-only and centralized are always returned at the equal budget
        (their search's first part)."""
        started = time.monotonic()
        federated_equal, federated_tuned, federated = self.tuned_federated(federation)
        local_equal, local_tuned, local = self.tuned_local()
        central_equal, central_tuned, centralized = self.tuned_centralized()
        scores = {
            "local": local_equal,
            "centralized": central_equal,
            "federated_tuned": federated_tuned,
            "local_tuned": local_tuned,
            "centralized_tuned": central_tuned,
        }
        if federation is None:
            scores["federated"] = federated_equal
        found = {
            "federated": federated.as_dict(),
            "local": {name: trial.as_dict() for name, trial in local.items()},
            "centralized": centralized.as_dict(),
        }
        equal_budget = {
            "local": sum(trial.equal_budget_seconds for trial in local.values()),
            "centralized": centralized.equal_budget_seconds,
        }
        tuning = time.monotonic() - started - sum(equal_budget.values())
        return Tuning(scores, found, equal_budget | {"tuned": tuning})

    def tuned_local(self) -> tuple[dict, dict, dict[str, Tuned]]:
        """Each hospital alone on its own validation data, checked every ``local-steps``
        steps: the equal-budget run is :meth:`local_only`'s, continued stretch by stretch on the
        batches the hospital would train in the federation's next rounds."""
        plan = TuningPlan(self.run.learning_rate, self.run.local_steps, self.run.num_server_rounds)
        equal, tuned, found = {}, {}, {}
        for name, data in self.encoded.items():
            scores_equal, scores_tuned, found[name] = self._search(
                f"local {name}",
                self._steps(data, partial(round_seed, self.run, name)),
                self._validates(self.validation[name]),
                plan,
                self._trajectory(f"local {name}", data, plan),
            )
            equal[name], tuned[name] = scores_equal[name], scores_tuned[name]
        return equal, tuned, found

    def tuned_centralized(self) -> tuple[dict, dict, Tuned]:
        """The pooled data on the pooled validation data; checked every round's worth of the
        federation's steps (``local-steps`` x hospitals)."""
        pooled = Encoded.concat(list(self.encoded.values()))
        validation = Encoded.concat(list(self.validation.values()))
        every = self.run.local_steps * len(self.encoded)
        plan = TuningPlan(self.run.learning_rate, every, self.run.num_server_rounds)

        def seeds(check: int) -> int:
            return self.run.seed * 1_000_003 + check

        return self._search(
            "centralized",
            self._steps(pooled, seeds),
            self._validates(validation),
            plan,
            self._trajectory("centralized", pooled, plan),
        )

    def tuned_federated(self, federation: Iterable[Mapping[str, torch.Tensor]] | None = None):
        """FedAvg continued in one process (the ClientApps' arithmetic, batches and seeds) from
        the real run's rounds, or from its own; validated on the hospitals' scores averaged
        as the federation sees them, every round.  At the run's own learning rate the
        in-process rounds compute what the real run computes, up to floating-point summation
        order (seed 0: 61.9% against the real run's 62.2% top-1, one test case apart)."""
        plan = TuningPlan(self.run.learning_rate, 1, self.run.num_server_rounds)

        def validate(model: torch.nn.Module) -> tuple[float, float]:
            return pooled_validation(model, self.validation, pick_device())

        return self._search(
            "federated (continued in one process)",
            self._fedavg_round,
            validate,
            plan,
            None if federation is None else lambda: federation,
            self._restart_network,
        )

    def _restart_network(self) -> None:
        """A model starts (or continues from a loaded checkpoint): the hospitals' error feedback
        starts anew, as after a restart of their guards."""
        self._network = WireInProcess(self.run.wire_precision)

    def _fedavg_round(self, model: torch.nn.Module, rate: float, server_round: int) -> None:
        def settings(name: str) -> TrainSettings:
            seed = round_seed(self.run, name, server_round)
            return self.run.train_settings(seed=seed, learning_rate=rate)

        fedavg_round(model, self.encoded, settings, pick_device(), self._network)

    def federated_model(self) -> torch.nn.Module:
        """The federation's equal-budget model computed in one process (what benchmarks over
        many seeds use instead of starting a federation per seed)."""
        model = self._fresh_model()
        self._restart_network()
        for server_round in range(1, self.run.num_server_rounds + 1):
            self._fedavg_round(model, self.run.learning_rate, server_round)
        return model


class GenerativeComparison(Baselines):
    """The generative track's: each hospital's flashcards and the common test cards; a model
    answers every test card once, and each hospital reads its scores off those answers:
    overall, and on the conditions it has no card about.  The frozen layers' output for the
    hospitals' cards is computed once for every baseline (or read from the hospitals' own
    caches, ``feature_caches``, as :class:`Comparison` does)."""

    def __init__(
        self,
        federation: Federation,
        run: RunConfig,
        progress: Progress = print,
        feature_caches: Mapping[str, Path] | None = None,
    ):
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
        frozen, caches = self._fresh_model(), feature_caches or {}
        self.encoded = {
            name: with_features(
                frozen,
                encode_cards(training_cards(run, cards), self.tokenizer, run.max_length),
                pick_device(),
                run.generator,
                caches.get(name),
            )
            for name, cards in self.train_sets.items()
        }
        self.steps_per_hospital = run.num_server_rounds * run.local_steps

    def _fresh_model(self) -> torch.nn.Module:
        return build_generator(self.run.generator, self.run.lora, seed=self.run.seed)

    def _score(
        self, model: torch.nn.Module, outputs: Outputs | None = None
    ) -> dict[str, dict[str, float]]:
        outputs = outputs or model_outputs(
            model, self.tokenizer, self.test, self.run, pick_device()
        )
        return {name: outputs.scores(self.test, set(codes)) for name, codes in self.unseen.items()}

    def federated(
        self, model: torch.nn.Module, folder: Path | None = None
    ) -> dict[str, dict[str, float]]:
        """The saved global model's scores per hospital; read off the answers the server
        gave for the same weights after the last round (``folder``'s
        :data:`~federimed.tracks.generative.task.OUTPUTS_FILE`) when it wrote them for these
        test cards, instead of scoring it a second time (about 30 s on two cores)."""
        scored = Outputs.load(folder / OUTPUTS_FILE, self.test) if folder else None
        return self._score(model, scored)

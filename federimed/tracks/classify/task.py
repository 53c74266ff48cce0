"""What a hospital does in one round, as plain functions the ClientApp only wraps.

Kept free of Flower types so the same steps are unit-tested directly and reused by the
local-only baseline.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import torch

from federimed.data.records import Example, load_hospital
from federimed.data.textbook import textbook_cases
from federimed.learning.batching import encode, pick_device
from federimed.learning.model import (
    build_classifier,
    exchanged_state,
    load_tokenizer,
    receive,
    to_wire,
)
from federimed.learning.training import evaluate
from federimed.runconfig import RunConfig
from federimed.settings import RuntimeSettings
from federimed.tracks.hospital_round import (
    NodeIdentity,
    local_training,
    require_validation,
    with_cached_features,
)

# A child of Flower's logger, so lines land in the SuperNode log next to Flower's own.
log = logging.getLogger("flwr.federimed.client")


def training_cases(run: RunConfig, own: list[Example]) -> list[Example]:
    """What a hospital trains on: its own cases and the run's public textbook texts
    (``textbook-cases`` per condition, the same at every hospital)."""
    return own + textbook_cases(run.label_list, run.textbook_cases, run.seed)


def _global_model(run: RunConfig, wire: Mapping[str, torch.Tensor]):
    """The model the server sent: the seeded base with its adapter and head loaded; also the
    received state by name (the reference an update is clipped against)."""
    model = build_classifier(run.model, run.label_list, run.lora, seed=run.seed)
    return model, load_tokenizer(run.model), receive(model, wire)


def train_round(
    run: RunConfig,
    node: NodeIdentity,
    global_wire: Mapping[str, torch.Tensor],
    server_round: int,
    proximal_mu: float = 0.0,
    runtime: RuntimeSettings | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Score the incoming global model on local validation, then train it on local data.

    The global model comes and the update goes in the wire format (:func:`to_wire`).

    Scoring here, in the process that is already up, gives the per-hospital learning curve
    without a second process start per round (a Flower evaluate round costs one).
    (The hospital's floors and its clip on the update are its guard's, at the SuperNode, not
    this code's.) The metrics say where the round's time went:
    ``load_seconds`` (data, model, tokenization) and ``compute_seconds`` (scoring, training).
    """
    started = time.perf_counter()
    runtime = runtime or RuntimeSettings()
    device = pick_device(runtime)
    labels = run.label_list
    data = load_hospital(node.data_path, labels)
    model, tokenizer, _ = _global_model(run, global_wire)
    encoded = encode(training_cases(run, data.train), tokenizer, labels, run.max_length)
    validation = data.validation and encode(data.validation, tokenizer, labels, run.max_length)
    loaded = time.perf_counter()
    metrics = {"load_seconds": loaded - started}
    encoded = with_cached_features(model, encoded, device, run, runtime, node)
    validation = validation and with_cached_features(model, validation, device, run, runtime)
    if validation:
        scores = evaluate(model, validation, device)
        metrics |= {"val_accuracy": scores["accuracy"], "val_loss": scores["loss"]}
    else:
        # Scoring on training cases would flatter the model; the server averages the metric
        # keys every hospital reported, so this hospital's missing ones cost nobody a round.
        log.info("%s: no validation.jsonl, the incoming model is not scored here", node.hospital)
    seen = f"validation accuracy {_pct(metrics.get('val_accuracy'))}"
    metrics |= local_training(run, node, server_round, proximal_mu, model, encoded, device, seen)
    metrics["compute_seconds"] = time.perf_counter() - loaded
    return to_wire(exchanged_state(model)), metrics


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def evaluate_round(
    run: RunConfig,
    node: NodeIdentity,
    global_wire: Mapping[str, torch.Tensor],
    runtime: RuntimeSettings | None = None,
) -> dict[str, float]:
    """The global model on this hospital's own validation cases (they never leave)."""
    labels = run.label_list
    data = load_hospital(node.data_path, labels)
    cases: list[Example] = require_validation(data.validation, node)
    model, tokenizer, _ = _global_model(run, global_wire)
    runtime = runtime or RuntimeSettings()
    device = pick_device(runtime)
    encoded = encode(cases, tokenizer, labels, run.max_length)
    return evaluate(model, with_cached_features(model, encoded, device, run, runtime), device)

"""What a hospital does in one round, as plain functions the ClientApp only wraps.

Kept free of Flower types so the same steps are unit-tested directly and reused by the
local-only baseline.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from federimed.batching import Encoded, encode, pick_device
from federimed.data.records import Example, load_hospital
from federimed.data.textbook import textbook_cases
from federimed.features import first_adapted_layer, with_features
from federimed.model import (
    build_classifier,
    exchanged_state,
    load_tokenizer,
    receive,
    to_wire,
)
from federimed.runconfig import RunConfig
from federimed.settings import RuntimeSettings
from federimed.training import evaluate, step_reporter, train

# A child of Flower's logger, so lines land in the SuperNode log next to Flower's own.
log = logging.getLogger("flwr.federimed.client")


@dataclass(frozen=True)
class NodeIdentity:
    """What the SuperNode's ``--node-config`` tells the app about its hospital."""

    hospital: str
    data_path: Path

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, object]) -> NodeIdentity:
        missing = [key for key in ("hospital", "data-path") if key not in node_config]
        if missing:
            raise ValueError(
                f"SuperNode --node-config lacks {missing}; start nodes with "
                "`federimed supernode` (it sets hospital=... data-path=...)"
            )
        return cls(str(node_config["hospital"]), Path(str(node_config["data-path"])))


def round_seed(run: RunConfig, hospital: str, server_round: int) -> int:
    """Different batches each round and hospital, identical on a re-run."""
    return run.seed * 1_000_003 + server_round * 1009 + sum(hospital.encode())


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
    if runtime.feature_cache is None and first_adapted_layer(model):
        log.info("%s: FEDERIMED_FEATURE_CACHE unset, frozen layers computed again", node.hospital)
    encoded = _with_features(model, encoded, device, run, runtime)
    validation = validation and _with_features(model, validation, device, run, runtime)
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


def local_training(
    run: RunConfig,
    node: NodeIdentity,
    server_round: int,
    proximal_mu: float,
    model: torch.nn.Module,
    data: Encoded,
    device: torch.device,
    seen: str,
) -> dict[str, float]:
    """The round's local steps, logged (``seen``: how the incoming model did here)."""
    settings = run.train_settings(
        seed=round_seed(run, node.hospital, server_round), proximal_mu=proximal_mu
    )
    log.info(
        "%s round %d: global model %s; training %d steps on %d examples (%s)",
        node.hospital,
        server_round,
        seen,
        settings.steps,
        len(data),
        device,
    )
    report = step_reporter(settings.steps, partial(_log_step, node.hospital), times=4)
    return train(model, data, settings, device, on_step=report)


def require_validation(cases: list, node: NodeIdentity) -> list:
    """Evaluation scores validation cases only: scores on training cases answer questions
    about them (the hospital's guard refuses such a task before it gets here)."""
    if not cases:
        raise ValueError(f"{node.hospital}: no validation cases, so no model is scored here")
    return cases


def _with_features(model, data, device, run: RunConfig, runtime: RuntimeSettings):
    """The frozen layers' output, from the hospital's cache folder when it has one."""
    return with_features(model, data, device, run.model, runtime.feature_cache)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _log_step(hospital: str, step: int, steps: int, loss: float) -> None:
    log.info("%s step %d/%d loss %.4f", hospital, step, steps, loss)


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
    return evaluate(model, _with_features(model, encoded, device, run, runtime), device)

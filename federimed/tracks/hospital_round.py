"""The round every track runs at a hospital: who it is, its seeds, its local steps.

Kept free of Flower types so the same steps are unit-tested directly and reused by the
local-only baselines.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from federimed.learning.batching import Encoded
from federimed.learning.features import first_adapted_layer, with_features
from federimed.learning.training import step_reporter, train
from federimed.runconfig import RunConfig
from federimed.settings import RuntimeSettings

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


def with_cached_features(
    model: torch.nn.Module,
    data: Encoded,
    device: torch.device,
    run: RunConfig,
    runtime: RuntimeSettings,
    node: NodeIdentity | None = None,
) -> Encoded:
    """The frozen layers' output for ``data``, from the hospital's cache folder when it has one
    (``FEDERIMED_FEATURE_CACHE``); ``node``: say so in its log when it has none."""
    if node is not None and runtime.feature_cache is None and first_adapted_layer(model):
        log.info("%s: FEDERIMED_FEATURE_CACHE unset, frozen layers computed again", node.hospital)
    return with_features(model, data, device, run.base_model, runtime.feature_cache)


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


def _log_step(hospital: str, step: int, steps: int, loss: float) -> None:
    log.info("%s step %d/%d loss %.4f", hospital, step, steps, loss)

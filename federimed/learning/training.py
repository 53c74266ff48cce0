"""Local training and evaluation: the same functions serve federated rounds and baselines.

Using one code path for federated, local-only and centralized training is what makes the
comparison fair: only the data and the weight exchange differ.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import cast

import numpy as np
import torch

from federimed.learning.batching import (
    Encoded,
    autocast,
    batch_tensors,
    frozen_weights_cast,
    model_config,
    precision_name,
    scoring_batches,
    training_attention,
)
from federimed.learning.dpsgd import (
    IGNORE_INDEX,
    add_noise,
    clipped_gradient_sum,
    poisson_batches,
)
from federimed.learning.features import Replay, replaying
from federimed.learning.metrics import probability_metrics
from federimed.runconfig import TrainSettings


def _batches(size: int, batch_size: int, steps: int, seed: int) -> Iterator[np.ndarray]:
    """`steps` batches drawn from reshuffled epochs, so every example is seen evenly."""
    rng = np.random.default_rng(seed)
    order = np.array([], dtype=np.int64)
    for _ in range(steps):
        while order.size < batch_size:
            order = np.concatenate([order, rng.permutation(size)])
        yield order[:batch_size]
        order = order[batch_size:]


def replay_if_cached(model: torch.nn.Module, data: Encoded) -> contextlib.AbstractContextManager:
    if data.features is None:
        return contextlib.nullcontext()
    return replaying(model, data.frozen_layers)


def _forward(model: torch.nn.Module, batch: dict[str, torch.Tensor], replay: Replay | None):
    features = batch.pop("features", None)
    if replay is not None:
        replay.hidden = features
    return model(**batch)


def answer_logits(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], replay: Replay | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A causal LM's logits where an answer token is predicted, and those tokens: the
    vocabulary-wide head over every prompt position would cost as much as the adapted layers
    (SmolLM2's 49k words against a short answer after a note of a hundred tokens)."""
    labels = batch.pop("labels")
    predicting = (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().flatten()
    logits = _forward(model, batch | {"logits_to_keep": predicting}, replay).logits
    return logits.float(), labels[:, predicting + 1]


def _loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], replay: Replay | None
) -> torch.Tensor:
    """The batch's mean loss: per case (a classifier), or per answer token (a causal LM)."""
    if batch["labels"].dim() == 1:
        return _forward(model, batch, replay).loss
    logits, targets = answer_logits(model, batch, replay)
    return torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX
    )


def step_reporter(
    steps: int, emit: Callable[[int, int, float], None], times: int
) -> Callable[[int, float], None]:
    """An ``on_step`` callback that passes on about ``times`` evenly spaced steps and the last:
    enough to follow a run without flooding a log."""
    every = max(1, steps // times)

    def report(step: int, loss: float) -> None:
        if step % every == 0 or step == steps:
            emit(step, steps, loss)

    return report


def train(
    model: torch.nn.Module,
    data: Encoded,
    settings: TrainSettings,
    device: torch.device,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, float]:
    """Run ``settings.steps`` optimizer steps; FedProx's proximal term when mu > 0."""
    if len(data) == 0:
        raise ValueError("no training examples")
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if settings.proximal_mu > 0 else None
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.01)
    scaler = torch.amp.GradScaler(
        enabled=precision_name(device) == "fp16"  # bf16 needs no loss scaling
    )
    losses = []
    private = settings.noise_multiplier > 0
    sample = poisson_batches if private else _batches
    noise = torch.Generator().manual_seed(settings.seed)
    frozen = frozen_weights_cast(model, device)
    with replay_if_cached(model, data) as replay, frozen, training_attention(device):

        def forward(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
            batch = batch_tensors(data, rows, device)
            labels = batch.pop("labels")
            with autocast(device):
                return _forward(model, batch, replay).logits, labels

        for step, rows in enumerate(
            sample(len(data), settings.batch_size, settings.steps, settings.seed)
        ):
            if private:
                loss = clipped_gradient_sum(model, params, forward, rows, settings.max_grad_norm)
                add_noise(
                    params,
                    settings.noise_multiplier,
                    settings.max_grad_norm,
                    settings.batch_size,
                    noise,
                )
                losses.append(_apply(params, anchor, settings.proximal_mu, optimizer, loss))
            else:
                with autocast(device):
                    batch_loss = _loss(model, batch_tensors(data, rows, device), replay)
                losses.append(
                    _step(batch_loss, params, anchor, settings.proximal_mu, optimizer, scaler)
                )
            if on_step:
                on_step(step + 1, losses[-1])
    tail = losses[-max(1, len(losses) // 4) :]
    return {"train_loss": float(np.mean(tail)), "num_examples": len(data)}


def _step(loss, params, anchor, proximal_mu: float, optimizer, scaler) -> float:
    """One optimizer step; FedProx's proximal term when there is an anchor."""
    if anchor is not None:
        drift = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
        loss = loss + proximal_mu / 2 * drift
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return float(loss.detach())


def _apply(params, anchor, proximal_mu: float, optimizer, loss: float) -> float:
    """The optimizer step on gradients already in ``.grad`` (DP-SGD's noised ones); FedProx's
    proximal term, which reads no data, added unnoised."""
    if anchor is not None:
        for param, start in zip(params, anchor, strict=True):
            param.grad = param.grad + proximal_mu * (param.detach() - start)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


@torch.no_grad()
def predict_proba(
    model: torch.nn.Module, data: Encoded, device: torch.device, batch_size: int = 64
) -> np.ndarray:
    model.to(device).eval()
    out = np.zeros((len(data), cast(int, model_config(model).num_labels)), dtype=np.float32)
    with replay_if_cached(model, data) as replay, frozen_weights_cast(model, device):
        for rows, batch in scoring_batches(data, device, batch_size):
            with autocast(device):
                logits = _forward(model, batch, replay).logits
            out[rows] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
    return out


def evaluate(
    model: torch.nn.Module,
    data: Encoded,
    device: torch.device,
    unseen: set[int] | None = None,
) -> dict[str, float]:
    """Accuracy, macro-F1, top-3 accuracy, calibration error and loss; accuracy on ``unseen``
    label indices when given."""
    proba = predict_proba(model, data, device)
    truth = data.labels.numpy()
    loss = float(-np.mean(np.log(proba[np.arange(len(truth)), truth] + 1e-12)))
    metrics = probability_metrics(truth, proba, unseen=unseen)
    metrics["loss"] = loss if math.isfinite(loss) else float("nan")
    metrics["num_examples"] = len(truth)
    return metrics

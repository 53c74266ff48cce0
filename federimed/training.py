"""Local training and evaluation: the same functions serve federated rounds and baselines.

Using one code path for federated, local-only and centralized training is what makes the
comparison fair: only the data and the weight exchange differ.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from federimed.data.records import Example
from federimed.dpsgd import (  # IGNORE_INDEX: a prompt's and padding's tokens carry no loss
    IGNORE_INDEX,
    add_noise,
    clipped_gradient_sum,
    poisson_batches,
)
from federimed.features import Replay, replaying
from federimed.metrics import probability_metrics
from federimed.settings import RuntimeSettings


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    batch_size: int
    learning_rate: float
    proximal_mu: float = 0.0
    seed: int = 0
    # DP-SGD (federimed.privacy): noise of std noise_multiplier x max_grad_norm on the sum of
    # per-case gradients clipped to max_grad_norm, batches Poisson-sampled; 0 = off.
    noise_multiplier: float = 0.0
    max_grad_norm: float = 1.0


@dataclass
class Encoded:
    """A tokenized split: tensors ready for batching, labels as indices, and optionally the
    frozen layers' output for every row (:mod:`federimed.features`)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    features: torch.Tensor | None = None
    frozen_layers: int = 0  # how many bottom layers ``features`` stands for

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def attach(self, features: torch.Tensor, frozen_layers: int) -> Encoded:
        return dataclasses.replace(self, features=features, frozen_layers=frozen_layers)

    @classmethod
    def concat(cls, parts: Sequence[Encoded]) -> Encoded:
        """Splits pooled, features included (padded to the widest) when every part has them."""
        features, layers = None, {p.frozen_layers for p in parts}
        if parts and len(layers) == 1 and all(p.features is not None for p in parts):
            width = max(p.features.shape[1] for p in parts)
            features = torch.cat(
                [torch.nn.functional.pad(p.features, (0, 0, 0, width - p.features.shape[1]))
                 for p in parts]
            )  # fmt: skip
        width = max(p.input_ids.shape[1] for p in parts)  # a causal LM's splits differ

        def widest(tensors: Sequence[torch.Tensor], fill: int) -> torch.Tensor:
            padded = [
                torch.nn.functional.pad(t, (0, width - t.shape[1]), value=fill)
                if t.dim() == 2 else t
                for t in tensors
            ]  # fmt: skip
            return torch.cat(padded)

        return cls(
            widest([p.input_ids for p in parts], 0),  # masked out: any token id
            widest([p.attention_mask for p in parts], 0),
            widest([p.labels for p in parts], IGNORE_INDEX),
            features,
            layers.pop() if features is not None else 0,
        )


# Mixed precision on GPUs, unless FEDERIMED_PRECISION=fp32; set for the process by pick_device,
# as torch's own thread count is.
_mixed_precision = True


def pick_device(runtime: RuntimeSettings | None = None) -> torch.device:
    global _mixed_precision
    runtime = runtime or RuntimeSettings()
    _mixed_precision = runtime.precision == "auto"
    if runtime.torch_threads:
        torch.set_num_threads(runtime.torch_threads)
    if runtime.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("FEDERIMED_DEVICE=cuda but no CUDA device is visible")
    if runtime.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision on GPUs (bf16 where supported), full precision on CPU."""
    if device.type != "cuda" or not _mixed_precision:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def encode(
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    labels: Sequence[str],
    max_length: int,
) -> Encoded:
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted({e.label for e in examples} - set(index))
    if unknown:
        raise ValueError(f"labels not in the model's label list: {unknown}")
    batch = tokenizer(
        [e.text for e in examples],
        truncation=True,
        max_length=max_length,
        padding="max_length",
        return_tensors="pt",
    )
    return Encoded(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        labels=torch.tensor([index[e.label] for e in examples], dtype=torch.long),
    )


def _batches(size: int, batch_size: int, steps: int, seed: int) -> Iterator[np.ndarray]:
    """`steps` batches drawn from reshuffled epochs, so every example is seen evenly."""
    rng = np.random.default_rng(seed)
    order = np.array([], dtype=np.int64)
    for _ in range(steps):
        while order.size < batch_size:
            order = np.concatenate([order, rng.permutation(size)])
        yield order[:batch_size]
        order = order[batch_size:]


def batch_tensors(
    data: Encoded, rows: np.ndarray, device: torch.device, with_features: bool = True
) -> dict[str, torch.Tensor]:
    """The rows' tensors without the padding columns none of them uses (a large CPU saving on
    short notes); ``features`` too when the split carries them."""
    mask = data.attention_mask[rows]
    width = max(int(mask.sum(dim=1).max()), 1)
    labels = data.labels[rows]
    batch = {
        "input_ids": data.input_ids[rows, :width].to(device),
        "attention_mask": mask[:, :width].to(device),
        # one label per case (classification) or per token (a causal LM's answer)
        "labels": (labels[:, :width] if labels.dim() == 2 else labels).to(device),
    }
    if with_features and data.features is not None:
        batch["features"] = data.features[rows, :width].to(device)
    return batch


def scoring_batches(
    data: Encoded, device: torch.device, batch_size: int, with_features: bool = True
) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
    """Every row once, as model inputs without labels (scoring, frozen layers), shortest cases
    first: a batch of cases of similar length carries little padding (about a quarter less
    computation on the synthetic notes than batches in file order)."""
    by_length = np.argsort(data.attention_mask.sum(dim=1).numpy(), kind="stable")
    for start in range(0, len(data), batch_size):
        rows = by_length[start : start + batch_size]
        batch = batch_tensors(data, rows, device, with_features)
        batch.pop("labels")
        yield rows, batch


def _replay_if_cached(model: torch.nn.Module, data: Encoded) -> contextlib.AbstractContextManager:
    if data.features is None:
        return contextlib.nullcontext()
    return replaying(model, data.frozen_layers)


def _forward(model: torch.nn.Module, batch: dict[str, torch.Tensor], replay: Replay | None):
    features = batch.pop("features", None)
    if replay is not None:
        replay.hidden = features
    return model(**batch)


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
        enabled=device.type == "cuda" and _mixed_precision and not _bf16(device)
    )
    losses = []
    private = settings.noise_multiplier > 0
    sample = poisson_batches if private else _batches
    noise = torch.Generator().manual_seed(settings.seed)
    with _replay_if_cached(model, data) as replay:

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
                    loss = _forward(model, batch_tensors(data, rows, device), replay).loss
                losses.append(_step(loss, params, anchor, settings.proximal_mu, optimizer, scaler))
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


def _bf16(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


@torch.no_grad()
def predict_proba(
    model: torch.nn.Module, data: Encoded, device: torch.device, batch_size: int = 64
) -> np.ndarray:
    model.to(device).eval()
    out = np.zeros((len(data), model.config.num_labels), dtype=np.float32)
    with _replay_if_cached(model, data) as replay:
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

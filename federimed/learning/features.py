"""The frozen layers below the adapter, computed once per case and replayed after that.

With LoRA in the top layers only (run config ``lora-layers``), every layer below the lowest
adapted one is frozen: a case gives the same hidden states there in every step, every round
and every scoring pass.  So they are computed once, in eval mode, and the adapted layers are
fed from that copy: a training step then costs the adapted layers forward and backward, and
scoring costs the adapted layers forward.  Measured on MiniLM (6 layers, adapters in the top
2): see ``bench/levers.py`` and the README's performance table.

Where the copy lives is the caller's choice: in memory for one process (the server's test set,
the demo's baselines), or in the hospital's own cache folder between rounds
(``FEDERIMED_FEATURE_CACHE``).  Hidden states are derived from patient text and are protected
like it: the folder is the hospital's, the files are private to its user, and nothing here
ever leaves the hospital.

The mechanism is generic over encoder families whose layers are one ``nn.ModuleList`` called
``layer`` (BERT, MiniLM, DistilBERT, RoBERTa, ...): the frozen layers are swapped for
stand-ins while a batch runs, and put back afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import torch
from torch import nn

from federimed.learning.batching import (
    Encoded,
    autocast,
    frozen_weights_cast,
    model_config,
    precision_name,
    scoring_batches,
)

log = logging.getLogger("flwr.federimed.learning.features")
_PROBE_ROWS = 2  # rows recomputed to check a cached copy still matches the model
# How far a recomputed token may lie from its stored copy (the norm of the difference over the
# token's norm) in each precision. Measured on SmolLM2's frozen layers: float16 storage leaves
# 3e-5, bf16 products in batches of another shape 1.2e-2 (its hidden states reach 2.5e4 in a
# few dimensions, so no elementwise bound fits both); another model is off by order 1.
_TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2, "fp16": 5e-2}
# what the transformer layers' list is called: BERT-style encoders, Llama-style decoders, GPT-2
_STACK_NAMES = ("layer", "layers", "h")


def layer_stack(model: nn.Module) -> nn.ModuleList | None:
    """The encoder's transformer layers, or None for a model without one such list."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.ModuleList) and last in _STACK_NAMES and len(module) == count:
            return module
    return None


def first_adapted_layer(model: nn.Module) -> int:
    """Index of the lowest layer with an adapter or a trainable weight (a model loaded for
    inference has no trainable weights, but its adapters are still named ``lora_``); the
    number of layers when none is adapted (a head trained alone), 0 when nothing is frozen
    below the adapters or the layers cannot be found."""
    stack = layer_stack(model)
    if stack is None:
        return 0
    for index, layer in enumerate(stack):
        if any(p.requires_grad or "lora_" in n for n, p in layer.named_parameters()):
            return index
    return len(stack)


def _up_to_layer(model: nn.Module, stack: nn.ModuleList, layers: int) -> list[torch.Tensor]:
    """The weights a case passes through before layer ``layers``: the embeddings and the
    layers below it (they precede the layer in every encoder family's parameter order)."""
    boundary = {id(p) for p in stack[layers].parameters()}
    below: list[torch.Tensor] = []
    for parameter in model.parameters():
        if id(parameter) in boundary:
            return below
        below.append(parameter)
    raise ValueError(f"layer {layers}'s weights not found in the model")


def keeps_frozen_layers(model: nn.Module, reference: nn.Module, layers: int) -> bool:
    """Whether ``model`` computes the bottom ``layers`` layers with exactly ``reference``'s
    weights, so features made with ``reference`` fit it: a saved model with its adapter merged
    cannot say which layers were adapted, but its weights can, bit for bit."""
    mine, theirs = layer_stack(model), layer_stack(reference)
    if mine is None or theirs is None or not 0 < layers < min(len(mine), len(theirs)):
        return False
    below = _up_to_layer(model, mine, layers)
    expected = _up_to_layer(reference, theirs, layers)
    return len(below) == len(expected) and all(
        a.shape == b.shape and torch.equal(a.detach().cpu(), b.detach().cpu())
        for a, b in zip(below, expected, strict=True)
    )


class _Skip(nn.Module):
    """Stands in for a frozen layer whose output is replayed further up."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


class Replay(nn.Module):
    """Stands in for the last frozen layer: returns the batch's stored hidden states."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.hidden is None or self.hidden.shape[:2] != hidden_states.shape[:2]:
            raise RuntimeError("replayed hidden states do not match the batch")
        return self.hidden.to(hidden_states.dtype)


@contextlib.contextmanager
def _swapped(stack: nn.ModuleList, replacements: dict[int, nn.Module]) -> Iterator[None]:
    originals = {index: stack[index] for index in replacements}
    for index, module in replacements.items():
        stack[index] = module
    try:
        yield
    finally:
        for index, module in originals.items():
            stack[index] = module


@contextlib.contextmanager
def replaying(model: nn.Module, layers: int) -> Iterator[Replay]:
    """The bottom ``layers`` replaced by a :class:`Replay` fed per batch by the caller; they
    must be frozen and unadapted in ``model``, as in the model that computed the features."""
    stack, first = layer_stack(model), first_adapted_layer(model)
    if stack is None or not 0 < layers <= first:
        raise ValueError(
            f"features of the bottom {layers} layer(s) do not fit this model "
            f"(its lowest adapted layer is {first})"
        )
    replay = Replay()
    replacements: dict[int, nn.Module] = {index: _Skip() for index in range(layers - 1)}
    replacements[layers - 1] = replay
    with _swapped(stack, replacements):
        yield replay


@torch.no_grad()
def frozen_features(
    model: nn.Module, data: Encoded, device: torch.device, batch_size: int = 64
) -> torch.Tensor:
    """Hidden states after the last frozen layer for every row, ``[rows, width, hidden]``
    (``width``: the longest case), in float16 on the CPU (half the memory; the adapted
    layers compute in float32 from it)."""
    stack, first = layer_stack(model), first_adapted_layer(model)
    if stack is None or first == 0:
        raise ValueError("the model has no frozen layers below its adapter to compute")
    captured: list[torch.Tensor] = []

    def keep(_module: nn.Module, _inputs: object, output: object) -> None:
        captured.append(cast(torch.Tensor, output[0] if isinstance(output, tuple) else output))

    model.to(device).eval()
    width = max(int(data.attention_mask.sum(dim=1).max()), 1) if len(data) else 1
    out = torch.zeros(len(data), width, model_config(model).hidden_size, dtype=torch.float16)
    hook = stack[first - 1].register_forward_hook(keep)
    try:
        skipped: dict[int, nn.Module] = {index: _Skip() for index in range(first, len(stack))}
        with _swapped(stack, skipped), frozen_weights_cast(model, device):
            for rows, batch in scoring_batches(data, device, batch_size, with_features=False):
                with autocast(device):
                    model(**batch)
                hidden = captured.pop()
                out[rows, : hidden.shape[1]] = hidden.float().cpu().half()
    finally:
        hook.remove()
    return out


def _key(model_name: str, first: int, data: Encoded, precision: str) -> str:
    digest = hashlib.sha256(f"{model_name}\0{first}\0{precision}\0".encode())
    digest.update(data.input_ids.numpy().tobytes())
    digest.update(data.attention_mask.numpy().tobytes())
    return digest.hexdigest()[:32]


def _still_matches(model: nn.Module, data: Encoded, cached: torch.Tensor, device) -> bool:
    """Recompute a few rows: a model changed under the same name must not reuse the copy."""
    rows = slice(0, min(_PROBE_ROWS, len(data)))
    probe = Encoded(data.input_ids[rows], data.attention_mask[rows], data.labels[rows])
    fresh = frozen_features(model, probe, device)
    width = fresh.shape[1]
    if cached.shape[0] != len(data) or cached.shape[1] < width or cached.shape[2] != fresh.shape[2]:
        return False
    # The case's own tokens only: what lies past a case's end depends on the batch it was
    # computed in, and no token of the case attends to it.
    real = probe.attention_mask[:, :width].bool()
    stored, now = cached[rows, :width][real].float(), fresh[real].float()
    error = (stored - now).norm(dim=-1) / now.norm(dim=-1).clamp_min(1e-6)
    return bool(error.max() <= _TOLERANCE[precision_name(device)])


def with_features(
    model: nn.Module,
    data: Encoded,
    device: torch.device,
    model_name: str,
    folder: Path | None = None,
) -> Encoded:
    """``data`` with the frozen layers' output attached (or as it is when the model has no
    frozen layers below its adapter); read from and written to ``folder`` when given."""
    first = first_adapted_layer(model)
    if first == 0 or len(data) == 0:
        return data
    path = (
        folder / f"frozen-{_key(model_name, first, data, precision_name(device))}.pt"
        if folder
        else None
    )
    if path is not None and path.is_file():
        try:
            cached = torch.load(path, weights_only=True)
            if _still_matches(model, data, cached, device):
                return data.attach(cached, first)
            log.warning("%s no longer matches the model; computing it again", path)
        except Exception as error:  # an unreadable copy is computed again, never trusted
            log.warning("%s unreadable (%s); computing it again", path, error)
    features = frozen_features(model, data, device)
    if path is not None:
        _save_private(features, path)
    return data.attach(features, first)


def _save_private(features: torch.Tensor, path: Path) -> None:
    """Written whole or not at all, readable by the hospital's user only."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        torch.save(features, handle)
    os.replace(partial, path)

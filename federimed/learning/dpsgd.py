"""DP-SGD's two data-dependent steps, for :func:`federimed.learning.training.train`: per-case
gradients clipped and summed, then Gaussian noise (the accountant that prices them:
federimed.hospital.privacy).

Per-case gradients come from one batched forward and backward when every trained parameter is
the weight or bias of an ``nn.Linear`` (true of both tracks: LoRA's A and B, the encoder's
pooler and classifier): a hook keeps each such layer's input and the gradient reaching its
output, and a case's gradient is their product over that case's positions (the "outer product"
trick Opacus uses for linear layers).  Anything else (a trained embedding, a layer called twice
in one forward) falls back to one forward and backward per case; both give the same numbers
(tests/test_privacy.py).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch

# The label of a token no loss is computed on (torch's and transformers' ignore_index).
IGNORE_INDEX = -100

# a linear layer -> its input, or the gradient at its output, in the batch just run
Taps = dict[torch.nn.Module, torch.Tensor]
# rows -> (logits, labels) of those cases, computed with the model's current weights
Forward = Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]]


def poisson_batches(size: int, batch_size: int, steps: int, seed: int) -> Iterator[np.ndarray]:
    """`steps` batches, each case in each independently with probability batch_size / size:
    the sampling the DP-SGD accountant assumes; a batch may be empty."""
    rng = np.random.default_rng(seed)
    rate = min(1.0, batch_size / size)
    for _ in range(steps):
        yield np.flatnonzero(rng.random(size) < rate)


def per_case_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss of each case: its label's cross-entropy (one label per case), or the mean over
    its answer tokens (a causal LM: next-token, as transformers computes it)."""
    logits = logits.float()
    if labels.dim() == 1:
        return torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    targets = labels[:, 1:]
    tokens = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return tokens.sum(dim=1) / (targets != IGNORE_INDEX).sum(dim=1).clamp(min=1)


def clipped_gradient_sum(
    model: torch.nn.Module,
    params: Sequence[torch.nn.Parameter],
    forward: Forward,
    rows: np.ndarray,
    max_grad_norm: float,
) -> float:
    """Leave in each parameter's ``.grad`` the sum over ``rows`` of the per-case gradients,
    each clipped to ``max_grad_norm`` in L2 over all ``params``; the cases' mean loss (nan for
    an empty batch, whose sum is zero)."""
    for param in params:
        param.grad = torch.zeros_like(param)
    if len(rows) == 0:
        return float("nan")
    taps = _LinearTaps(model, params)
    per_case = taps.per_case_gradients(forward, rows) if taps.complete else None
    if per_case is None:
        return _loop(params, forward, rows, max_grad_norm)
    losses, grads = per_case
    norms = torch.sqrt(_total(g.flatten(1).pow(2).sum(dim=1) for g in grads))
    scale = torch.clamp(max_grad_norm / (norms + 1e-12), max=1.0)
    for param, grad in zip(params, grads, strict=True):
        param.grad = torch.einsum("b,b...->...", scale, grad).to(param.dtype)
    return float(losses.mean())


def _total(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Their sum, added one after another as Python's ``sum`` adds them (the same bits)."""
    return functools.reduce(operator.add, tensors)


def _loop(params, forward: Forward, rows: np.ndarray, max_grad_norm: float) -> float:
    """One forward and backward per case: exact for any model, B times the passes."""
    total = 0.0
    for row in rows:
        logits, labels = forward(np.array([row]))
        loss = per_case_loss(logits, labels)[0]
        found = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [
            torch.zeros_like(p) if g is None else g.float()
            for g, p in zip(found, params, strict=True)
        ]
        norm = torch.sqrt(_total(g.pow(2).sum() for g in grads))
        scale = float(torch.clamp(max_grad_norm / (norm + 1e-12), max=1.0))
        for param, grad in zip(params, grads, strict=True):
            param.grad.add_(grad.to(param.dtype), alpha=scale)
        total += float(loss.detach())
    return total / len(rows)


class _LinearTaps:
    """The ``nn.Linear`` layers that own the trained parameters, and per case the product of
    each one's input with the gradient at its output."""

    def __init__(self, model: torch.nn.Module, params: Sequence[torch.nn.Parameter]):
        self.params = list(params)
        self.owners: dict[int, tuple[torch.nn.Linear, str]] = {}
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                for kind in ("weight", "bias"):
                    param = getattr(module, kind)
                    if param is not None and param.requires_grad:
                        self.owners[id(param)] = (module, kind)
        self.complete = all(id(p) in self.owners for p in self.params)

    def per_case_gradients(
        self, forward: Forward, rows: np.ndarray
    ) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
        """(per-case losses, per parameter a [cases, *shape] tensor); None when a layer ran
        more than once in the forward (its input would be ambiguous)."""
        modules = {module for module, _ in self.owners.values()}
        with self._tapped(modules) as (inputs, outputs, calls):
            logits, labels = forward(rows)
            losses = per_case_loss(logits, labels)
            torch.autograd.grad(losses.sum(), self.params, allow_unused=True)
        if any(count != 1 for count in calls.values()) or set(outputs) != set(calls):
            return None
        grads = []
        for param in self.params:
            module, kind = self.owners[id(param)]
            grads.append(_per_case(kind, inputs[module], outputs[module], len(rows)))
        return losses.detach(), grads

    @staticmethod
    @contextmanager
    def _tapped(
        modules: Iterable[torch.nn.Module],
    ) -> Iterator[tuple[Taps, Taps, dict[torch.nn.Module, int]]]:
        inputs: dict[torch.nn.Module, torch.Tensor] = {}
        outputs: dict[torch.nn.Module, torch.Tensor] = {}
        calls: dict[torch.nn.Module, int] = dict.fromkeys(modules, 0)

        def keep(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            calls[module] += 1
            inputs[module] = args[0].detach()
            if output.requires_grad:
                output.register_hook(lambda grad: outputs.__setitem__(module, grad.detach()))

        handles = [module.register_forward_hook(keep) for module in modules]
        try:
            yield inputs, outputs, calls
        finally:
            for handle in handles:
                handle.remove()


def _per_case(kind: str, inputs: torch.Tensor, grad_out: torch.Tensor, cases: int) -> torch.Tensor:
    """A linear layer's gradient for each case: over the case's positions, the gradient at the
    output times the input (weight), or the gradient alone (bias)."""
    grad_out = grad_out.reshape(cases, -1, grad_out.shape[-1]).float()
    if kind == "bias":
        return grad_out.sum(dim=1)
    inputs = inputs.reshape(cases, -1, inputs.shape[-1]).float()
    return torch.einsum("bto,bti->boi", grad_out, inputs)


def add_noise(
    params: Sequence[torch.nn.Parameter],
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch: int,
    generator: torch.Generator,
) -> None:
    """Gaussian noise of std σ·C on the clipped sum in ``.grad``, then the average over the
    expected batch size (the Poisson batch's own size would reveal whether a case was in it)."""
    std = noise_multiplier * max_grad_norm
    for param in params:
        summed = param.grad if param.grad is not None else torch.zeros_like(param)
        noise = torch.normal(0.0, std, size=param.shape, generator=generator)
        param.grad = (summed + noise.to(summed.device, summed.dtype)) / expected_batch

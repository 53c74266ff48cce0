"""How the exchanged weights cross the network: float32, or 8 bits a value (``wire-precision``).

Three layouts, told apart by their array names and dtypes alone, so that whoever reads a
message (the ClientApp, the hospital's guard, the ServerApp) decodes it without being told:

- ``{"exchanged": float32[n]}``: the weights themselves, in full (:func:`model.to_wire` order);
- ``{"exchanged": int8[n + 4b]}``: the weights, a step of 8 bits each, then a float32 scale
  per block of :data:`BLOCK` values, as bytes (the server's broadcast in an ``int8`` run);
- ``{"delta": int8[n + 4b]}``: a hospital's change to the weights it received, the same way
  (its reply in an ``int8`` run).

The hospital's guard, not the app, writes the 8-bit reply (:class:`ErrorFeedback`): what leaves
is what the guard clipped, quantized and ledgered, and 8 bits a value also caps what a hostile
app could hide in the low bits of a float.  A block's scale is its largest magnitude / 127: a
value is off by at most half a step.  The error a hospital's quantization makes is added to its
next update (error feedback, Seide et al. 2014; Karimireddy et al. 2019), so over rounds nothing
is lost, only delayed; the server keeps its model in float32 and quantizes only the copy it
sends, so the broadcast's rounding never accumulates in the global model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, get_args

import numpy as np

WIRE_ARRAY = "exchanged"
DELTA_ARRAY = "delta"
# 8,192 values a scale: 23 scales (92 bytes) for the demo's 184,736 values, so one update is
# 184,956 bytes with the array's 128-byte header, against 739,072 in float32.
BLOCK = 8192
LEVELS = 127
SCALE = np.dtype("<f4")  # the scales' bytes, after the steps, in the same int8 array

Precision = Literal["float32", "int8"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


class WireError(ValueError):
    """Arrays that are in none of the wire's layouts, or do not fit the weights they update."""


def quantize(values: np.ndarray) -> np.ndarray:
    """``values`` (flat) as one int8 array: a step per value, then one float32 scale per block
    (its bytes).  One array, not two: Flower sends each array of a message as an object of its
    own (a request per hop, and 128 bytes of header)."""
    flat = np.asarray(values, dtype=np.float32).reshape(-1)
    blocks = -(-flat.size // BLOCK)
    padded = np.zeros(blocks * BLOCK, dtype=np.float32)
    padded[: flat.size] = flat
    by_block = padded.reshape(blocks, BLOCK)
    scales = (np.abs(by_block).max(axis=1) / LEVELS).astype(SCALE)
    safe = np.where(scales > 0, scales, np.float32(1))[:, None]
    steps = np.clip(np.rint(by_block / safe), -LEVELS, LEVELS).astype(np.int8)
    return np.concatenate([steps.reshape(-1)[: flat.size], scales.view(np.int8)])


def dequantize(packed: np.ndarray) -> np.ndarray:
    """The float32 values :func:`quantize` stands for."""
    packed = _flat(packed)
    if packed.dtype != np.int8:
        raise WireError(f"8-bit weights must be int8, got {packed.dtype}")
    blocks = -(-packed.size // (BLOCK + SCALE.itemsize))
    size = packed.size - blocks * SCALE.itemsize
    if size < 0 or -(-size // BLOCK) != blocks:
        raise WireError(f"{packed.size} bytes are no {BLOCK}-value blocks with their scales")
    scales = packed[size:].view(SCALE)
    if not np.isfinite(scales).all() or (scales < 0).any():
        raise WireError("the 8-bit weights' scales are negative or not finite")
    per_value = np.repeat(scales.astype(np.float32), BLOCK)[:size]
    return packed[:size].astype(np.float32) * per_value


def encode(weights: np.ndarray, precision: Precision) -> dict[str, np.ndarray]:
    """The weights (flat float32) as the server sends them at ``precision``."""
    if precision == "float32":
        return {WIRE_ARRAY: np.asarray(weights, dtype=np.float32)}
    return {WIRE_ARRAY: quantize(weights)}


def is_quantized(arrays: Mapping[str, np.ndarray]) -> bool:
    """Whether the weights came 8 bits a value (then the update goes back that way too)."""
    return any(array.dtype == np.int8 for array in arrays.values())


def decode(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """The weights (flat float32) in ``arrays``, sent in either weights layout."""
    if list(arrays) != [WIRE_ARRAY]:
        raise WireError(f"weights are in none of the wire's layouts: {_describe(arrays)}")
    array = _flat(arrays[WIRE_ARRAY])
    return array if array.dtype == np.float32 else dequantize(array)


def apply_update(arrays: Mapping[str, np.ndarray], sent: np.ndarray) -> np.ndarray:
    """The weights a hospital's reply stands for, given the float32 weights ``sent`` to it: its
    8-bit change added to them, or its full weights (a float32 reply)."""
    if list(arrays) == [DELTA_ARRAY]:
        change = dequantize(arrays[DELTA_ARRAY])
        weights = sent + change if change.shape == sent.shape else change
    else:
        weights = decode(arrays)
    if weights.shape != sent.shape:
        raise WireError(f"{weights.size} values for weights of {sent.size}")
    return weights


class ErrorFeedback:
    """A hospital's 8-bit updates for one run: each carries the rounding the one before it left
    out.  Kept by round: the update for round n adds what round n-1's left (the latest round
    before n), so a round done again (a resumed run redoes the round its server died in) sends
    what the uninterrupted run sent.

    Kept by the guard, in the SuperNode's memory (a restarted SuperNode starts again from no
    residual: one round's rounding, at most half a step a value, is lost)."""

    KEPT_ROUNDS = 2

    def __init__(self) -> None:
        self.residuals: dict[int, np.ndarray] = {}  # round -> what its update rounded away

    def copy(self) -> ErrorFeedback:
        twin = ErrorFeedback()
        twin.residuals = dict(self.residuals)  # arrays are replaced, never changed in place
        return twin

    def encode(
        self,
        received: np.ndarray,
        trained: np.ndarray,
        server_round: int,
        max_norm: float | None = None,
    ) -> dict[str, np.ndarray]:
        """The 8-bit change for ``server_round``: the app's change plus what the round before
        rounded away; with ``max_norm``, clipped to that L2 norm as the server reads it (the
        rounding included), and what is clipped away is dropped, as without 8 bits."""
        change = trained.astype(np.float32) - received.astype(np.float32)
        before = [r for r in self.residuals if r < server_round]
        residual = self.residuals[max(before)] if before else None
        if residual is not None and residual.shape == change.shape:
            change += residual
        target = _shrunk(change, max_norm)  # what is clipped away is not sent later either
        packed = quantize(target)
        sent = dequantize(packed)
        if max_norm is not None and np.linalg.norm(sent) > max_norm:
            # rounding pushed it over: the steps stay, the scales shrink (quantizing is linear)
            packed = quantize(sent * np.float32(max_norm / np.linalg.norm(sent) * (1 - 1e-6)))
            sent = dequantize(packed)
        self.residuals[server_round] = target - sent
        for old in sorted(self.residuals)[: -self.KEPT_ROUNDS]:
            del self.residuals[old]
        return {DELTA_ARRAY: packed}


def _shrunk(change: np.ndarray, max_norm: float | None) -> np.ndarray:
    norm = float(np.linalg.norm(change))
    if max_norm is None or norm <= max_norm:
        return change
    return change * np.float32(max_norm / norm)


def _flat(array: np.ndarray) -> np.ndarray:
    if array.ndim != 1:
        raise WireError(f"the wire's arrays are flat, got shape {tuple(array.shape)}")
    return array


def _describe(arrays: Mapping[str, np.ndarray]) -> str:
    return ", ".join(f"{n!r} {a.dtype}{list(a.shape)}" for n, a in sorted(arrays.items())) or "none"

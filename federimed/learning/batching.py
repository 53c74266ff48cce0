"""Tokenized cases and how they reach the device: the data both training and the frozen-layer
cache (:mod:`federimed.learning.features`) work on, apart from both so that neither imports the
other.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from federimed.data.records import Example
from federimed.learning.dpsgd import IGNORE_INDEX  # a prompt's and padding's tokens carry no loss
from federimed.settings import RuntimeSettings


@dataclass
class Encoded:
    """A tokenized split: tensors ready for batching, labels as indices, and optionally the
    frozen layers' output for every row (:mod:`federimed.learning.features`)."""

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
        present = [p.features for p in parts if p.features is not None]
        if parts and len(layers) == 1 and len(present) == len(parts):
            width = max(f.shape[1] for f in present)
            features = torch.cat(
                [torch.nn.functional.pad(f, (0, 0, 0, width - f.shape[1])) for f in present]
            )
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
# bf16 autocast on a CPU that multiplies bf16 in hardware: off until pick_device turns it on, so
# that code which never asked for a device (a test, a library caller) computes in float32.
_cpu_bf16 = False


def model_config(model: torch.nn.Module) -> PretrainedConfig:
    """A transformers model's config (torch types ``model.config`` as a tensor or module)."""
    return cast(PretrainedConfig, model.config)


def pick_device(runtime: RuntimeSettings | None = None) -> torch.device:
    global _mixed_precision, _cpu_bf16
    runtime = runtime or RuntimeSettings()
    _mixed_precision = runtime.precision == "auto"
    _cpu_bf16 = _mixed_precision and native_cpu_bf16()
    if runtime.torch_threads:
        torch.set_num_threads(runtime.torch_threads)
    if runtime.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("FEDERIMED_DEVICE=cuda but no CUDA device is visible")
    if runtime.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def mixed_precision() -> bool:
    """Whether GPUs compute in mixed precision (as :func:`pick_device` last set it)."""
    return _mixed_precision


def native_cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX or AVX512-BF16: Xeon since
    Sapphire Rapids, AMD since Zen 4). There bf16 autocast computes SmolLM2's frozen layers
    2.7-3.2x and a LoRA step of MiniLM or SmolLM2 1.3x as fast as float32
    (``bench/cpu_precision.py``); on other CPUs bf16 is emulated and slower, so they stay in
    float32."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, probe, lambda: False)()) for probe in probes)


def precision_name(device: torch.device) -> str:
    """What :func:`autocast` computes in on ``device``: part of a frozen-layer cache's key,
    since float32 and bf16 give slightly different hidden states."""
    if device.type == "cuda" and _mixed_precision:
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if device.type == "cpu" and _cpu_bf16 else "fp32"


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision_name(device))


@contextlib.contextmanager
def frozen_weights_cast(model: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """The frozen linear maps' weights in :func:`autocast`'s dtype while the block runs, put
    back after. Autocast keeps a cast copy only of weights that require gradients, so it
    otherwise casts every frozen weight again in every forward pass: a fifth of SmolLM2's
    scoring time on a CPU (39 s against 31 for the 64 test cards). The products are the same
    (the same rounding, done once); trainable weights stay float32. A no-op in float32."""
    dtype = _autocast_dtype(device)
    swapped: list[tuple[torch.nn.Linear, torch.Tensor]] = []
    if dtype is not None:
        for module in model.modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            weight = module.weight
            if not weight.requires_grad and weight.dtype == torch.float32:
                swapped.append((module, weight))
                module.weight = torch.nn.Parameter(weight.detach().to(dtype), False)
    try:
        yield
    finally:
        for module, weight in swapped:
            module.weight = weight


def training_attention(device: torch.device) -> contextlib.AbstractContextManager:
    """Attention by plain matrix products while training on a CPU in bf16: the fused kernel's
    backward is 3.6x slower in bf16 than in float32 there, and a SmolLM2 step 10% slower with
    it (0.61-0.67 s against 0.57). Scoring, forward only, keeps the fused kernel: faster."""
    if device.type == "cpu" and _cpu_bf16:
        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision on GPUs (bf16 where supported) and on CPUs with native bf16
    (:func:`native_cpu_bf16`); float32 elsewhere, and everywhere with FEDERIMED_PRECISION=fp32.
    The weights stay float32: only the matrix products run in the lower precision."""
    dtype = _autocast_dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


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

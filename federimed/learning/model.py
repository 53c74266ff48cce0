"""The encoder, its LoRA adapter, and the part of it that crosses the network.

Only the adapter and the classification head are trainable, and only those are ever
exchanged: :func:`exchanged_state` is the single definition of "what leaves a hospital".
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import cast

import torch
import transformers
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from federimed.learning.batching import model_config
from federimed.learning.wire import WIRE_ARRAY, WireError, decode
from federimed.runconfig import LoraSettings, resolve_model

FEDERIMED_META = "federimed.json"


def quiet_libraries() -> None:
    """Keep per-process model-loading chatter out of logs that people read for progress."""
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


def load_tokenizer(model: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(resolve_model(model))


def _lora_targets(model: torch.nn.Module) -> list[str]:
    """Attention query/value projections, whatever the encoder family calls them."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for pair in (["query", "value"], ["q_lin", "v_lin"], ["q_proj", "v_proj"]):
        if set(pair) <= names:
            return pair
    raise ValueError(f"cannot find attention query/value layers in {type(model).__name__}")


def _head_modules(model: torch.nn.Module) -> list[str]:
    """The layers between the encoder and the logits, trained and exchanged with the head.

    BERT's pooler (and DistilBERT's pre-classifier) come from pre-training objectives that
    have nothing to do with diagnosis; training them with the classifier makes the head learn
    several times faster than a classifier on a frozen pooler (measured: 63% vs 26% test
    accuracy after 60 steps on the synthetic task).
    """
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    return [m for m in ("pooler", "pre_classifier") if m in names]


def build_classifier(model: str, labels: list[str], lora: LoraSettings, seed: int = 0) -> PeftModel:
    """The pretrained encoder, frozen, with a LoRA adapter and a fresh classification head.

    The seed makes the head and adapter initialisation identical on every participant, so a
    model built anywhere starts from the same point before the server's weights arrive.
    """
    torch.manual_seed(seed)
    base = AutoModelForSequenceClassification.from_pretrained(
        resolve_model(model),
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    if not lora.encoder_dropout:
        _without_dropout(base)
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=_lora_targets(base),
        modules_to_save=_head_modules(base),
        layers_to_transform=top_layers(base, lora.layers),
    )
    return get_peft_model(base, config)


def _without_dropout(model: torch.nn.Module) -> None:
    """Switch off the pretrained encoder's own dropout (attention weights, hidden states, the
    head's input) unless the run config's ``encoder-dropout`` keeps it.

    Drawing its random masks took about 30% of a CPU training step, single-threaded (so two
    threads trained only 1.1x faster than one), and over the few dozen steps a hospital trains
    its noise slowed learning more than it regularised (bench/levers.py, seeds 0-2: the demo's
    federation at 73.8% test accuracy and 0.54 on unseen conditions without it and without
    ``lora-dropout``, 68.2% and 0.46 with both, in half the training time).
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def label_names(model: torch.nn.Module) -> list[str]:
    """A classifier's labels in index order (its config's ``id2label``)."""
    id2label = cast(dict[int, str], model_config(model).id2label or {})
    return [id2label[i] for i in range(len(id2label))]


def top_layers(model: torch.nn.Module, count: int) -> list[int] | None:
    """The indices of the top ``count`` layers (None: all).  Everything below them stays
    frozen and is computed once per case (federimed.learning.features): the adapters in the top
    layers of a small encoder learn the task as well as adapters everywhere, at a fraction of the
    cost per step (measured in bench/levers.py)."""
    total = model_config(model).num_hidden_layers
    if count == 0 or count >= total:
        return None
    return list(range(total - count, total))


def exchanged_state(model: torch.nn.Module) -> OrderedDict[str, torch.Tensor]:
    """Adapter and head weights: everything a hospital sends, nothing else.  A copy: on CPU
    ``.cpu().float()`` would return the live parameters, which later training changes."""
    return OrderedDict(
        (name, tensor.detach().to("cpu", torch.float32, copy=True).contiguous())
        for name, tensor in get_peft_model_state_dict(model).items()
    )


def load_exchanged_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    expected = set(get_peft_model_state_dict(model))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"weights do not match the model: missing {missing}, unexpected {extra}")
    set_peft_model_state_dict(model, dict(state))


def to_wire(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` as it crosses the network: one flat float32 array, the tensors in name order.

    Flower sends each array of a message as objects of its own, one HTTPS request apiece at
    every hop (ServerApp, SuperLink, gateway, SuperNode, ClientApp, and back).  The demo's 12
    arrays (LoRA matrices, pooler, classifier) made 28 requests per hop: 1.6-2.7 s for a
    SuperNode to receive a round's model, 0.8-2 s to send its reply (the gateway's access log
    over a demo; the README's performance table).  One array makes five.
    FedAvg, FedProx, FedAdam, the median and the trimmed mean all work element by element, so
    every strategy aggregates the flat array as it did the named ones.
    """
    return {
        WIRE_ARRAY: torch.cat(
            [state[name].detach().reshape(-1).to("cpu", torch.float32) for name in sorted(state)]
        )
    }


def from_wire(
    model: torch.nn.Module, wire: Mapping[str, torch.Tensor]
) -> OrderedDict[str, torch.Tensor]:
    """The named tensors in ``wire`` (:func:`to_wire`, or its 8-bit form,
    :mod:`federimed.learning.wire`), laid out as ``model`` exchanges them."""
    try:
        flat = torch.from_numpy(decode({name: t.numpy() for name, t in wire.items()}))
    except WireError as error:
        raise ValueError(f"weights are not in FederiMed's wire format: {error}") from None
    shapes = {name: tensor.shape for name, tensor in get_peft_model_state_dict(model).items()}
    names = sorted(shapes)
    sizes = [math.prod(shapes[name]) for name in names]
    if flat.numel() != sum(sizes):
        raise ValueError(
            f"weights do not match the model: {WIRE_ARRAY!r} has {flat.numel()} values, this "
            f"model exchanges {sum(sizes)} (same model, labels, lora-r and lora-layers?)"
        )
    pieces = torch.split(flat, sizes)
    return OrderedDict(
        (name, piece.reshape(shapes[name]).clone())
        for name, piece in zip(names, pieces, strict=True)
    )


def receive(
    model: torch.nn.Module, wire: Mapping[str, torch.Tensor]
) -> OrderedDict[str, torch.Tensor]:
    """Load the state that arrived in the wire format into ``model``; it, by name."""
    state = from_wire(model, wire)
    load_exchanged_state(model, state)
    return state


def count_parameters(model: PeftModel) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def save_model(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    out: Path,
    base_model: str,
    merged: bool = True,
) -> Path:
    """Save the adapter (``out/adapter``) and, if asked, a merged model in ``out``.

    The merged folder is a plain `transformers` checkpoint (``AutoModelForSequenceClassification
    .from_pretrained(out)``) that needs neither peft nor the base weights; the adapter folder is
    what `peft` loads on top of the base model, a few hundred kB.
    """
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out / "adapter"))
    tokenizer.save_pretrained(out / "adapter")
    if merged:
        merged_model = _merged_copy(model)
        merged_model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    meta = {
        "base_model": base_model,
        "labels": label_names(model),
        "merged": merged,
    }
    for folder in (out, out / "adapter"):
        (folder / FEDERIMED_META).write_text(json.dumps(meta, indent=2))
    return out


def _merged_copy(model: PeftModel) -> PreTrainedModel:
    """Merge a copy, so the live model keeps its adapter for further rounds."""
    return cast(PreTrainedModel, copy.deepcopy(model).merge_and_unload())


@torch.no_grad()
def top_diagnoses(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, text: str, k: int
) -> list[tuple[str, float]]:
    """The ``k`` most probable labels for one case text, as (code, probability)."""
    batch = tokenizer([text], truncation=True, max_length=512, return_tensors="pt")
    proba = torch.softmax(model(**batch).logits[0].float(), dim=-1)
    top = torch.topk(proba, k=min(k, proba.numel()))
    labels = label_names(model)
    return [
        (labels[index], p)
        for p, index in zip(top.values.tolist(), top.indices.tolist(), strict=True)
    ]


def load_for_inference(path: Path) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Load a saved FederiMed model: a merged folder, or an adapter folder plus its base."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--model {path}: no such folder")
    if (path / "config.json").exists():
        model = AutoModelForSequenceClassification.from_pretrained(path).requires_grad_(False)
        return model.eval(), AutoTokenizer.from_pretrained(path)
    if (path / "adapter_config.json").exists():
        meta_file = path / FEDERIMED_META if (path / FEDERIMED_META).exists() else None
        meta = json.loads(meta_file.read_text()) if meta_file else {}
        config = json.loads((path / "adapter_config.json").read_text())
        base_name = meta.get("base_model") or config["base_model_name_or_path"]
        labels = meta.get("labels")
        if not labels:
            raise ValueError(f"{path}: adapter without {FEDERIMED_META}; cannot know the labels")
        base = AutoModelForSequenceClassification.from_pretrained(
            resolve_model(base_name),
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
        )
        model = PeftModel.from_pretrained(base, path)
        return model.eval(), AutoTokenizer.from_pretrained(path)
    raise ValueError(f"--model {path}: neither a transformers model nor a PEFT adapter folder")

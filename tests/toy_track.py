"""A third track, written as one module and registered, for tests/test_tracks.py.

``notes-length`` learns one number, the mean length in words of the hospitals' notes: a
hospital's folder holds ``notes.txt`` (training, a note a line) and ``notes-validation.txt``;
the common test set is ``notes-test.txt``.  Small enough to read, real enough that every seam
(the ClientApp, the server, the guard, the data layout, the report, the web app) calls into it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord

from federimed.consortium.global_model import GlobalModel
from federimed.tracks import Measures, State


def _lengths(path: Path) -> list[int]:
    return [len(line.split()) for line in path.read_text().splitlines() if line.strip()]


def _mean(path: Path) -> float:
    lengths = _lengths(path)
    return sum(lengths) / len(lengths)


class NotesLengthModel(GlobalModel):
    def __init__(self, run, out: Path):
        self.run, self.out, self.mean = run, out, 0.0

    def load(self, server_round: int, arrays: ArrayRecord) -> None:
        self.mean = float(arrays.to_torch_state_dict()["mean"])

    def score(self, server_round: int) -> dict[str, float] | None:
        test = self.run.test_set
        return None if test is None else {"error": abs(self.mean - _mean(test))}

    def save_final(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "notes-length.txt").write_text(f"{self.mean}\n")
        return self.out


class NotesLength:
    name = "notes-length"
    model_key = "model"
    test_file = "notes-test.txt"
    api = "/api/notes-length"
    sent = "one number"
    unseen_style_test = False
    model_folder = "notes-length.txt"
    measures = Measures(
        "error", "error in words", "error", "error in words", "error",
        "val_error", "error in words", fractions=False,
    )  # fmt: skip

    def train_round(self, run, node, global_wire, server_round, proximal_mu):
        mean = (float(global_wire["mean"]) + _mean(node.data_path / "notes.txt")) / 2
        state: State = {"mean": torch.tensor([mean])}
        return state, {"num_examples": float(len(_lengths(node.data_path / "notes.txt")))}

    def evaluate_round(self, run, node, global_wire):
        validation = _mean(node.data_path / "notes-validation.txt")
        return {"val_error": abs(float(global_wire["mean"]) - validation)}

    def count_cases(self, folder: Path) -> tuple[int, int]:
        return len(_lengths(folder / "notes.txt")), len(_lengths(folder / "notes-validation.txt"))

    def global_model(self, run, out: Path) -> GlobalModel:
        return NotesLengthModel(run, out)

    def resolve_base_model(self, name: str) -> str:
        return name

    def write_data(self, dataset, out: Path) -> list[str]:
        return []

    def comparison(self, federation, run, progress: Callable[[str], None],
                   feature_caches: Mapping[str, Path] | None) -> Any:  # fmt: skip
        raise NotImplementedError("no baselines for a one-number model")

    def holds_model(self, folder: Path) -> bool:
        return (folder / "notes-length.txt").is_file()

    def load_model(self, folder: Path) -> tuple[Any, Any]:
        return float((folder / "notes-length.txt").read_text()), None


TRACK = NotesLength()

"""The classify track: an encoder with a LoRA adapter and a head names the diagnosis of a note.

Its machinery: :mod:`.task` (the hospital's round), :mod:`federimed.learning.model` (the
encoder), :class:`federimed.consortium.global_model.GlobalClassifier` (the server's copy),
:class:`federimed.research.compare.Comparison` (the baselines).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from federimed.tracks import Measures, RoundInTaskModule

if TYPE_CHECKING:
    from federimed.consortium.global_model import GlobalModel
    from federimed.data.records import Federation
    from federimed.data.synth.config import SynthDataset
    from federimed.runconfig import RunConfig


class Classify(RoundInTaskModule):
    task_module = "federimed.tracks.classify.task"
    name = "classify"
    model_key = "model"
    test_file = "test.jsonl"
    api = "/api/predict"
    sent = "LoRA adapter + head"
    unseen_style_test = True
    measures = Measures(
        "accuracy", "test accuracy", "macro_f1", "macro-F1", "unseen_accuracy",
        "val_accuracy", "accuracy", fractions=True,
        columns=(
            ("accuracy", "top-1"), ("top3_accuracy", "top-3"), ("ece", "ECE"),
            ("macro_f1", "macro-F1"), ("unseen_accuracy", "top-1 on unseen conditions"),
            ("unseen_style_accuracy", "top-1 in the unseen style"),
            ("unseen_style_top3_accuracy", "top-3 in the unseen style"),
        ),
        unseen_style="unseen_style_accuracy",
    )  # fmt: skip

    def count_cases(self, folder: Path) -> tuple[int, int]:
        from federimed.data.records import load_hospital

        splits = load_hospital(folder)
        return len(splits.train), len(splits.validation)

    def global_model(self, run: RunConfig, out: Path) -> GlobalModel:
        from federimed.consortium.global_model import GlobalClassifier

        return GlobalClassifier(run, out)

    def resolve_base_model(self, name: str) -> str:
        from federimed.runconfig import resolve_model

        return resolve_model(name)

    def write_data(self, dataset: SynthDataset, out: Path) -> list[str]:
        return []  # the cases are the classify track's data

    def comparison(
        self,
        federation: Federation,
        run: RunConfig,
        progress: Callable[[str], None],
        feature_caches: Mapping[str, Path] | None,
    ) -> Any:
        from federimed.research.compare import Comparison

        return Comparison(federation, run, progress=progress, feature_caches=feature_caches)

    model_folder = "federimed.json beside a classifier's weights"

    def holds_model(self, folder: Path) -> bool:
        from federimed.learning.model import FEDERIMED_META

        return (folder / FEDERIMED_META).is_file()

    def load_model(self, folder: Path) -> tuple[Any, Any]:
        from federimed.learning.model import load_for_inference

        return load_for_inference(folder)


TRACK = Classify()

"""The generative track: a small causal LM with a LoRA adapter answers medical flashcards.

Its machinery: :mod:`.task` (the hospital's round and the scores), :mod:`.decoder` (the model,
prompts and answers), :mod:`.smollm2` (the default model, converted offline),
:class:`federimed.consortium.global_model.GlobalGenerator` (the server's copy),
:class:`federimed.research.compare.GenerativeComparison` (the baselines).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from federimed.data.records import TEST_FLASHCARDS
from federimed.tracks import Measures, RoundInTaskModule

if TYPE_CHECKING:
    from federimed.consortium.global_model import GlobalModel
    from federimed.data.records import Federation
    from federimed.data.synth.config import SynthDataset
    from federimed.runconfig import RunConfig


class Generative(RoundInTaskModule):
    task_module = "federimed.tracks.generative.task"
    name = "generative"
    model_key = "generator"
    test_file = TEST_FLASHCARDS
    api = "/api/ask"
    sent = "LoRA adapter"
    unseen_style_test = False
    measures = Measures(
        "choice_accuracy", "diagnosis multiple-choice accuracy", "exact_match",
        "diagnosis exact match", "unseen_choice_accuracy",
        "val_loss", "loss per answer token", fractions=False,
        columns=(
            ("choice_accuracy", "multiple-choice accuracy"),
            ("exact_match", "diagnosis exact match"), ("token_f1", "token-F1"),
            ("perplexity", "perplexity"),
            ("unseen_choice_accuracy", "multiple-choice accuracy on unseen conditions"),
            ("unseen_exact_match", "exact match on unseen conditions"),
            ("unseen_token_f1", "token-F1 on unseen conditions"),
            ("unseen_perplexity", "perplexity on unseen conditions"),
        ),
    )  # fmt: skip

    def count_cases(self, folder: Path) -> tuple[int, int]:
        from federimed.data.records import load_hospital_cards

        cards, validation_cards = load_hospital_cards(folder)
        return len(cards), len(validation_cards)

    def global_model(self, run: RunConfig, out: Path) -> GlobalModel:
        from federimed.consortium.global_model import GlobalGenerator

        return GlobalGenerator(run, out)

    def resolve_base_model(self, name: str) -> str:
        from federimed.tracks.generative.smollm2 import resolve_generator

        return resolve_generator(name)  # SmolLM2: converted once, here

    def write_data(self, dataset: SynthDataset, out: Path) -> list[str]:
        from federimed.data.flashcards import from_cases, write_flashcards

        cards = from_cases(dataset)
        write_flashcards(cards, out)
        lines = [
            f"{carded.name}: {len(carded.train)} flashcards, {len(carded.validation)} validation"
            for carded in cards.hospitals
        ]
        return [*lines, f"test: {len(cards.test)} flashcards -> {out / self.test_file}"]

    def comparison(
        self,
        federation: Federation,
        run: RunConfig,
        progress: Callable[[str], None],
        feature_caches: Mapping[str, Path] | None,
    ) -> Any:
        from federimed.research.compare import GenerativeComparison

        return GenerativeComparison(federation, run, progress, feature_caches)

    model_folder = "a causal LM's adapter: a run's final/ folder or the demo's model/"

    def holds_model(self, folder: Path) -> bool:
        """A causal LM's LoRA adapter: a run's ``final/`` with ``adapter/``, or the adapter
        folder itself."""
        adapter = folder / "adapter" if (folder / "adapter").is_dir() else folder
        config_file = adapter / "adapter_config.json"
        if not config_file.is_file():
            return False
        try:
            task = json.loads(config_file.read_text(encoding="utf-8")).get("task_type")
        except (ValueError, AttributeError) as error:
            raise ValueError(f"{config_file}: not a readable adapter config: {error}") from None
        return task == "CAUSAL_LM"

    def load_model(self, folder: Path) -> tuple[Any, Any]:
        from federimed.tracks.generative.decoder import load_answerer

        return load_answerer(folder)


TRACK = Generative()

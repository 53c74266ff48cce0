"""The server's copy of the global model, per track: scored on the common test set each
round, checkpointed, and saved where `transformers` and `peft` load it."""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import ArrayRecord
from peft import PeftModel

from federimed.consortium.resume import checkpoint_dir
from federimed.data.records import load_examples, load_flashcards
from federimed.learning.batching import Encoded, encode, pick_device
from federimed.learning.features import with_features
from federimed.learning.model import (
    build_classifier,
    load_tokenizer,
    receive,
    save_model,
)
from federimed.learning.training import evaluate
from federimed.runconfig import RunConfig
from federimed.runrecord import Scores
from federimed.tracks import track_for
from federimed.tracks.generative.decoder import build_generator, load_generator_tokenizer
from federimed.tracks.generative.task import OUTPUTS_FILE, Outputs, model_outputs

log = logging.getLogger("flwr.federimed.server")


class GlobalModel:
    """The server's copy of the model: checkpointed after every round, scored on the common
    test set (each track its own way), saved at the end."""

    run: RunConfig
    out: Path
    model: PeftModel

    def load(self, server_round: int, arrays: ArrayRecord) -> None:
        """Take ``arrays`` as the global model after ``server_round`` and checkpoint them."""
        receive(self.model, arrays.to_torch_state_dict())
        if server_round > 0:
            self.model.save_pretrained(str(checkpoint_dir(self.out, server_round)))

    def score(self, server_round: int) -> dict[str, float] | None:
        """The loaded model's scores on the common test set (None without one)."""
        raise NotImplementedError

    def save_final(self) -> Path:
        """Where the final model is saved for users to load."""
        raise NotImplementedError


class GlobalClassifier(GlobalModel):
    """The classify track's global model: scored on the common test notes each round."""

    def __init__(self, run: RunConfig, out: Path):
        self.run = run
        self.out = out
        self.labels = run.label_list
        self.model = build_classifier(run.model, self.labels, run.lora, seed=run.seed)
        self.tokenizer = load_tokenizer(run.model)
        self.device = pick_device()
        self.test = self._encoded(run.test_set)
        self.unseen_style = self._encoded(run.unseen_style_test_set)

    def _encoded(self, path: Path | None) -> Encoded | None:
        """A test set with the frozen layers' output computed once per run: each round's
        scoring then runs only the adapted layers."""
        if path is None:
            return None
        examples = load_examples(path, self.labels)
        test = encode(examples, self.tokenizer, self.labels, self.run.max_length)
        return with_features(self.model, test, self.device, self.run.model)

    def score(self, server_round: int) -> dict[str, float] | None:
        if self.test is None:
            return None
        metrics = evaluate(self.model, self.test, self.device)
        if self.unseen_style is not None:
            other = evaluate(self.model, self.unseen_style, self.device)
            metrics["unseen_style_accuracy"] = other["accuracy"]
            metrics["unseen_style_top3_accuracy"] = other["top3_accuracy"]
        log.info(
            "round %d: test accuracy %.3f (top-3 %.3f), macro-F1 %.3f, unseen style %s",
            server_round,
            metrics["accuracy"],
            metrics["top3_accuracy"],
            metrics["macro_f1"],
            metrics.get("unseen_style_accuracy", "n/a"),
        )
        return metrics

    def save_final(self) -> Path:
        return save_model(self.model, self.tokenizer, self.out / "final", self.run.model)


class GlobalGenerator(GlobalModel):
    """The generative track's global model: scored on the common test cards each round."""

    def __init__(self, run: RunConfig, out: Path):
        self.run = run
        self.out = out
        self.model = build_generator(run.generator, run.lora, seed=run.seed)
        self.tokenizer = load_generator_tokenizer(run.generator)
        self.device = pick_device()
        self.test = load_flashcards(run.test_set) if run.test_set else None
        self.final_outputs: Outputs | None = None

    def score(self, server_round: int) -> dict[str, float] | None:
        """Multiple choice and perplexity every round; the greedy answers (exact match,
        token-F1) after the last round only: they take about 30% of the scoring time (9 of 31 s
        for 64 cards on two cores), and an earlier round's model is a step on the way, not what
        anyone asks."""
        if self.test is None:
            return None
        last = server_round >= self.run.num_server_rounds
        outputs = model_outputs(
            self.model, self.tokenizer, self.test, self.run, self.device, answers=last
        )
        self.final_outputs = outputs if last else None
        metrics = outputs.scores(self.test)
        log.info("round %d: %s", server_round, Scores(**metrics).describe())
        return metrics

    def save_final(self) -> Path:
        """The adapter and its tokenizer (``final/adapter``): what `peft` loads on the base
        model its config names (the run's ``generator``), a few MB instead of the model."""
        final = self.out / "final"
        self.model.save_pretrained(str(final / "adapter"))
        self.tokenizer.save_pretrained(final / "adapter")
        if self.final_outputs is not None and self.test is not None:
            self.final_outputs.save(final / OUTPUTS_FILE, self.test)
        return final


def global_model_for(run: RunConfig, out: Path) -> GlobalModel:
    return track_for(run.track).global_model(run, out)

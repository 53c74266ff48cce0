"""The run configuration (``[tool.flwr.app.config]``), typed and validated once.

Flower hands apps a flat dict of TOML values; a wrong type or a typo there would otherwise
surface as a confusing error rounds later.  Both apps and the baselines read it through here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from federimed.data.records import labels_from_config
from federimed.model import LoraSettings
from federimed.training import TrainSettings

Strategy = Literal["fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg"]


class RunConfig(BaseModel):
    """Field names are the run-config keys with '-' written as '_'."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = "minilm"
    labels: str = ""
    max_length: int = Field(128, ge=8, le=512)
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    num_server_rounds: int = Field(5, ge=1)
    local_steps: int = Field(12, ge=1)
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(5e-3, gt=0)
    fraction_train: float = Field(1.0, gt=0, le=1)
    fraction_evaluate: float = Field(1.0, ge=0, le=1)
    min_nodes: int = Field(2, ge=1)
    strategy: Strategy = "fedavg"
    proximal_mu: float = Field(0.01, ge=0)
    server_learning_rate: float = Field(0.01, gt=0)
    test_path: str = ""
    output_dir: str = "runs/flower"
    audit_messages: bool = False
    seed: int = 0

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> RunConfig:
        values = {key.replace("-", "_"): value for key, value in run_config.items()}
        try:
            return cls(**values)
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}"
                for e in error.errors()
            )
            raise ValueError(f"invalid run config: {problems}") from None

    @property
    def label_list(self) -> list[str]:
        return labels_from_config(self.labels)

    @property
    def lora(self) -> LoraSettings:
        return LoraSettings(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout)

    def train_settings(
        self, steps: int | None = None, seed: int = 0, proximal_mu: float = 0.0
    ) -> TrainSettings:
        return TrainSettings(
            steps=steps or self.local_steps,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            max_length=self.max_length,
            proximal_mu=proximal_mu,
            seed=seed,
        )

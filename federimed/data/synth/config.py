"""Settings and records of the generator: what to make (SynthConfig) and what it makes."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from federimed.data.conditions import (
    CONDITIONS,
)

STYLES = ("ed", "triage", "nursing", "sbar", "referral", "discharge", "gp", "telegraphic")
CONTEXTS = ("elderly", "diabetic", "pregnant", "immunosuppressed")

MIN_TRAIN_PER_SEEN = 2
ATYPICAL_SHARE = 0.3  # of all cases, over the catalogue (conditions without an entry: none)
CONTEXT_RATE = 0.15  # typical cases that still carry a patient context
CLASSIC_COMPLAINT_RATE = 0.55
MAX_WORDS = 110
MAX_TOKENS = 118  # estimated word pieces (see estimated_tokens): fits a 128-token window
RARE_UNSEEN_WEIGHT = 6.0
SIZE_FACTORS = (0.6, 1.4)
ELDERLY_AGE = 75
PREGNANT_AGES = (18, 42)

# Probability that a whole section is left out of a note (documentation is never complete).
OMIT = {
    "symptoms": 0.1,
    "negatives": 0.3,
    "history": 0.3,
    "meds": 0.5,
    "exam": 0.2,
    "vitals": 0.15,
    "labs": 0.3,
    "investigations": 0.35,
}


@dataclass(frozen=True)
class SynthConfig:
    """Everything that determines a generated dataset; invalid values fail at construction.

    ``held_out_style`` is the style no hospital writes in (None: ``STYLES[seed % 8]``); the
    unseen-style test set holds ``unseen_style_cases_per_condition`` notes per condition in it.
    """

    hospitals: int = 3
    seed: int = 0
    alpha: float = 0.5
    cases_per_hospital: int = 300
    test_cases_per_condition: int = 10
    validation_fraction: float = 0.15
    unseen_per_hospital: int = 6
    held_out_style: str | None = None
    unseen_style_cases_per_condition: int = 5

    def __post_init__(self) -> None:
        _require(self.hospitals >= 1, "hospitals must be >= 1")
        _require(self.alpha > 0, "alpha must be > 0 (Dirichlet concentration)")
        _require(self.test_cases_per_condition >= 1, "test_cases_per_condition must be >= 1")
        _require(0 <= self.validation_fraction < 1, "validation_fraction must be in [0, 1)")
        _require(
            0 <= self.unseen_per_hospital <= len(CONDITIONS) // 2,
            f"unseen_per_hospital must be between 0 and {len(CONDITIONS) // 2}"
            " so that every condition can stay present at some hospital",
        )
        _require(
            self.held_out_style is None or self.held_out_style in STYLES,
            f"held_out_style must be one of {', '.join(STYLES)} (or None: chosen by the seed),"
            f" got {self.held_out_style!r}",
        )
        _require(
            self.unseen_style_cases_per_condition >= 1,
            "unseen_style_cases_per_condition must be >= 1",
        )
        smallest_train = min(_split_sizes(n, self.validation_fraction)[0] for n in _sizes(self))
        unseen = self.unseen_per_hospital if self.hospitals > 1 else 0
        needed = MIN_TRAIN_PER_SEEN * (len(CONDITIONS) - unseen)
        _require(
            smallest_train >= needed,
            f"cases_per_hospital={self.cases_per_hospital} is too small: the smallest hospital"
            f" gets {smallest_train} training cases but needs {needed}"
            f" ({MIN_TRAIN_PER_SEEN} per condition it has)",
        )

    @property
    def held_out(self) -> str:
        """The held-out style: the configured one, else the seed's turn in the rotation."""
        return self.held_out_style or STYLES[self.seed % len(STYLES)]


@dataclass(frozen=True)
class HospitalData:
    """One hospital's private data; ``unseen`` lists the codes absent from its train set and
    ``styles`` the writing styles its notes use."""

    name: str
    train: list[dict]
    validation: list[dict]
    unseen: tuple[str, ...]
    styles: tuple[str, ...] = ()


@dataclass(frozen=True)
class SynthDataset:
    """All hospitals, the common balanced test set (every style) and the unseen-style test set
    (only ``held_out_style``, which no hospital writes in)."""

    hospitals: list[HospitalData]
    test: list[dict]
    labels: dict[str, str]
    config: SynthConfig | None = None
    held_out_style: str = ""
    unseen_style_test: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class Note:
    """One generated note and what decided it (the records keep only text, label and style)."""

    text: str
    code: str
    style: str
    context: str | None
    atypical: bool


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


# --------------------------------------------------------------------------------------------


def _sizes(config: SynthConfig) -> list[int]:
    """Hospital sizes spread evenly between 0.6x and 1.4x, in a seeded order."""
    if config.hospitals == 1:
        return [config.cases_per_hospital]
    low, high = SIZE_FACTORS
    step = (high - low) / (config.hospitals - 1)
    factors = [low + i * step for i in range(config.hospitals)]
    random.Random(f"federimed-sizes:{config.seed}").shuffle(factors)
    return [round(config.cases_per_hospital * f) for f in factors]


def _split_sizes(n: int, validation_fraction: float) -> tuple[int, int]:
    validation = round(n * validation_fraction)
    return n - validation, validation

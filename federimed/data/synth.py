"""Deterministic synthetic clinical notes in eight writing styles, and the non-IID split.

Real notes cannot leave a hospital, so development and tests run on cases generated from the
catalogue in :mod:`federimed.data.conditions`.  A model that learns the generator's templates
instead of the medicine does well on our own test set and badly on notes clinicians write, so the
generator is built for variety where real notes vary and for consistency where medicine is fixed:

* eight writing styles (:data:`STYLES`): ED clerking, triage line, nursing note, SBAR handover,
  referral, discharge summary, GP letter and telegraphic shorthand, each with its own
  vocabulary, abbreviations, section orders and length (a triage line is one line);
* every finding is paraphrased at the phrase level (:data:`PARAPHRASES`: formal, shorthand and
  lay wordings, word-order changes), negations come in several forms (no, denies, nil, not,
  without, -ve), vitals and labs in several formats, with typos and missing punctuation at a
  modest per-style rate;
* a third of the cases present atypically, tied to a patient context visible in the note
  (elderly, diabetic, pregnant, immunosuppressed; see ``ATYPICAL_PRESENTATIONS``), and chronic
  findings of the patient's background conditions act as distractors;
* every hospital writes in two or three styles with its own habits, and one style
  (``held_out_style``) is written by no hospital: ``test-unseen-style.jsonl`` measures how well
  a model trained on the other styles reads it.

Nothing ever contradicts the label: a condition's hallmarks are never negated in its own notes,
negatives never deny what the note reports, and contexts only appear where age and sex allow.
Everything is a pure function of :class:`SynthConfig`: each random stream is seeded from the
config's seed and a fixed name, never from global random state.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import TypeVar

import numpy as np

from federimed.data.conditions import (
    ATYPICAL_PRESENTATIONS,
    BY_CODE,
    CONDITIONS,
    FEMALE_ONLY,
    INCIDENTAL_HISTORY,
    LABS,
    MALE_ONLY,
    MEDICATIONS,
    PANELS,
    Atypical,
    Condition,
    Incidental,
    label_names,
)
from federimed.data.paraphrase import PARAPHRASES, join_and, segments, variants

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
# Writing styles and hospital habits
# --------------------------------------------------------------------------------------------

SECTIONS = (
    "opening",
    "symptoms",
    "negatives",
    "history",
    "meds",
    "social",
    "exam",
    "vitals",
    "labs",
    "investigations",
    "plan",
    "care",
    "closing",
)
VITALS_FORMATS = (
    "abbr",  # HR 110 BP 92/60 RR 22 SpO2 94% T 38.2C
    "compact",  # P110 BP92/60 RR22 sats94%RA T38.2
    "slash",  # obs 110/92/60/22/94%RA/38.2
    "words",  # heart rate 110, blood pressure 92/60, ...
    "mixed",  # pulse 110, BP 92/60, RR 22, sats 94% RA, temp 38.2
    "equals",  # HR=110 BP=92/60 ...
    "units",  # HR 110 bpm, BP 92/60 mmHg, RR 22/min, SpO2 94% on room air, T 38.2°C
    "tpr",  # T 38.2 P 110 R 22 BP 92/60 sats 94%
    "colon",  # HR: 110 | BP: 92/60 | ...
    "prose",  # pulse of 110, blood pressure of 92/60, ...
)
LAB_FORMATS = (
    "plain",  # Hb 102
    "units",  # Hb 102 g/L
    "flag",  # Hb 102 g/L (L)
    "equals",  # Hb=102
    "arrow",  # Hb: 102 ↓
    "prose",  # Hb of 102 g/L
)
NEGATION_FORMS = (
    "no", "denies", "denied", "nil", "not", "without", "-ve", "neg", "negative for",
)  # fmt: skip


@dataclass(frozen=True)
class _Style:
    """How one style writes: lengths, wording propensities, formats, sections and templates."""

    words: tuple[int, int]
    short: float  # chance that a wording with a shorthand form uses it
    lay: float  # chance of the patient's words where there are some
    typos: float  # chance per long word
    sloppy: float  # chance per sentence of a missing full stop or capital
    join: str  # how list items are joined: prose ("a, b and c"), comma, slash
    demographics: tuple[str, ...]
    durations: tuple[str, ...]
    vitals: tuple[str, ...]
    labs: tuple[str, ...]
    negations: tuple[str, ...]
    caps: dict[str, int]
    plan: float  # chance of an impression or differential
    layouts: tuple[tuple[str, ...], ...]
    templates: dict[str, tuple[str, ...]]

    def __post_init__(self) -> None:
        """A misspelt format or section in the tables below fails at import, not as a note
        silently written without it."""
        named = {name for layout in self.layouts for name in layout if not name.startswith("@")}
        for kind, used, known in (
            ("vitals format", self.vitals, VITALS_FORMATS),
            ("lab format", self.labs, LAB_FORMATS),
            ("negation form", self.negations, NEGATION_FORMS),
            ("section", named | set(self.templates), SECTIONS),
        ):
            if unknown := sorted(set(used) - set(known)):
                raise ValueError(f"unknown {kind}(s) {unknown}; known: {', '.join(known)}")


_NO_CAPS: dict[str, int] = {}
# fmt: off
_STYLES: dict[str, _Style] = {
    "ed": _Style(
        words=(35, 110),
        short=0.55,
        lay=0.05,
        typos=0.012,
        sloppy=0.08,
        join="comma",
        demographics=("{age}{MF}", "{age} {MF}", "{age}yo {MF}", "{age} y/o {mf}"),
        durations=("short", "numeric", "slash"),
        vitals=("abbr", "mixed", "equals", "units", "colon", "slash"),
        labs=("plain", "units", "flag", "equals", "arrow"),
        negations=("denies", "no", "nil", "-ve", "negative for"),
        caps=_NO_CAPS,
        plan=0.45,
        layouts=(
            ("opening", "symptoms", "negatives", "history", "meds", "social", "exam", "vitals", "labs", "investigations", "plan"),  # noqa: E501
            ("opening", "symptoms", "negatives", "vitals", "exam", "history", "meds", "labs", "investigations", "plan"),  # noqa: E501
            ("opening", "history", "symptoms", "negatives", "meds", "vitals", "exam", "investigations", "labs", "plan"),  # noqa: E501
        ),
        templates={
            "opening": (
                "PC: {complaint} x {dur}. {demo}.",
                "{demo} presents with {complaint}, {dur}.",
                "{demo}. PC {complaint} ({dur}).",
                "{demo} BIBA with {complaint} x{dur}.",
            ),
            "symptoms": ("HPC: {items}.", "Assoc {items}.", "Also reports {items}."),
            "history": ("PMH: {items}.", "PMHx {items}.", "Bg {items}."),
            "meds": ("DH: {items}.", "Meds: {items}."),
            "social": ("SH: {items}.",),
            "exam": ("O/E: {items}.", "Exam: {items}.", "OE {items}."),
            "vitals": ("Obs: {items}.", "{items}."),
            "labs": ("Bloods: {items}.", "Labs {items}."),
            "investigations": ("Ix: {items}.", "{items}."),
            "plan": ("Imp: {items}.", "Plan: {items}.", "{items}."),
        },
    ),
    "triage": _Style(
        words=(10, 40),
        short=0.8,
        lay=0.2,
        typos=0.02,
        sloppy=0.25,
        join="comma",
        demographics=("{age}{MF}", "{age} {MF}", "{MF} {age}", "{age}yo {MF}"),
        durations=("short", "slash"),
        vitals=("compact", "slash", "abbr", "equals", "tpr"),
        labs=("plain", "equals"),
        negations=("no", "nil", "denies", "-ve"),
        caps={"symptoms": 2, "negatives": 1, "history": 1, "meds": 0, "social": 0, "exam": 1,
              "labs": 1, "investigations": 1, "care": 0, "closing": 0},
        plan=0.7,
        layouts=(
            ("opening", "symptoms", "negatives", "vitals", "history", "labs", "investigations", "plan"),  # noqa: E501
            ("opening", "vitals", "symptoms", "exam", "history", "plan"),
            ("opening", "symptoms", "vitals", "negatives", "history", "investigations", "plan"),
        ),
        templates={
            "opening": (
                "{demo} {complaint} {dur}.",
                "{demo} c/o {complaint} x{dur}.",
                "Triage: {demo}, {complaint} {dur}.",
            ),
            "symptoms": ("{items}.", "+ {items}."),
            "history": ("Hx {items}.", "PMH {items}."),
            "exam": ("{items}.",),
            "vitals": ("{items}.", "Obs {items}."),
            "labs": ("{items}.",),
            "investigations": ("{items}.",),
            "plan": ("{items}.",),
        },
    ),
    "nursing": _Style(
        words=(30, 100),
        short=0.45,
        lay=0.3,
        typos=0.02,
        sloppy=0.15,
        join="comma",
        demographics=("{age} y/o {mf}", "{age}yo {man}", "{age} year old {gent}", "{age}{MF}"),
        durations=("numeric", "short"),
        vitals=("mixed", "units", "tpr", "colon", "abbr"),
        labs=("plain", "units", "arrow"),
        negations=("denies", "no", "nil", "not"),
        caps={"investigations": 1, "plan": 0, "closing": 0},
        plan=0.0,
        layouts=(
            ("opening", "symptoms", "vitals", "exam", "negatives", "history", "labs", "care", "social"),  # noqa: E501
            ("opening", "vitals", "symptoms", "negatives", "exam", "care", "history", "meds", "social"),  # noqa: E501
            ("opening", "history", "symptoms", "vitals", "exam", "negatives", "investigations", "care"),  # noqa: E501
        ),
        templates={
            "opening": (
                "Pt is a {demo} admitted with {complaint} x {dur}.",
                "{demo} admitted via ED with {complaint}, {dur}.",
                "Pt c/o {complaint} for {dur}. {demo}.",
            ),
            "symptoms": ("Pt reports {items}.", "Also c/o {items}.", "C/o {items}."),
            "history": ("PMH: {items}.", "Hx of {items}."),
            "meds": ("Regular meds: {items}.",),
            "social": ("{items}.",),
            "exam": ("On assessment: {items}.", "Noted {items}."),
            "vitals": ("Obs: {items}.", "Vital signs {items}."),
            "labs": ("Bloods: {items}.",),
            "investigations": ("{items}.",),
        },
    ),
    "sbar": _Style(
        words=(35, 100),
        short=0.5,
        lay=0.05,
        typos=0.012,
        sloppy=0.08,
        join="comma",
        demographics=("{age}{MF}", "{age} year old {man}", "{age} y/o {gent}"),
        durations=("short", "numeric"),
        vitals=("abbr", "mixed", "slash", "colon"),
        labs=("plain", "flag", "arrow"),
        negations=("no", "denies", "nil"),
        caps={"care": 0, "closing": 0},
        plan=0.8,
        layouts=(
            ("@S:", "opening", "symptoms", "negatives", "@B:", "history", "meds", "social", "@A:", "vitals", "exam", "labs", "investigations", "@R:", "plan"),  # noqa: E501
            ("@Situation:", "opening", "symptoms", "@Background:", "history", "meds", "@Assessment:", "vitals", "exam", "negatives", "labs", "investigations", "@Recommendation:", "plan"),  # noqa: E501
            ("@Handover:", "opening", "symptoms", "negatives", "history", "vitals", "exam", "labs", "investigations", "plan"),  # noqa: E501
        ),
        templates={
            "opening": ("{demo} with {complaint} for {dur}.", "{demo}, {complaint} x {dur}."),
            "symptoms": ("{items}.", "Also {items}."),
            "history": ("PMH {items}.", "{items}."),
            "meds": ("On {items}.",),
            "social": ("{items}.",),
            "exam": ("{items}.", "O/E {items}."),
            "vitals": ("{items}.", "Obs {items}."),
            "labs": ("{items}.", "Bloods {items}."),
            "investigations": ("{items}.",),
            "plan": ("{items}.",),
        },
    ),
    "referral": _Style(
        words=(45, 110),
        short=0.08,
        lay=0.08,
        typos=0.004,
        sloppy=0.02,
        join="prose",
        demographics=("{age}-year-old {man}", "{age} year old {gent}"),
        durations=("words", "numeric"),
        vitals=("words", "mixed", "units", "prose"),
        labs=("units", "flag", "prose"),
        negations=("denies", "no", "without", "not"),
        caps={"care": 0},
        plan=0.5,
        layouts=(
            ("opening", "symptoms", "negatives", "history", "meds", "exam", "vitals", "labs", "investigations", "plan", "closing"),  # noqa: E501
            ("opening", "history", "symptoms", "negatives", "vitals", "exam", "investigations", "labs", "meds", "plan", "closing"),  # noqa: E501
        ),
        templates={
            "opening": (
                "Referral to {team} team: {demo} with {complaint} over {dur}.",
                "I would be grateful if you could see this {demo} who presented with {dur} of {complaint}.",  # noqa: E501
                "Reason for referral: {complaint} for {dur} in {a_demo}.",
            ),
            "symptoms": ("{He} reports {items}.", "Associated symptoms include {items}."),
            "history": ("Past history: {items}.", "{He} has a background of {items}."),
            "meds": ("Medications: {items}.",),
            "social": ("{items}.",),
            "exam": ("On examination {items}.", "Examination: {items}."),
            "vitals": ("Observations: {items}.", "{His} observations were {items}."),
            "labs": ("Bloods show {items}.", "Blood results: {items}."),
            "investigations": ("{items}.",),
            "plan": ("{items}.",),
            "closing": ("Many thanks.", "Thank you."),
        },
    ),
    "discharge": _Style(
        words=(45, 110),
        short=0.1,
        lay=0.0,
        typos=0.004,
        sloppy=0.02,
        join="prose",
        demographics=("{age}-year-old {man}", "{age}-year-old {mf}"),
        durations=("words", "numeric"),
        vitals=("words", "units", "mixed"),
        labs=("units", "flag", "prose"),
        negations=("denied", "no", "without", "not"),
        caps={"care": 0, "plan": 0, "closing": 0},
        plan=0.0,
        layouts=(
            ("opening", "symptoms", "negatives", "exam", "vitals", "labs", "investigations", "history", "meds", "social"),  # noqa: E501
            ("opening", "history", "symptoms", "negatives", "vitals", "exam", "investigations", "labs", "meds"),  # noqa: E501
        ),
        templates={
            "opening": (
                "Discharge summary. {demo} admitted with {complaint}, {a_dur} history.",
                "Presenting complaint: {complaint} for {dur}. {demo}.",
                "This {demo} was admitted with {a_dur} history of {complaint}.",
            ),
            "symptoms": ("On admission {he} reported {items}.", "Associated: {items}."),
            "history": ("Background: {items}.", "PMH: {items}."),
            "meds": ("Medications on admission: {items}.", "Drug history: {items}."),
            "social": ("Social: {items}.",),
            "exam": ("Examination on admission: {items}.", "Findings: {items}."),
            "vitals": ("Admission observations: {items}.", "Obs on arrival: {items}."),
            "labs": ("Admission bloods: {items}.", "Results: {items}."),
            "investigations": ("Investigations: {items}.", "{items}."),
        },
    ),
    "gp": _Style(
        words=(45, 110),
        short=0.1,
        lay=0.3,
        typos=0.008,
        sloppy=0.03,
        join="prose",
        demographics=("{age}-year-old {gent}", "{age} year old {man}", "pleasant {age}-year-old {gent}"),  # noqa: E501
        durations=("words", "numeric"),
        vitals=("mixed", "words", "prose"),
        labs=("units", "prose"),
        negations=("denies", "no", "not"),
        caps={"labs": 1, "care": 0},
        plan=0.4,
        layouts=(
            ("opening", "symptoms", "negatives", "history", "meds", "exam", "vitals", "labs", "investigations", "plan", "closing"),  # noqa: E501
            ("opening", "history", "symptoms", "negatives", "exam", "vitals", "investigations", "meds", "plan", "closing"),  # noqa: E501
        ),
        templates={
            "opening": (
                "Dear Doctor, thank you for seeing this {demo} who presents with {dur} of {complaint}.",  # noqa: E501
                "Dear colleague, I would be grateful if you could assess this {demo} with {complaint} for {dur}.",  # noqa: E501
                "Re: {demo}. I saw {him} today with {complaint}, present for {dur}.",
            ),
            "symptoms": ("{He} tells me of {items}.", "{He} also mentions {items}."),
            "history": ("{He} is known to have {items}.", "PMH: {items}."),
            "meds": ("Current medication: {items}.", "{He} takes {items}."),
            "social": ("{items}.",),
            "exam": ("On examination today {items}.", "Examination: {items}."),
            "vitals": ("Observations: {items}.", "{His} observations were {items}."),
            "labs": ("Point-of-care testing: {items}.",),
            "investigations": ("{items}.",),
            "plan": ("{items}.",),
            "closing": ("Yours sincerely.", "Many thanks.", "Kind regards."),
        },
    ),
    "telegraphic": _Style(
        words=(18, 75),
        short=0.9,
        lay=0.0,
        typos=0.02,
        sloppy=0.25,
        join="slash",
        demographics=("{age}{MF}", "{age} {MF}", "{age}yo{MF}"),
        durations=("slash", "short"),
        vitals=("compact", "slash", "equals", "abbr"),
        labs=("plain", "equals", "arrow"),
        negations=("nil", "-ve", "no", "neg"),
        caps={"care": 0, "closing": 0, "social": 0, "meds": 1},
        plan=0.35,
        layouts=(
            ("opening", "symptoms", "negatives", "history", "exam", "vitals", "labs", "investigations", "plan"),  # noqa: E501
            ("opening", "history", "symptoms", "negatives", "vitals", "exam", "investigations", "labs", "plan"),  # noqa: E501
        ),
        templates={
            "opening": ("{demo} {complaint} {dur}.", "{demo}. {complaint} x{dur}.", "{demo} c/o {complaint} {dur}."),  # noqa: E501
            "symptoms": ("+ {items}.", "{items}."),
            "history": ("PMHx {items}.", "bg {items}.", "PMH {items}."),
            "meds": ("DH {items}.", "on {items}."),
            "exam": ("OE {items}.", "O/E {items}."),
            "vitals": ("{items}.",),
            "labs": ("{items}.",),
            "investigations": ("{items}.",),
            "plan": ("{items}.",),
        },
    ),
}
# fmt: on
_NEUTRAL = replace(
    _STYLES["discharge"],
    short=0.0,
    lay=0.0,
    typos=0.0,
    sloppy=0.0,
    words=(40, 110),
    demographics=("{age}-year-old {mf}",),
    durations=("numeric",),
    vitals=("words",),
    labs=("units",),
    negations=("no",),
    layouts=(
        (
            "opening",
            "symptoms",
            "negatives",
            "history",
            "meds",
            "exam",
            "vitals",
            "labs",
            "investigations",
        ),
    ),
    templates={
        "opening": ("{demo}. Presenting complaint: {complaint} for {dur}.",),
        "symptoms": ("Associated symptoms: {items}.",),
        "negatives": ("Negatives: {items}.",),
        "history": ("Past medical history: {items}.",),
        "meds": ("Medications: {items}.",),
        "exam": ("Examination: {items}.",),
        "vitals": ("Observations: {items}.",),
        "labs": ("Blood tests: {items}.",),
        "investigations": ("Investigations: {items}.",),
    },
)


@dataclass(frozen=True)
class HospitalHabits:
    """A hospital's documentation habits; ``consistency`` is how often a note follows them.

    ``styles`` are the styles its notes are written in (the first one most often); the other
    fields are preferred choices wherever a style offers several (a wording per paraphrase
    rule, lab names, vitals and lab formats, negation form), taken modulo what a style allows.
    """

    name: str
    styles: tuple[str, ...]
    consistency: float
    shorthand: float  # multiplies a style's propensity for shorthand
    sloppiness: float  # multiplies a style's rates of typos and missing punctuation
    wording: tuple[int, ...]
    lab_names: tuple[str, ...]
    vitals_format: int
    lab_format: int
    negation: int
    template: int
    show_units: bool
    units: frozenset[str] = field(default_factory=frozenset)


def _draw_habits(
    name: str, styles: tuple[str, ...], rng: random.Random, consistency: float
) -> HospitalHabits:
    return HospitalHabits(
        name=name,
        styles=styles,
        consistency=consistency,
        shorthand=rng.uniform(0.6, 1.3),
        sloppiness=rng.uniform(0.5, 1.5),
        wording=tuple(rng.randrange(1 << 16) for _ in PARAPHRASES),
        lab_names=tuple(rng.choice(lab.names) for lab in LABS.values()),
        vitals_format=rng.randrange(1 << 16),
        lab_format=rng.randrange(1 << 16),
        negation=rng.randrange(1 << 16),
        template=rng.randrange(1 << 16),
        show_units=rng.random() < 0.5,
        units=frozenset(
            u for u in ("glucose_mgdl", "creatinine_mgdl", "fahrenheit") if rng.random() < 0.2
        ),
    )


def hospital_styles(config: SynthConfig) -> list[tuple[str, ...]]:
    """The styles each hospital writes in: two or three of the non-held-out styles, taken in
    turn from a seeded order, so that three hospitals use all seven between them."""
    pool = [s for s in STYLES if s != config.held_out]
    random.Random(f"federimed-styles:{config.seed}").shuffle(pool)
    out, start = [], 0
    for i in range(config.hospitals):
        k = 3 if i < len(pool) - 2 * config.hospitals else 2
        out.append(tuple(pool[(start + j) % len(pool)] for j in range(k)))
        start += k
    return out


def hospital_habits(index: int, seed: int, styles: tuple[str, ...]) -> HospitalHabits:
    """The documentation habits of hospital ``index`` (0-based) in the consortium of ``seed``."""
    rng = random.Random(f"federimed-habits:{seed}:{index}")
    return _draw_habits(f"hospital-{index + 1}", styles, rng, rng.uniform(0.75, 0.92))


def free_habits(seed: str) -> HospitalHabits:
    """Habits of no particular hospital, drawn from ``seed`` (test sets, examples)."""
    rng = random.Random(f"federimed-free-habits:{seed}")
    return _draw_habits("any", STYLES, rng, rng.uniform(0.5, 0.9))


NEUTRAL_HABITS = HospitalHabits(
    name="neutral",
    styles=(),
    consistency=1.0,
    shorthand=0.0,
    sloppiness=0.0,
    wording=(0,) * len(PARAPHRASES),
    lab_names=tuple(lab.names[0] for lab in LABS.values()),
    vitals_format=0,
    lab_format=0,
    negation=0,
    template=0,
    show_units=True,
)


# --------------------------------------------------------------------------------------------
# Drawing the clinical content of one case
# --------------------------------------------------------------------------------------------


@dataclass
class _Case:
    """The findings of one patient before any wording is chosen (lists may be emptied)."""

    code: str
    age: int
    female: bool
    complaint: str
    hours: float
    symptoms: list[str]
    negatives: list[str]
    background: list[str]  # the history that makes the patient context: never left out
    history: list[str]
    meds: list[str]
    social: list[str]
    exam: list[str]
    distractors: list[str]  # chronic findings of the background conditions
    vitals: dict[str, float]
    labs: list[tuple[str, float]]
    investigations: list[str]
    differential: list[str]
    context: str | None
    atypical: bool
    presentation: Atypical | None = None


_STOPWORDS = frozenset({"a", "an", "the", "of", "on", "in", "to", "and", "or", "with", "at", "by"})

# Ages at which background items make sense (a child has no statin or cataract surgery).
AGE_RANGES: dict[str, tuple[int, int]] = {
    "hypertension": (28, 120),
    "knee osteoarthritis": (45, 120),
    "appendicectomy 20 years ago": (30, 120),
    "hypercholesterolaemia": (30, 120),
    "cataract surgery": (55, 120),
    "type 2 diabetes": (25, 120),
    "previous cholecystectomy": (25, 120),
    "hysterectomy": (35, 120),
    "benign prostatic hyperplasia": (50, 120),
    "osteoporosis": (50, 120),
    "chronic lower back pain": (25, 120),
    "carpal tunnel release": (30, 120),
    "hiatus hernia": (30, 120),
    "gout": (30, 120),
    "hypothyroidism": (18, 120),
    "GORD": (16, 120),
    "depression": (14, 120),
    "psoriasis": (10, 120),
    "amlodipine": (28, 120),
    "atorvastatin": (30, 120),
    "ramipril": (28, 120),
    "alendronic acid": (50, 120),
    "tamsulosin": (50, 120),
    "bisoprolol": (30, 120),
    "metformin": (25, 120),
    "allopurinol": (30, 120),
    "levothyroxine": (18, 120),
    "sertraline": (16, 120),
    "omeprazole": (16, 120),
    "lansoprazole": (16, 120),
    "vitamin D": (16, 120),
    "care home resident": (65, 120),
    "university student": (17, 30),
    "child at nursery": (20, 50),
    "recent hip replacement": (45, 120),
    "postmenopausal": (48, 120),
    "previous myocardial infarction": (35, 120),
    "IVF": (25, 45),
    "IUD in situ": (16, 52),
    "combined oral contraceptive pill": (16, 52),
    "40 pack-year smoker": (45, 120),
    "polymyalgia rheumatica": (50, 120),
    "previous PMR": (50, 120),
    "renal transplant": (20, 80),
    "rheumatoid arthritis on methotrexate": (25, 120),
    "rheumatoid arthritis on long-term prednisolone": (25, 120),
    "COPD on long-term prednisolone": (45, 120),
    "Crohn's disease on azathioprine": (16, 120),
    "chemotherapy for lymphoma 10 days ago": (18, 120),
}
# Words of background items that do not go with a pregnancy (or are unsafe in one).
PREGNANCY_CLASHES = (
    "contraceptive",
    "IUD",
    "hysterectomy",
    "postmenopausal",
    "ramipril",
    "atorvastatin",
    "alendronic",
    "allopurinol",
    "osteoporosis",
    "cataract",
    "hip replacement",
    "beta-hCG negative",
    "CT abdomen",
    "CT KUB",
)
# Chronic findings of background conditions: present in the note, unrelated to the label.
CHRONIC_FINDINGS: dict[str, tuple[str, ...]] = {
    "knee osteoarthritis": ("crepitus in both knees",),
    "smoker": ("tar-stained fingers",),
    "40 pack-year smoker": ("tar-stained fingers",),
    "COPD": ("barrel chest",),
    "atrial fibrillation": ("irregularly irregular pulse",),
    "type 2 diabetes": ("reduced sensation in both feet",),
    "obesity": ("BMI 38", "BMI 42"),
    "hypercholesterolaemia": ("xanthelasma",),
    "gout": ("tophi on the ear",),
    "psoriasis": ("psoriatic plaques on the elbows",),
    "eczema": ("dry eczematous skin on the forearms",),
    "hysterectomy": ("healed Pfannenstiel scar",),
    "appendicectomy 20 years ago": ("old right iliac fossa scar",),
    "previous cholecystectomy": ("healed laparoscopic port scars",),
    "osteoporosis": ("thoracic kyphosis",),
    "alcohol excess": ("spider naevi", "palmar erythema"),
    "carpal tunnel release": ("healed scar over the wrist",),
    "Marfan syndrome": ("tall with long fingers",),
}
DISTRACTOR_EXCLUDES: dict[str, tuple[str, ...]] = {
    "reduced sensation in both feet": ("G61.0",),
    "crepitus in both knees": ("M72.6",),
    "irregularly irregular pulse": ("I48",),
}
ELDERLY_SOCIAL = (
    "lives alone",
    "lives with {spouse}",
    "care home resident",
    "mobilises with a frame",
    "usually independent",
    "collateral history from {relative}",
)
ELDERLY_FINDINGS = ("hard of hearing", "thoracic kyphosis", "walking frame at the bedside")
DIABETES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("type 2 diabetes", ("metformin",)),
    ("type 2 diabetes", ("metformin", "gliclazide")),
    ("insulin-treated type 2 diabetes", ("insulin glargine",)),
)
# (history, medications, chronic finding or "")
IMMUNOSUPPRESSION: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("renal transplant", ("tacrolimus", "mycophenolate"), ""),
    (
        "rheumatoid arthritis on methotrexate",
        ("methotrexate", "folic acid"),
        "ulnar deviation of the fingers",
    ),
    ("rheumatoid arthritis on long-term prednisolone", ("prednisolone",), "cushingoid features"),
    ("chemotherapy for lymphoma 10 days ago", (), "portacath in situ"),
    ("Crohn's disease on azathioprine", ("azathioprine",), ""),
    (
        "COPD on long-term prednisolone",
        ("prednisolone", "tiotropium inhaler"),
        "cushingoid features",
    ),
)
# Backgrounds that would change the condition's picture in a typical case (steroids mask an
# adrenal crisis's pigmentation; Crohn's disease mimics appendicitis and gastroenteritis).
IMMUNOSUPPRESSION_EXCLUDES = {
    "Crohn's disease on azathioprine": ("K35", "A09"),
    "rheumatoid arthritis on long-term prednisolone": ("E27.2",),
    "COPD on long-term prednisolone": ("E27.2",),
}
NURSING_CARE = (
    "Dr informed, awaiting review.",
    "Family aware.",
    "IV access obtained.",
    "Fluid balance chart started.",
    "Call bell within reach.",
    "Hourly obs commenced.",
    "Bloods taken and sent.",
)
DX_NAMES: dict[str, tuple[str, ...]] = {
    "I21": ("ACS", "MI"),
    "I48": ("AF", "fast AF"),
    "I50": ("HF", "LVF", "heart failure"),
    "I26": ("PE",),
    "I80": ("DVT",),
    "I63": ("stroke", "CVA"),
    "J18": ("pneumonia", "CAP", "LRTI"),
    "J45": ("asthma", "acute asthma"),
    "J44.1": ("IECOPD", "COPD exacerbation"),
    "J93": ("PTX", "pneumothorax"),
    "K35": ("appendicitis", "appx"),
    "K81": ("cholecystitis", "biliary sepsis"),
    "K85": ("pancreatitis",),
    "A09": ("gastroenteritis", "viral GE"),
    "N39.0": ("UTI", "pyelonephritis"),
    "N20": ("renal colic", "ureteric stone"),
    "E10.1": ("DKA",),
    "G43": ("migraine",),
    "L03": ("cellulitis",),
    "M10": ("gout", "crystal arthropathy"),
    "I71.0": ("dissection", "AAS"),
    "I60": ("SAH",),
    "G00": ("meningitis",),
    "A41": ("sepsis",),
    "T78.2": ("anaphylaxis",),
    "O00": ("ectopic", "ectopic pregnancy"),
    "E27.2": ("adrenal crisis", "Addisonian crisis"),
    "G61.0": ("GBS", "Guillain-Barre"),
    "M31.6": ("GCA", "temporal arteritis"),
    "E05.5": ("thyroid storm", "thyrotoxic crisis"),
    "G70.0": ("myasthenic crisis", "MG crisis"),
    "M72.6": ("nec fasc", "necrotising fasciitis"),
}


@cache
def _vocabulary(code: str) -> frozenset[str]:
    """Content words of every finding of a condition, to keep negations non-contradictory."""
    c = BY_CODE[code]
    banks = (c.complaints, c.symptoms, c.exam, c.investigations, c.risks, c.hallmarks)
    atypical = [a.complaints for a in ATYPICAL_PRESENTATIONS.get(code, ())]
    return frozenset(w for bank in (*banks, *atypical) for p in bank for w in _words(p))


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower())) - _STOPWORDS


def _sex_ok(phrase: str, female: bool) -> bool:
    return phrase not in (MALE_ONLY if female else FEMALE_ONLY)


def _age_ok(phrase: str, age: int) -> bool:
    low, high = AGE_RANGES.get(phrase, (0, 200))
    return low <= age <= high


def _sample(rng: random.Random, items: Sequence[str], low: int, high: int) -> list[str]:
    return rng.sample(list(items), min(len(items), rng.randint(low, high)))


def _fits(context: str, c: Condition) -> bool:
    """Whether a patient with this condition can be in ``context`` at all (age, sex)."""
    low, high = c.age
    if context == "elderly":
        return high >= ELDERLY_AGE
    if context == "pregnant":
        return c.code != "O00" and low <= PREGNANT_AGES[1] and high >= PREGNANT_AGES[0]
    if context == "diabetic":
        return c.code != "E10.1" and high >= 25
    return high >= 25


@cache
def _presentations(code: str) -> tuple[Atypical, ...]:
    return tuple(a for a in ATYPICAL_PRESENTATIONS.get(code, ()) if _fits(a.context, BY_CODE[code]))


@cache
def _atypical_rate() -> float:
    """Per eligible condition, so that about ATYPICAL_SHARE of a balanced set is atypical."""
    eligible = sum(bool(_presentations(c.code)) for c in CONDITIONS)
    return min(0.9, ATYPICAL_SHARE * len(CONDITIONS) / eligible)


@cache
def _typical_contexts(code: str) -> tuple[str, ...]:
    """Contexts a typical case may carry: its atypical ones plus elderly and diabetic."""
    c = BY_CODE[code]
    listed = {a.context for a in _presentations(code)}
    return tuple(x for x in CONTEXTS if _fits(x, c) and (x in listed or x != "pregnant"))


def _visible(phrase: str, pick: _Pick) -> bool:
    """A finding this patient can have: right sex and age, not hidden by the presentation."""
    if not (_sex_ok(phrase, pick.female) and _age_ok(phrase, pick.age)):
        return False
    if pick.context == "pregnant" and any(w in phrase for w in PREGNANCY_CLASHES):
        return False
    hidden = (*(pick.presentation.hide if pick.presentation else ()), *pick.hide)
    return not any(w.lower() in phrase.lower() for w in hidden)


@dataclass(frozen=True)
class _Pick:
    female: bool
    age: int
    context: str | None
    presentation: Atypical | None
    hide: tuple[str, ...] = ()  # more findings left out, whatever the presentation
    normal_labs: tuple[str, ...] = ()


def _patient(c: Condition, rng: random.Random) -> _Pick:
    """Sex, age, patient context and (for atypical cases) the presentation."""
    presentations = _presentations(c.code)
    presentation = None
    context = None
    if presentations and rng.random() < _atypical_rate():
        presentation = rng.choice(presentations)
        context = presentation.context
    elif rng.random() < CONTEXT_RATE and (options := _typical_contexts(c.code)):
        context = rng.choice(options)
    female = rng.random() < c.female
    low, high = c.age
    if context == "elderly":
        low = max(low, ELDERLY_AGE)
    elif context == "pregnant":
        female, low, high = True, max(low, PREGNANT_AGES[0]), min(high, PREGNANT_AGES[1])
    elif context in ("diabetic", "immunosuppressed"):
        low = max(low, 25)
    return _Pick(female, rng.randint(low, high), context, presentation)


def _bank(items: Sequence[str], pick: _Pick) -> list[str]:
    """A finding bank for this patient; atypical cases lose the classic first item."""
    return [p for p in (items[1:] if pick.presentation else items) if _visible(p, pick)]


# Words that say nothing about which finding is meant.
_UNSPECIFIC = frozenset(
    {"pain", "recent", "previous", "new", "sudden", "onset", "severe", "similar", "history"}
)


def _negatives(c: Condition, pick: _Pick, rng: random.Random) -> list[str]:
    """Pertinent negatives: mostly the hallmarks of this condition's look-alikes, never one
    that names what this condition has ("no limb weakness" in Guillain-Barre, "no sputum" in
    pneumonia), nor the words of an own hallmark spread over several negatives."""
    own = _vocabulary(c.code) - _UNSPECIFIC
    picked: list[str] = []
    said: set[str] = set()
    for _ in range(rng.randint(1, 3)):
        source = (
            BY_CODE[rng.choice(c.mimics)]
            if rng.random() < 0.8
            else rng.choice([other for other in CONDITIONS if other.group == c.group])
        )
        hallmark = rng.choice(source.hallmarks)
        content = _words(hallmark)
        if content & own or not _sex_ok(hallmark, pick.female) or hallmark in picked:
            continue
        if pick.context == "pregnant" and hallmark == "missed period":
            continue
        if _spells_own_hallmark(said | content, c.code):
            continue
        picked.append(hallmark)
        said |= content
    return picked


@cache
def _hallmark_words(code: str) -> tuple[frozenset[str], ...]:
    """Content words of every wording of each hallmark of ``code``."""
    wordings = [w for h in BY_CODE[code].hallmarks for w in (*variants(h), *NOT_FORMS.get(h, ()))]
    return tuple(frozenset(_words(w)) for w in wordings if _words(w))


def _spells_own_hallmark(words: set[str], code: str) -> bool:
    return any(h <= words for h in _hallmark_words(code))


def _vitals(c: Condition, pick: _Pick, rng: random.Random) -> dict[str, float]:
    v = c.vitals
    sbp = rng.uniform(*v.sbp)
    values = {
        "hr": round(rng.uniform(*v.hr)),
        "sbp": round(sbp),
        "dbp": round(sbp * rng.uniform(0.55, 0.7)),
        "rr": round(rng.uniform(*v.rr)),
        "spo2": round(rng.uniform(*v.spo2)),
        "temp": round(rng.uniform(*v.temp), 1),
    }
    if pick.presentation and pick.presentation.afebrile:
        low = 35.0 if c.code == "A41" and pick.context == "elderly" else 36.2
        values["temp"] = round(rng.uniform(low, 37.4), 1)
    if pick.context == "pregnant":
        values["hr"] = min(values["hr"] + rng.randint(5, 12), round(v.hr[1]) + 10)
    dropped = {k for k in ("hr", "rr", "spo2", "temp") if rng.random() < 0.1}
    return {k: x for k, x in values.items() if k not in dropped}


def _normal_panel(c: Condition) -> list[str]:
    """Panel tests that come back normal: never one this condition makes abnormal."""
    abnormal = {key for key, _, _ in c.labs}
    return [key for key in PANELS[c.group] if key not in abnormal]


def _labs(c: Condition, pick: _Pick, rng: random.Random) -> list[tuple[str, float]]:
    """Abnormal results of the condition plus normal results of its system's usual panel."""
    keep = 0.6 if pick.presentation else 0.8
    normal = set(pick.presentation.normal_labs if pick.presentation else ()) | set(pick.normal_labs)
    labs = [
        (key, rng.uniform(*(LABS[key].normal if key in normal else (lo, hi))))
        for key, lo, hi in c.labs
        if rng.random() < keep
    ]
    spare = _normal_panel(c)
    labs += [(key, rng.uniform(*LABS[key].normal)) for key in _sample(rng, spare, 1, 3)]
    if pick.context == "diabetic" and "glucose" not in {key for key, _, _ in c.labs}:
        labs = [(k, x) for k, x in labs if k != "glucose"]
        if rng.random() < 0.7:
            labs.append(("glucose", rng.uniform(8.0, 14.0)))
    rng.shuffle(labs)
    return labs


def _investigations(c: Condition, pick: _Pick, rng: random.Random) -> list[str]:
    found = _sample(rng, _bank(c.investigations, pick), 0 if pick.presentation else 1, 2)
    if (
        c.group == "abdo"
        and pick.female
        and 16 <= pick.age <= 45
        and c.code != "O00"
        and pick.context != "pregnant"
        and rng.random() < 0.5
    ):
        found.append("urine beta-hCG negative")
    return found


def _background(
    pool: Iterable[Incidental], c: Condition, pick: _Pick, rng: random.Random, most: int
) -> list[str]:
    fitting = [
        i.text
        for i in pool
        if c.code not in i.excludes
        and i.sex in (None, "F" if pick.female else "M")
        and _visible(i.text, pick)
    ]
    return _sample(rng, fitting, 0, most)


def _context_story(
    c: Condition, pick: _Pick, rng: random.Random
) -> tuple[list[str], list[str], list[str], list[str]]:
    """Background history, medications, social history and chronic findings of the context."""
    history: list[str] = []
    meds: list[str] = []
    social: list[str] = []
    findings: list[str] = []
    context = pick.context
    if context == "elderly":
        spouse = "husband" if pick.female else "wife"
        picked = rng.sample(ELDERLY_SOCIAL, rng.randint(1, 2))
        relative = rng.choice(("daughter", "son"))
        social = [s.format(spouse=spouse, relative=relative) for s in picked]
        if rng.random() < 0.4:
            findings.append(rng.choice(ELDERLY_FINDINGS))
    elif context == "diabetic":
        text, drugs = rng.choice(DIABETES)
        history.append(text)
        meds.extend(drugs)
        excluded = DISTRACTOR_EXCLUDES["reduced sensation in both feet"]
        if c.code not in excluded and rng.random() < 0.4:
            findings.append("reduced sensation in both feet")
    elif context == "pregnant":
        weeks = rng.randint(8, 36)
        history.append(
            rng.choice(
                (
                    f"pregnant, {weeks} weeks",
                    f"{weeks}/40 pregnant",
                    f"G2P1, {weeks} weeks pregnant",
                    f"{weeks} weeks' gestation",
                )
            )
        )
        meds.append(rng.choice(("folic acid", "pregnancy multivitamins")))
        if weeks >= 20 and rng.random() < 0.5:
            findings.append(f"gravid uterus, fundal height {weeks + rng.randint(-1, 1)} cm")
        elif weeks >= 14 and rng.random() < 0.5:
            findings.append("gravid uterus")
    elif context == "immunosuppressed":
        wanted = pick.presentation.history if pick.presentation else ()
        options = [
            o
            for o in IMMUNOSUPPRESSION
            if (
                o[0] in wanted
                or (not wanted and c.code not in IMMUNOSUPPRESSION_EXCLUDES.get(o[0], ()))
            )
            and _age_ok(o[0], pick.age)
        ]
        options = options or [o for o in IMMUNOSUPPRESSION if _age_ok(o[0], pick.age)]
        text, drugs, finding = rng.choice(options)
        history.append(text)
        meds.extend(drugs)
        if finding and rng.random() < 0.5:
            findings.append(finding)
    return history, meds, social, findings


def _distractors(c: Condition, history: Sequence[str], rng: random.Random) -> list[str]:
    out = []
    for item in history:
        for finding in CHRONIC_FINDINGS.get(item, ()):
            if (
                finding not in c.exam
                and c.code not in DISTRACTOR_EXCLUDES.get(finding, ())
                and rng.random() < 0.35
            ):
                out.append(finding)
                break
    return out


# How often a differential names the right diagnosis among its look-alikes: real plans often
# do ("?PE"), but a note that names its label teaches the name, not the findings.
OWN_IN_DIFFERENTIAL = 0.2


def _differential(c: Condition, rng: random.Random) -> list[str]:
    """Diagnoses a clinician queries or rules out: look-alikes, sometimes the right one."""
    mimics = rng.sample(c.mimics, min(len(c.mimics), rng.randint(1, 2)))
    codes = [c.code, *mimics] if rng.random() < OWN_IN_DIFFERENTIAL else mimics
    rng.shuffle(codes)
    return codes


def _same_finding(symptom: str, complaint: str) -> bool:
    """Whether a symptom only repeats the complaint ("dysuria" after "burning on passing
    urine")."""
    return (
        symptom in complaint
        or _words(symptom) - {"pain", "through"} <= _words(complaint)
        or symptom in variants(complaint)
        or complaint in variants(symptom)
        or bool(variants(symptom) & variants(complaint))
    )


# History items that say the same thing: a note keeps the first one it drew.
SAME_HISTORY = (
    {"previous PMR", "polymyalgia rheumatica"},
    {"hypertension", "poorly controlled hypertension"},
    {"smoker", "40 pack-year smoker"},
    {"asthma", "known asthma", "asthma as a child"},
    {"gout", "previous gout"},
    {"gallstones", "known gallstones"},
    {"type 2 diabetes", "insulin-treated type 2 diabetes"},
    {"recent surgery", "recent hip replacement", "recent knee surgery"},
    {"COPD", "COPD on long-term prednisolone", "known COPD"},
    {"long-term prednisolone", "rheumatoid arthritis on long-term prednisolone"},
)


def _no_duplicates(items: list[str]) -> list[str]:
    out: list[str] = []
    for item in items:
        group = next((g for g in SAME_HISTORY if item in g), {item})
        if not group & set(out):
            out.append(item)
    return out


DRUG_CLASSES = ({"omeprazole", "lansoprazole"}, {"amlodipine", "ramipril", "bisoprolol"})


def _one_per_class(meds: list[str]) -> list[str]:
    """No two proton pump inhibitors; at most two antihypertensives is fine, three is noise."""
    out: list[str] = []
    for drug in meds:
        if not any(drug in group and len(group & set(out)) >= (1 if len(group) == 2 else 2)
                   for group in DRUG_CLASSES):  # fmt: skip
            out.append(drug)
    return out


# A background that changes a condition's picture even in a typical case: adrenal failure
# from steroids or the pituitary (not Addison's) spares the skin, salt appetite and potassium.
# code -> (words of the background, unless this word is there, findings left out, normal labs)
SECONDARY_PICTURES: dict[str, tuple[tuple[str, ...], str, tuple[str, ...], tuple[str, ...]]] = {
    "E27.2": (
        ("prednisolone", "steroids", "hypopituitarism"),
        "Addison",
        ("pigment", "salt", "peaked"),
        ("potassium",),
    ),
}


_POSITIVE_SECTIONS = ("symptoms", "background", "history", "exam", "distractors", "social")


def _draw_case(c: Condition, rng: random.Random) -> _Case:
    """Sample the findings; atypical cases are sparser as well as lacking the classic ones."""
    pick = _patient(c, rng)
    complaints = _bank(c.complaints, pick)
    if pick.presentation and (rng.random() < 0.75 or not complaints):
        complaint = rng.choice(pick.presentation.complaints)
    elif not pick.presentation and rng.random() < CLASSIC_COMPLAINT_RATE:
        complaint = complaints[0]
    else:
        complaint = rng.choice(complaints)
    symptoms = [s for s in _bank(c.symptoms, pick) if not _same_finding(s, complaint)]
    risks = [r for r in c.risks if _visible(r, pick)]
    background, context_meds, social, findings = _context_story(c, pick, rng)
    history = _sample(rng, risks, 0, 2) + _background(INCIDENTAL_HISTORY, c, pick, rng, 2)
    told: set[str] = set().union(*(_words(b) for b in background))
    history = [h for h in dict.fromkeys(rng.sample(history, len(history))) if not _words(h) <= told]
    history = _no_duplicates([*background, *history])[len(background) :]
    secondary = SECONDARY_PICTURES.get(c.code)
    told_all = " ".join([*background, *history])
    if secondary and any(t in told_all for t in secondary[0]) and secondary[1] not in told_all:
        hide, normal_labs = secondary[2], secondary[3]
        pick = replace(
            pick, hide=(*pick.hide, *hide), normal_labs=(*pick.normal_labs, *normal_labs)
        )
        symptoms = [x for x in symptoms if _visible(x, pick)]
        history = [h for h in history if _visible(h, pick)]
    meds = _background(MEDICATIONS, c, pick, rng, 2)
    meds = _one_per_class(list(dict.fromkeys([*context_meds, *meds])))
    atypical = pick.presentation is not None
    case = _Case(
        code=c.code,
        age=pick.age,
        female=pick.female,
        complaint=complaint,
        hours=math.exp(rng.uniform(*(math.log(h) for h in c.onset_hours))),
        symptoms=_sample(rng, symptoms, 1, 2 if atypical else 3),
        negatives=_negatives(c, pick, rng),
        background=background,
        history=history,
        meds=meds,
        social=social,
        exam=_sample(rng, _bank(c.exam, pick), 1, 1 if atypical else 3),
        distractors=findings + _distractors(c, [*background, *history], rng),
        vitals=_vitals(c, pick, rng),
        labs=_labs(c, pick, rng),
        investigations=_investigations(c, pick, rng),
        differential=_differential(c, rng),
        context=pick.context,
        atypical=atypical,
        presentation=pick.presentation,
    )
    return _consistent(_omit_sections(case, rng))


def _omit_sections(case: _Case, rng: random.Random) -> _Case:
    empty = {name: type(getattr(case, name))() for name, p in OMIT.items() if rng.random() < p}
    return replace(case, **empty)


# A positive finding's word -> the word a negative would use for the same thing.
_RELATED = {
    "redness": "rash",
    "erythema": "rash",
    "urticaria": "rash",
    "petechial": "rash",
    "purpuric": "rash",
    "swollen": "swelling",
    "oedema": "swelling",
    "effusion": "swelling",
    "sweaty": "sweating",
    "diaphoretic": "sweating",
    "clammy": "sweating",
    "sweats": "sweating",
    "pyrexia": "fever",
    "rigors": "fever",
    "icterus": "jaundice",
    "wheezing": "wheeze",
    "haematuria": "blood",
    "dysarthria": "speech",
    "ptosis": "drooping",
    "diplopia": "vision",
    "visual": "vision",
}


def _consistent(case: _Case) -> _Case:
    """Drop negatives that deny what the note reports (words of a finding, a high fever)."""
    positive: set[str] = _words(case.complaint)
    for name in _POSITIVE_SECTIONS:
        for item in getattr(case, name):
            positive |= _words(item)
    positive |= {_RELATED[w] for w in positive if w in _RELATED}
    generic = {"pain", "left", "right", "both", "chronic", "old", "previous", "known", "recent"}
    kept = [n for n in case.negatives if not (_words(n) - generic) & positive]
    if case.vitals.get("temp", 0) >= 37.8:
        kept = [n for n in kept if "fever" not in n]
    return replace(case, negatives=kept)


# --------------------------------------------------------------------------------------------
# Writing one case in a style
# --------------------------------------------------------------------------------------------

_CUES = ("no", "not", "nil", "denies", "denied", "without", "-ve", "neg", "negative")
_CUE_RE = re.compile(r"(?<![\w-])(?:no|not|nil|denies|denied|without|-ve|neg|negative)(?![\w-])")
# Forms a negated hallmark may take after "not" ("not febrile"); others fall back to "no".
NOT_FORMS: dict[str, tuple[str, ...]] = {
    "fever": ("febrile", "pyrexial"),
    "sweating": ("sweaty",),
    "wheeze": ("wheezy",),
    "jaundice": ("jaundiced",),
    "vomiting": ("vomiting",),
    "tremor": ("tremulous",),
    "cough": ("coughing",),
    "rigors": ("rigoring",),
    "photophobia": ("photophobic",),
    "thirst": ("thirsty",),
}
FEVER_NEGATIVES = ("apyrexial", "afebrile")


_T = TypeVar("_T")


_ADJECTIVES = frozenset({"wheezy", "sweaty", "tachypnoeic", "febrile", "itchy"})


def _noun_like(wording: str) -> bool:
    """Whether a wording reads as a noun phrase ("no X", "presents with X")."""
    first = wording.split(" ", 1)[0]
    return not first.endswith("ing") and wording not in _ADJECTIVES


@cache
def _noun_lay(i: int) -> tuple[str, ...]:
    return tuple(w for w in PARAPHRASES[i].lay if _noun_like(w))


@cache
def _noun_formal(i: int) -> tuple[str, ...]:
    first, *others = PARAPHRASES[i].formal
    return (first, *(w for w in others if _noun_like(w)))


@cache
def _noun_short(i: int) -> tuple[str, ...]:
    return tuple(w for w in PARAPHRASES[i].short if w not in _ADJECTIVES)


@cache
def _salt(what: str) -> int:
    return sum((i + 1) * ord(ch) for i, ch in enumerate(what)) * 7919


class _Pen:
    """The choices of one rendering: style, habits and the note's random stream."""

    def __init__(self, style: _Style, habits: HospitalHabits, seed: str, plain: bool) -> None:
        self.style = style
        self.habits = habits
        self.rng = random.Random(seed)
        self.plain = plain
        self.p_short = min(0.95, style.short * habits.shorthand)
        self.plain_negatives = False
        self.name = ""

    def habit(self, options: Sequence[_T], preference: int, what: str = "") -> _T:
        """The habitual option most of the time, any allowed one otherwise; ``what`` names the
        choice, so that one preference number gives unrelated choices different answers."""
        if self.plain or self.rng.random() < self.habits.consistency:
            return options[(preference + _salt(what)) % len(options)]
        return self.rng.choice(options)

    def wording(self, i: int, lay: bool = True, noun: bool = False) -> tuple[str, bool]:
        """A wording of rule ``i`` and whether it is the patient's own (lay) one; ``noun``:
        the wording follows "presents with", so no lay wording that starts with a verb."""
        rule = PARAPHRASES[i]
        if self.plain:
            return rule.formal[0], False
        rng = self.rng
        lays = _noun_lay(i) if noun else rule.lay
        shorts = _noun_short(i) if noun else rule.short
        formal = _noun_formal(i) if noun else rule.formal
        if shorts and rng.random() < self.p_short:
            pool = shorts
        elif lay and lays and rng.random() < self.style.lay:
            return self.habit(lays, self.habits.wording[i]), True
        else:
            pool = formal
        return self.habit(pool, self.habits.wording[i]), False

    def say(self, phrase: str, lay: bool = True, noun: bool = False) -> str:
        """The phrase in this note's words; the inside of a clinician's wording is never
        in the patient's words ("abrupt-onset SOB", not "abrupt-onset out of breath")."""
        parts = []
        for segment in segments(phrase):
            if isinstance(segment, str):
                parts.append(segment)
                continue
            i, groups = segment
            template, lay_here = self.wording(i, lay, noun)
            if groups:
                said = {k: self.say(v, lay_here, noun) for k, v in groups}
                raw = dict(groups)
                template = template.format(**said, **{f"{k}_and": join_and(raw[k]) for k in raw})
            parts.append(template)
        return "".join(parts)

    def join(self, items: Sequence[str], last: str = "and") -> str:
        if not items:
            return ""
        if self.style.join == "prose" and len(items) > 1:
            return f"{', '.join(items[:-1])} {last} {items[-1]}"
        if self.style.join == "slash" and self.rng.random() < 0.5:
            return "/".join(items)
        return ", ".join(items)


_UNITS = (("week", 168.0, "/52", "wk"), ("day", 24.0, "/7", "d"), ("hour", 1.0, "/24", "h"))
_NUMBER_WORDS = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
)


def _duration(hours: float, form: str) -> tuple[str, str]:
    """A duration as a noun phrase and as an adjective ("2 days", "2-day")."""
    if hours < 55 / 60:
        n = max(10, round(hours * 6) * 10)
        if form in ("short", "slash"):
            return f"{n}min", f"{n}-minute"
        return f"{n} minutes", f"{n}-minute"
    unit, size, slash, short = next(u for u in _UNITS if hours >= 2 * u[1] or u[0] == "hour")
    n = round(hours / size)
    if form == "slash":
        if unit == "hour" and n >= 24:  # 36 hours: "2/7", as days are counted
            return f"{max(1, round(n / 24))}/7", f"{n}-hour"
        return f"{n}{slash}", f"{n}-{unit}"
    if form == "short":
        return f"{n}{short}", f"{n}-{unit}"
    spelled = _NUMBER_WORDS[n] if form == "words" and n <= 10 else str(n)
    return f"{spelled} {unit}{'s' if n != 1 else ''}", f"{spelled}-{unit}"


def _format_value(key: str, value: float, habits: HospitalHabits) -> tuple[str, str, str]:
    """(value, unit, flag) of a lab result in the hospital's units."""
    lab = LABS[key]
    low, high = lab.normal
    flag = "H" if value > high else "L" if value < low else ""
    unit, decimals = lab.unit, lab.decimals
    if key == "glucose" and "glucose_mgdl" in habits.units:
        value, unit, decimals = value * 18.0, "mg/dL", 0
    if key == "creatinine" and "creatinine_mgdl" in habits.units:
        value, unit, decimals = value / 88.4, "mg/dL", 2
    text = f"{value:.{decimals}f}" if value >= 10**-decimals else f"<{10**-decimals:.{decimals}f}"
    return text, unit, flag


def _format_lab(key: str, value: float, pen: _Pen, form: str) -> str:
    name = pen.habits.lab_names[list(LABS).index(key)]
    text, unit, flag = _format_value(key, value, pen.habits)
    arrow = {"H": " ↑", "L": " ↓", "": ""}[flag]
    spaced = f" {unit}" if unit else ""
    if form == "plain":
        return f"{name} {text}{spaced if pen.habits.show_units else ''}"
    if form == "units":
        return f"{name} {text}{spaced}"
    if form == "flag":
        return f"{name} {text}{spaced}{f' ({flag})' if flag else ''}"
    if form == "equals":
        return f"{name}={text}"
    if form == "arrow":
        return f"{name}: {text}{arrow}"
    return f"{name} of {text}{spaced}"


def _temperature(temp: float, pen: _Pen, suffix: str) -> str:
    if "fahrenheit" in pen.habits.units:
        return f"{temp * 9 / 5 + 32:.1f}F"
    return f"{temp:.1f}{suffix}"


# format -> (separator, temperature suffix, (observation, template) in the order written);
# "{air}" is " RA" / " on air" / "" as the writer has it, "{ra}" "RA" or "".
_VITALS_LAYOUTS: dict[str, tuple[str, str, tuple[tuple[str, str], ...]]] = {
    "abbr": (" ", "C", (("hr", "HR {}"), ("bp", "BP {}"), ("rr", "RR {}"),
                        ("spo2", "SpO2 {}%{air}"), ("temp", "T {}"))),
    "compact": (" ", "", (("hr", "P{}"), ("bp", "BP{}"), ("rr", "RR{}"), ("spo2", "sats{}%{ra}"),
                          ("temp", "T{}"))),
    "words": (", ", "C", (("hr", "heart rate {}"), ("bp", "blood pressure {}"),
                          ("rr", "respiratory rate {}"), ("spo2", "oxygen saturation {}% on air"),
                          ("temp", "temperature {}"))),
    "mixed": (", ", "", (("hr", "pulse {}"), ("bp", "BP {}"), ("rr", "RR {}"),
                         ("spo2", "sats {}%{air}"), ("temp", "temp {}"))),
    "equals": (" ", "", (("hr", "HR={}"), ("bp", "BP={}"), ("rr", "RR={}"), ("spo2", "SpO2={}%"),
                         ("temp", "T={}"))),
    "units": (", ", "°C", (("hr", "HR {} bpm"), ("bp", "BP {} mmHg"), ("rr", "RR {}/min"),
                           ("spo2", "SpO2 {}% on room air"), ("temp", "T {}"))),
    "tpr": (" ", "", (("temp", "T {}"), ("hr", "P {}"), ("rr", "R {}"), ("bp", "BP {}"),
                      ("spo2", "sats {}%"))),
    "colon": (" | ", "", (("hr", "HR: {}"), ("bp", "BP: {}"), ("rr", "RR: {}"),
                          ("spo2", "SpO2: {}%"), ("temp", "T: {}"))),
    "prose": (", ", "C", (("hr", "pulse of {}"), ("bp", "blood pressure of {}"),
                          ("rr", "respiratory rate of {}"), ("spo2", "saturations of {}% on air"),
                          ("temp", "temperature of {}"))),
}  # fmt: skip


def _format_vitals(v: dict[str, float], pen: _Pen, form: str) -> tuple[str, str]:
    """The observations in one of VITALS_FORMATS, and the format actually used."""
    if form == "slash" and not {"hr", "rr", "spo2", "temp"} <= set(v):
        form = "compact"
    air = pen.rng.choice(("RA", "on air", "")) if form != "words" else "on air"
    if form == "slash":
        temp = _temperature(v.get("temp") or 0, pen, "")
        return f"obs {v['hr']}/{v['sbp']}/{v['dbp']}/{v['rr']}/{v['spo2']}%RA/{temp}", form
    sep, suffix, layout = _VITALS_LAYOUTS[form]
    if form == "abbr" and pen.style.join == "prose":
        sep = ", "
    values = {key: v.get(key) for key in ("hr", "rr", "spo2")} | {"bp": f"{v['sbp']}/{v['dbp']}"}
    if "temp" in v:
        values["temp"] = _temperature(v["temp"], pen, suffix)
    fills = {"air": f" {air}" if air else "", "ra": "RA" if air == "RA" else ""}
    parts = [
        template.format(values[key], **fills)
        for key, template in layout
        if values.get(key) is not None
    ]
    return sep.join(parts), form


_BEDSIDE = ("ECG", "urine dip", "peak flow", "urine beta-hCG", "capillary ketones", "Wells",
            "CURB-65", "NEWS2", "qSOFA", "lying and standing", "bedside FVC", "Alvarado",
            "Burch-Wartofsky", "LRINEC", "NIHSS", "Glasgow")  # fmt: skip
_POINT_OF_CARE = {"glucose", "ketones"}


def _format_investigation(text: str, pen: _Pen) -> str:
    test, sep, finding = text.partition(": ")
    test, finding = pen.say(test, lay=False), pen.say(finding, lay=False)
    if not sep:
        return pen.say(text, lay=False)
    if pen.style.join == "prose":
        verb = "showed" if pen.name == "discharge" else "shows"
        if pen.style is _NEUTRAL:
            return f"{test}: {finding}"
        return pen.rng.choice((f"{test} {verb} {finding}", f"{test}: {finding}"))
    return pen.rng.choice((f"{test}: {finding}", f"{test} - {finding}", f"{test} {finding}"))


def _cue_last(items: list[str]) -> list[str]:
    """Findings with a negation of their own ("no murmurs") go last, ending the clause."""
    return [i for i in items if not _CUE_RE.search(i)] + [i for i in items if _CUE_RE.search(i)]


_THERE_WAS = {"discharge": "was", "gp": "has been"}
SURGICAL = frozenset({"K35", "K81", "K85", "N20", "O00", "M72.6"})


def _team(code: str) -> str:
    return "surgical" if code in SURGICAL else "medical"


def _negation_sentences(case: _Case, pen: _Pen, prose_subject: str) -> list[str]:
    """The pertinent negatives as one or more sentences, each ending the clause it negates."""
    items = list(case.negatives)
    if not items:
        return []
    rng = pen.rng
    form = pen.habit(pen.style.negations, pen.habits.negation)
    sentences = []
    if "fever" in items and rng.random() < 0.5 and form not in ("-ve", "neg"):
        items.remove("fever")
        sentences.append(rng.choice(FEVER_NEGATIVES))
    if form == "not":
        adjectives = [rng.choice(NOT_FORMS[i]) for i in items if i in NOT_FORMS]
        items = [i for i in items if i not in NOT_FORMS]
        if adjectives:
            joined = (
                pen.join(adjectives, "or") if pen.style.join == "prose" else " or ".join(adjectives)
            )
            verb = "was" if pen.name == "discharge" else "is"
            sentences.append(
                f"{prose_subject} {verb} not {joined}" if prose_subject else f"not {joined}"
            )
        form = "no"
    if items:
        said = [i if pen.plain_negatives else pen.say(i, noun=True) for i in items]
        listed = pen.join(said, "or")
        if form in ("-ve", "neg"):
            sentences.append(", ".join(f"{s} {form}" for s in said))
        elif form == "no" and prose_subject:
            sentences.append(f"There {_THERE_WAS.get(pen.name, 'is')} no {listed}")
        elif form in ("denies", "denied") and prose_subject:
            sentences.append(f"{prose_subject} {form} {listed}")
        elif form == "without":
            sentences.append(f"{prose_subject or 'Patient'} presented without {listed}")
        elif form == "negative for":
            sentences.append(f"ROS negative for {listed}")
        else:
            sentences.append(f"{form} {listed}")
    if pen.style is _NEUTRAL:
        return [f"Negatives: no {pen.join([pen.say(i) for i in case.negatives], 'or')}."]
    return [_capital(s) + "." for s in sentences]


def _capital(text: str) -> str:
    first = text.split(" ", 1)[0]
    return text[0].upper() + text[1:] if re.fullmatch(r"[a-z]+", first) else text


# What a triage nurse escalates whatever the observations: chest pain that may be cardiac,
# neurological deficit, airway swelling, a thunderclap headache, a purpuric rash.
_RED_FLAGS = re.compile(
    r"chest (?:pain|tightness|discomfort)|arm heaviness|jaw pain|collapse|confusion|drows|"
    r"slurred|droop|sudden .*weakness|arm weakness|thunderclap|worst headache|"
    r"throat tightness|lip swelling|facial swelling|difficulty breathing|non-blanching|"
    r"neck stiffness|vaginal bleeding|rapidly spreading|ST elevation|STEMI|tearing"
)


def _triage_category(case: _Case) -> str:
    """Australasian triage category (1 most urgent) from the observations and red flags."""
    v = case.vitals
    told = " ".join([case.complaint, *case.symptoms, *case.investigations])
    if v.get("sbp", 120) < 70 or v.get("spo2", 98) < 85:
        return "1"
    severe = (
        v.get("sbp", 120) < 90
        or v.get("hr", 80) > 130
        or v.get("spo2", 98) < 90
        or v.get("rr", 16) > 30
    )
    if severe or _RED_FLAGS.search(told):
        return "2"
    unwell = (
        v.get("sbp", 120) < 100
        or v.get("hr", 80) > 110
        or v.get("spo2", 98) < 94
        or v.get("temp", 37) >= 38.5
        or "severe" in told
    )
    return "3" if unwell else "4"


def _news2(case: _Case) -> int | None:
    v = case.vitals
    if not {"hr", "rr", "spo2", "temp"} <= set(v):
        return None
    rr, spo2, sbp, hr, temp = v["rr"], v["spo2"], v["sbp"], v["hr"], v["temp"]
    score = 3 if rr <= 8 or rr >= 25 else 2 if rr >= 21 else 1 if rr <= 11 else 0
    score += 3 if spo2 <= 91 else 2 if spo2 <= 93 else 1 if spo2 <= 95 else 0
    score += 3 if sbp <= 90 or sbp >= 220 else 2 if sbp <= 100 else 1 if sbp <= 110 else 0
    score += 3 if hr <= 40 or hr >= 131 else 2 if hr >= 111 else 1 if hr <= 50 or hr >= 91 else 0
    score += 3 if temp <= 35.0 else 2 if temp >= 39.1 else 1 if temp <= 36.0 or temp >= 38.1 else 0
    told = " ".join([case.complaint, *case.exam, *case.symptoms]).lower()
    score += 3 if re.search(r"confus|drows|gcs", told) else 0
    return score


def _plan(case: _Case, pen: _Pen, name: str) -> str:
    rng = pen.rng
    names = [rng.choice(DX_NAMES[code]) for code in case.differential]
    if name == "triage":
        category = _triage_category(case)
        return rng.choice((f"Cat {category}", f"ATS {category}", f"Triage cat {category}"))
    form = rng.randrange(4)
    if form == 0:
        dx = " ".join(f"?{n}" for n in names)
    elif form == 1:
        dx = "r/o " + ", ".join(names)
    elif form == 2:
        dx = " vs ".join(names) if len(names) > 1 else f"?{names[0]}"
    else:
        dx = "DDx " + ", ".join(names)
    if name in ("referral", "gp"):
        team = _team(case.code)
        return rng.choice(
            (
                f"Differential includes {', '.join(names)}",
                f"I would be grateful for your assessment, ?{names[0]}",
                f"I wonder about {' or '.join(names)}",
                f"Please could the {team} team assess",
            )
        )
    if name == "sbar":
        ask = rng.choice(("please review", "for senior review", "escalated to reg", "to assess"))
        return f"{dx}, {ask}"
    return dx


def _care(case: _Case, pen: _Pen) -> list[str]:
    rng = pen.rng
    out = []
    told = " ".join([case.complaint, *case.symptoms]).lower()
    if "pain" in told or "ache" in told:
        out.append(f"Pain score {rng.randint(4, 9)}/10, analgesia given.")
    news = _news2(case)
    if news is not None and rng.random() < 0.6:
        out.append(f"NEWS {news}.")
    out += rng.sample(NURSING_CARE, rng.randint(0, 2))
    return out


def _demographics(case: _Case, pen: _Pen) -> str:
    template = pen.habit(pen.style.demographics, pen.habits.template, "demographics")
    child = case.age < 16
    man = ("girl" if case.female else "boy") if child else ("woman" if case.female else "man")
    gent = man if child else ("lady" if case.female else "gentleman")
    return template.format(
        age=case.age,
        MF="F" if case.female else "M",
        mf="female" if case.female else "male",
        man=man,
        gent=gent,
    )


def _section(case: _Case, section: str, pen: _Pen, style_name: str) -> list[str]:
    """The sentences of one section, or [] when the case has nothing to say there."""
    style = pen.style
    cap = style.caps.get(section, 99)
    if cap == 0:
        return []
    if section == "negatives":
        prose = style.join == "prose"
        subject = ("She" if case.female else "He") if prose else ""
        return _negation_sentences(case, pen, subject)
    if section == "care":
        return _care(case, pen) if style_name == "nursing" else []
    if section == "closing":
        return [pen.rng.choice(style.templates["closing"])] if "closing" in style.templates else []
    if section == "plan":
        if not case.differential or pen.rng.random() >= style.plan:
            return []
        items = _plan(case, pen, style_name)
    elif section == "vitals":
        if not case.vitals:
            return []
        form = pen.habit(style.vitals, pen.habits.vitals_format)
        items, form = _format_vitals(case.vitals, pen, form)
        if form == "slash":
            return [items + "."]
    elif section == "labs":
        labs = case.labs
        if style_name in ("triage", "gp"):
            labs = [(k, x) for k, x in labs if k in _POINT_OF_CARE]
        if not labs:
            return []
        form = pen.habit(style.labs, pen.habits.lab_format)
        items = ", ".join(_format_lab(k, x, pen, form) for k, x in labs[:cap])
    elif section == "investigations":
        found = case.investigations
        if style_name in ("triage", "gp"):
            found = [i for i in found if i.startswith(_BEDSIDE)]
        if not found:
            return []
        items = "; ".join(_format_investigation(i, pen) for i in _cue_last(found[:cap]))
    elif section == "meds":
        if not case.meds:
            return []
        items = pen.join(case.meds[:cap])
    elif section == "social":
        if not case.social:
            return []
        items = pen.join(case.social[:cap])
    else:
        symptoms = case.symptoms
        if "nausea" in symptoms and "vomiting" in symptoms:  # written together: "N/V"
            symptoms = [x for x in symptoms if x not in ("nausea", "vomiting")]
            symptoms.append("nausea and vomiting")
        source = {
            "symptoms": symptoms,
            "history": [*case.background, *case.history],
            "exam": [*case.exam, *case.distractors],
        }[section]
        if not source:
            return []
        items = pen.join([pen.say(p) for p in _cue_last(source[:cap])])
    template = pen.habit(style.templates[section], pen.habits.template, section)
    he, his = ("She", "Her") if case.female else ("He", "His")
    text = template.format(items=items, He=he, His=his, he=he.lower())
    return [_capital(text)]


def _article(phrase: str) -> str:
    """ "an" before a vowel sound (an 8-day, an 18-year-old, an eight-hour), else "a"."""
    return "an" if re.match(r"(?:8|11\b|11-|18\b|18-|eight|eleven|(?!one)[aeiou])", phrase) else "a"


def _opening(case: _Case, pen: _Pen) -> str:
    style = pen.style
    form = pen.habit(style.durations, pen.habits.template, "durations")
    dur, dur_adj = _duration(case.hours, form)
    template = pen.habit(style.templates["opening"], pen.habits.template, "opening")
    demo = _demographics(case, pen)
    text = template.format(
        demo=demo,
        a_demo=f"{_article(demo)} {demo}",
        a_dur=f"{_article(dur_adj)} {dur_adj}",
        complaint=pen.say(case.complaint, noun=True),
        dur=dur,
        dur_adj=dur_adj,
        team=_team(case.code),
        him="her" if case.female else "him",
    )
    return _capital(text)


def _render(
    case: _Case, style_name: str, habits: HospitalHabits, seed: str, plain_negatives: bool = False
) -> list[str]:
    """The note's sentences, before any sloppiness (see :func:`_finish`)."""
    style = _NEUTRAL if style_name == "neutral" else _STYLES[style_name]
    pen = _Pen(style, habits, seed, plain=style_name == "neutral")
    pen.plain_negatives = plain_negatives
    pen.name = style_name
    layout = pen.habit(style.layouts, habits.template, "layout")
    sentences: list[str] = []
    marker = ""
    for part in layout:
        if part.startswith("@"):
            marker = part[1:]
            continue
        said = [_opening(case, pen)] if part == "opening" else _section(case, part, pen, style_name)
        if said and marker:
            said[0] = f"{marker} {said[0]}"
            marker = ""
        sentences += said
    return sentences


# Words typos never touch: negation cues, and what makes a patient context visible.
_PROTECTED = frozenset(_CUES) | {
    "denies",
    "denied",
    "without",
    "negative",
    "apyrexial",
    "afebrile",
    "diabetes",
    "insulin",
    "metformin",
    "gliclazide",
    "pregnant",
    "gestation",
    "transplant",
    "methotrexate",
    "prednisolone",
    "chemotherapy",
    "azathioprine",
    "tacrolimus",
    "immunosuppressed",
    "immunocompromised",
}


def _typo(word: str, rng: random.Random) -> str:
    i = rng.randrange(1, len(word) - 2)
    kind = rng.randrange(3)
    if kind == 0:
        out = word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    elif kind == 1:
        out = word[:i] + word[i + 1 :]
    else:
        out = word[:i] + word[i] + word[i:]
    return word if out in _PROTECTED else out


def _negates(sentence: str) -> bool:
    lowered = sentence.lower()
    return bool(_CUE_RE.search(lowered)) or any(w in lowered for w in FEVER_NEGATIVES)


def _finish(sentences: list[str], style: _Style, habits: HospitalHabits, seed: str) -> str:
    """Join the sentences with the style's sloppiness: typos, missing full stops and capitals.

    A negation always keeps the full stops around it, so that it never runs on into another
    sentence's findings (a "-ve" looks back to the previous full stop).
    """
    rng = random.Random(f"{seed}:sloppy")
    rate = style.typos * habits.sloppiness
    sloppy = style.sloppy * habits.sloppiness
    negates = [_negates(s) for s in sentences] + [True]
    out = []
    for k, sentence in enumerate(sentences):
        if rate:
            words = sentence.split(" ")
            for j, w in enumerate(words):
                eligible = len(w) >= 6 and w.isalpha() and w.islower() and w not in _PROTECTED
                if eligible and rng.random() < rate:
                    words[j] = _typo(w, rng)
            sentence = " ".join(words)
        capitalised = re.fullmatch(r"[A-Z][a-z]+", sentence.split(" ", 1)[0])
        if capitalised and k > 0 and sloppy and rng.random() < sloppy:
            sentence = sentence[0].lower() + sentence[1:]
        keep = negates[k] or negates[k + 1]
        if not keep and sloppy and rng.random() < sloppy and sentence.endswith("."):
            sentence = sentence[:-1]
        out.append(sentence)
    return " ".join(out)


_TRIM_ORDER = (
    "distractors",
    "social",
    "meds",
    "differential",
    "history",
    "negatives",
    "labs",
    "symptoms",
    "investigations",
    "exam",
)


def _trimmed(case: _Case) -> _Case | None:
    """Drop one low-priority finding so the note fits the model's 128-token window."""
    for name in _TRIM_ORDER:
        items = getattr(case, name)
        if len(items) > (1 if name in ("symptoms", "exam") else 0):
            return replace(case, **{name: items[:-1]})
    return None


def _padded(case: _Case, c: Condition, rng: random.Random) -> _Case | None:
    """Lengthen a short note with low-information material, never with a new finding.

    Only observations, normal results, background history and medications are added, so a
    sparse note stays as ambiguous as it was drawn.
    """
    pick = _Pick(case.female, case.age, case.context, case.presentation)
    options: list[_Case] = []
    if not case.vitals:
        options.append(replace(case, vitals=_vitals(c, pick, rng)))
    taken = {key for key, _ in case.labs}
    spare = [key for key in _normal_panel(c) if key not in taken]
    if spare:
        key = rng.choice(spare)
        options.append(replace(case, labs=[*case.labs, (key, rng.uniform(*LABS[key].normal))]))
    for name, pool in (("history", INCIDENTAL_HISTORY), ("meds", MEDICATIONS)):
        have = [*getattr(case, name), *case.background]
        fresh = [
            i.text
            for i in pool
            if i.text not in have
            and c.code not in i.excludes
            and i.sex in (None, "F" if case.female else "M")
            and _visible(i.text, pick)
            and len(_no_duplicates([*have, i.text])) > len(have)
        ]
        if fresh:
            added = [*getattr(case, name), rng.choice(fresh)]
            options.append(
                replace(case, history=added) if name == "history" else replace(case, meds=added)
            )
    return _consistent(rng.choice(options)) if options else None


# Mean BERT word pieces (uncased vocabulary) of a run of letters, by length: abbreviations
# split more often than words of the same length, long medical words into several pieces.
_UPPER_PIECES = (0, 1.0, 1.1, 2.0, 1.7, 2.7, 3.0)
_LOWER_PIECES = (0, 1.0, 1.05, 1.2, 1.2, 1.1, 1.4, 1.3, 1.55, 1.6, 2.3, 2.15, 2.5, 3.6)


def estimated_tokens(text: str) -> float:
    """An estimate of a note's length in BERT word pieces, [CLS] and [SEP] included."""
    return 2.0 + sum(_word_pieces(word) for word in text.split())


@cache
def _word_pieces(word: str) -> float:
    count = 0.0
    for piece in re.findall(r"[A-Za-z]+|\d+|[^\sA-Za-z\d]", word):
        n = len(piece)
        if piece[0].isdigit():
            count += 1.0 if n <= 3 else 2.2
        elif not piece[0].isalpha():
            count += 1.0
        elif piece.isupper():
            count += _UPPER_PIECES[min(n, 6)]
        else:
            count += _LOWER_PIECES[min(n, 13)] + 0.3 * max(0, n - 13)
    return count


def _too_long(text: str, style: _Style) -> bool:
    return len(text.split()) > min(MAX_WORDS, style.words[1]) or estimated_tokens(text) > MAX_TOKENS


_PREFIX_CUE = re.compile(r"(?<![\w-])(?:no|not|nil|denies|denied|without|negative for)(?![\w-])")
_POSTFIX_CUE = re.compile(r"\s(?:-ve|neg)(?![\w-])")
_CLAUSE_END = re.compile(r"[.;:!?]")


def _negated_spans(text: str) -> list[str]:
    """The text each negation governs: from a cue up to the end of its clause, and the item a
    postfix "-ve"/"neg" follows (back to the previous comma or full stop)."""
    lowered = text.lower()
    spans = []
    for m in _PREFIX_CUE.finditer(lowered):
        end = _CLAUSE_END.search(lowered, m.end())
        spans.append(lowered[m.end() : end.start() if end else len(lowered)])
    for clause in re.split(r"[.;:,!?]", lowered):
        spans += [clause[: m.start()] for m in _POSTFIX_CUE.finditer(clause)]
    spans += ["fever" for _ in re.finditer(r"\b(?:apyrexial|afebrile)\b", lowered)]
    return spans


def _denies_own_hallmark(text: str, code: str) -> bool:
    return any(_spells_own_hallmark(_words(span), code) for span in _negated_spans(text))


def write_note(c: Condition, style: str, seed: str, habits: HospitalHabits | None = None) -> Note:
    """One free-text note for condition ``c`` in ``style``; pure in its arguments.

    ``style`` is one of STYLES (or "neutral": canonical wording, for tests); ``habits`` default
    to habits of no particular hospital drawn from ``seed``.  The note is padded up to the
    style's shortest length and trimmed to its longest and to the 128-token window.
    """
    habits = habits or (NEUTRAL_HABITS if style == "neutral" else free_habits(seed))
    spec = _NEUTRAL if style == "neutral" else _STYLES[style]
    rng = random.Random(seed)
    case = _draw_case(c, rng)

    def text_of(case: _Case, plain_negatives: bool) -> str:
        return " ".join(_render(case, style, habits, seed, plain_negatives))

    # Guards: a negative's wording may share words with a hallmark of the condition ("no
    # uncontrollable shaking" in thyroid storm): then the catalogue's wording, else none.
    for plain in (False, True, None):
        if plain is None:
            case, plain = replace(case, negatives=[]), False
        text = text_of(case, plain)
        while len(text.split()) < spec.words[0] and (longer := _padded(case, c, rng)):
            case, text = longer, text_of(longer, plain)
        while _too_long(text, spec) and (shorter := _trimmed(case)) is not None:
            case, text = shorter, text_of(shorter, plain)
        final = _finish(_render(case, style, habits, seed, plain), spec, habits, seed)
        if not _denies_own_hallmark(final, c.code):
            break
    return Note(final, c.code, style, case.context, case.atypical)


def write_case(c: Condition, style: str, seed: str, habits: HospitalHabits | None = None) -> str:
    """The text of :func:`write_note`."""
    return write_note(c, style, seed, habits).text


EXAMPLE_CODES = {
    "ed": "I26",
    "triage": "I21",
    "nursing": "N39.0",
    "sbar": "A41",
    "referral": "K35",
    "discharge": "I50",
    "gp": "M31.6",
    "telegraphic": "J18",
}


def style_examples(seed: int = 0) -> dict[str, str]:
    """One note per style for a fixed condition and seed: the examples in docs/data.md."""
    return {
        style: write_case(BY_CODE[code], style, f"federimed-example:{seed}:{style}")
        for style, code in EXAMPLE_CODES.items()
    }


# --------------------------------------------------------------------------------------------
# The non-IID split
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


def _choose_unseen(config: SynthConfig, rng: np.random.Generator) -> list[tuple[str, ...]]:
    """Codes each hospital never sees: rare ones favoured, none missing everywhere."""
    if config.hospitals == 1:
        return [()]
    missing: Counter[str] = Counter()
    result = []
    for _ in range(config.hospitals):
        pool = [c for c in CONDITIONS if missing[c.code] < config.hospitals - 1]
        weights = np.array([RARE_UNSEEN_WEIGHT if c.rare else 1.0 for c in pool])
        picked = rng.choice(
            len(pool), config.unseen_per_hospital, replace=False, p=weights / weights.sum()
        )
        codes = tuple(pool[i].code for i in sorted(picked))
        missing.update(codes)
        result.append(codes)
    return result


def _label_counts(
    n: int, config: SynthConfig, seen: list[str], rng: np.random.Generator
) -> tuple[Counter[str], Counter[str]]:
    """Train and validation label counts from one Dirichlet draw (validation: same law)."""
    n_train, n_validation = _split_sizes(n, config.validation_fraction)
    p = rng.dirichlet([config.alpha] * len(seen))
    extra = rng.multinomial(n_train - MIN_TRAIN_PER_SEEN * len(seen), p)
    validation = rng.multinomial(n_validation, p)
    train = Counter(
        {code: MIN_TRAIN_PER_SEEN + int(k) for code, k in zip(seen, extra, strict=True)}
    )
    return train, Counter({code: int(k) for code, k in zip(seen, validation, strict=True) if k})


def _style_weights(styles: Sequence[str]) -> list[float]:
    """The first style is the hospital's main one: half its notes (three styles) or 60%."""
    if len(styles) == 1:
        return [1.0]
    main = 0.5 if len(styles) > 2 else 0.6
    return [main] + [(1 - main) / (len(styles) - 1)] * (len(styles) - 1)


def _records(
    counts: Counter[str], habits: HospitalHabits, prefix: str, start: int, rng: random.Random
) -> list[dict]:
    labels = [code for code in label_names() if counts[code] for _ in range(counts[code])]
    rng.shuffle(labels)
    weights = _style_weights(habits.styles)
    out = []
    for i, code in enumerate(labels, start=start):
        record_id = f"{prefix}-{i:05d}"
        style = rng.choices(habits.styles, weights)[0]
        seed = f"federimed-case:{record_id}:{rng.random()}"
        text = write_case(BY_CODE[code], style, seed, habits)
        out.append({"id": record_id, "text": text, "label": code, "style": style})
    return out


def _hospital(
    index: int,
    n: int,
    unseen: tuple[str, ...],
    styles: tuple[str, ...],
    config: SynthConfig,
    np_rng: np.random.Generator,
) -> HospitalData:
    seen = [code for code in label_names() if code not in unseen]
    train_counts, validation_counts = _label_counts(n, config, seen, np_rng)
    habits = hospital_habits(index, config.seed, styles)
    rng = random.Random(f"federimed-hospital:{config.seed}:{index}")
    prefix = f"h{index + 1}"
    train = _records(train_counts, habits, prefix, 0, rng)
    validation = _records(validation_counts, habits, prefix, len(train), rng)
    return HospitalData(habits.name, train, validation, unseen, styles)


def _test_records(
    per_condition: int, styles: Sequence[str], prefix: str, rng: random.Random
) -> list[dict]:
    """A balanced set written with habits of no hospital; styles in turn within a condition."""
    jobs = [
        (code, styles[(k + j) % len(styles)])
        for k, code in enumerate(label_names())
        for j in range(per_condition)
    ]
    rng.shuffle(jobs)
    out = []
    for i, (code, style) in enumerate(jobs):
        record_id = f"{prefix}-{i:05d}"
        seed = f"federimed-case:{record_id}:{rng.random()}"
        text = write_case(BY_CODE[code], style, seed)
        out.append({"id": record_id, "text": text, "label": code, "style": style})
    return out


def generate(config: SynthConfig) -> SynthDataset:
    """The whole synthetic consortium; identical configs give identical datasets."""
    np_rng = np.random.default_rng([config.seed, 20240])
    unseen = _choose_unseen(config, np_rng)
    styles = hospital_styles(config)
    hospitals = [
        _hospital(i, n, unseen[i], styles[i], config, np_rng) for i, n in enumerate(_sizes(config))
    ]
    test_rng = random.Random(f"federimed-test:{config.seed}")
    test = _test_records(config.test_cases_per_condition, STYLES, "test", test_rng)
    unseen_rng = random.Random(f"federimed-unseen-style:{config.seed}")
    unseen_style = _test_records(
        config.unseen_style_cases_per_condition,
        (config.held_out,),
        "test-unseen-style",
        unseen_rng,
    )
    return SynthDataset(
        hospitals=hospitals,
        test=test,
        labels=label_names(),
        config=config,
        held_out_style=config.held_out,
        unseen_style_test=unseen_style,
    )


# --------------------------------------------------------------------------------------------
# Writing to disk
# --------------------------------------------------------------------------------------------

RECORD_KEYS = ("id", "text", "label", "style")


def _write_jsonl(path: Path, records: Iterable[dict]) -> None:
    lines = (
        json.dumps({k: r[k] for k in RECORD_KEYS if k in r}, ensure_ascii=False) for r in records
    )
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _label_counts_in_order(records: list[dict], labels: dict[str, str]) -> dict[str, int]:
    counts = Counter(r["label"] for r in records)
    return {code: counts[code] for code in labels if counts[code]}


def _manifest(dataset: SynthDataset) -> dict:
    hospitals = [
        {
            "name": h.name,
            "styles": list(h.styles),
            "train": len(h.train),
            "validation": len(h.validation),
            "train_label_counts": _label_counts_in_order(h.train, dataset.labels),
            "validation_label_counts": _label_counts_in_order(h.validation, dataset.labels),
            "unseen": list(h.unseen),
        }
        for h in dataset.hospitals
    ]
    config = dataset.config
    return {
        "seed": None if config is None else config.seed,
        "alpha": None if config is None else config.alpha,
        "config": None if config is None else asdict(config),
        "held_out_style": dataset.held_out_style,
        "test": len(dataset.test),
        "test_unseen_style": len(dataset.unseen_style_test),
        "hospitals": hospitals,
    }


def write_dataset(dataset: SynthDataset, out: Path) -> None:
    """Write labels, both test sets, manifest and one folder per hospital under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = [{"code": code, "name": name} for code, name in dataset.labels.items()]
    (out / "labels.json").write_text(json.dumps(labels, indent=2) + "\n", encoding="utf-8")
    _write_jsonl(out / "test.jsonl", dataset.test)
    _write_jsonl(out / "test-unseen-style.jsonl", dataset.unseen_style_test)
    for h in dataset.hospitals:
        (out / h.name).mkdir(exist_ok=True)
        _write_jsonl(out / h.name / "train.jsonl", h.train)
        _write_jsonl(out / h.name / "validation.jsonl", h.validation)
    manifest = json.dumps(_manifest(dataset), indent=2)
    (out / "manifest.json").write_text(manifest + "\n", encoding="utf-8")


if __name__ == "__main__":  # python -m federimed.data.synth: the examples of docs/data.md
    for _style, _text in style_examples().items():
        print(f"{_style}:\n\n    {_text}\n")

"""Writing styles and hospital habits: how each style writes, and each hospital's own habits."""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

from federimed.data.conditions import (
    LABS,
)
from federimed.data.paraphrase import PARAPHRASES
from federimed.data.synth.config import STYLES, SynthConfig

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

"""Deterministic synthetic clinical cases, hospital writing styles and the non-IID split.

Real notes cannot leave a hospital, so development and tests run on cases generated from the
catalogue in :mod:`federimed.data.conditions`.  The generator is built to be *hard in the right
ways* for a text classifier: findings overlap between look-alike diagnoses, negations quote other
conditions' keywords, irrelevant history adds noise, sections go missing, a fifth of cases are
atypical, and every hospital writes in its own habits (terse, prose or headed notes, its own
synonyms and units).  The split mimics a real consortium: label skew from a Dirichlet draw,
different hospital sizes and conditions some hospitals have never seen.

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

import numpy as np

from federimed.data.conditions import (
    BY_CODE,
    CONDITIONS,
    FEMALE_ONLY,
    INCIDENTAL_HISTORY,
    LABS,
    MALE_ONLY,
    MEDICATIONS,
    PANELS,
    Condition,
    Incidental,
    label_names,
)

MIN_TRAIN_PER_SEEN = 2
ATYPICAL_RATE = 0.2
CLASSIC_COMPLAINT_RATE = 0.5
MIN_WORDS = 40
MAX_WORDS = 110
RARE_UNSEEN_WEIGHT = 6.0
SIZE_FACTORS = (0.6, 1.4)

# Probability that a whole section is left out of a note (documentation is never complete).
OMIT = {
    "symptoms": 0.1,
    "negatives": 0.35,
    "history": 0.3,
    "meds": 0.5,
    "exam": 0.2,
    "vitals": 0.15,
    "labs": 0.3,
    "investigations": 0.35,
}


@dataclass(frozen=True)
class SynthConfig:
    """Everything that determines a generated dataset; invalid values fail at construction."""

    hospitals: int = 3
    seed: int = 0
    alpha: float = 0.5
    cases_per_hospital: int = 300
    test_cases_per_condition: int = 10
    validation_fraction: float = 0.15
    unseen_per_hospital: int = 6

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
        smallest_train = min(_split_sizes(n, self.validation_fraction)[0] for n in _sizes(self))
        unseen = self.unseen_per_hospital if self.hospitals > 1 else 0
        needed = MIN_TRAIN_PER_SEEN * (len(CONDITIONS) - unseen)
        _require(
            smallest_train >= needed,
            f"cases_per_hospital={self.cases_per_hospital} is too small: the smallest hospital"
            f" gets {smallest_train} training cases but needs {needed}"
            f" ({MIN_TRAIN_PER_SEEN} per condition it has)",
        )


@dataclass(frozen=True)
class HospitalData:
    """One hospital's private data; ``unseen`` lists the codes absent from its train set."""

    name: str
    train: list[dict]
    validation: list[dict]
    unseen: tuple[str, ...]


@dataclass(frozen=True)
class SynthDataset:
    """All hospitals plus the common, balanced test set that mixes every writing style."""

    hospitals: list[HospitalData]
    test: list[dict]
    labels: dict[str, str]
    config: SynthConfig | None = None


@dataclass(frozen=True)
class HospitalStyle:
    """A hospital's documentation habits; ``consistency`` is how often a note follows them."""

    name: str
    register: str
    consistency: float
    synonyms: tuple[str, ...]
    templates: tuple[int, ...]
    lab_names: tuple[str, ...]
    vital_labels: str
    order: tuple[str, ...]
    negation: str
    show_units: bool
    lab_flags: bool
    units: frozenset[str] = field(default_factory=frozenset)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


# --------------------------------------------------------------------------------------------
# Writing styles
# --------------------------------------------------------------------------------------------

REGISTERS = ("terse", "prose", "headers")
SECTIONS = (
    "opening",
    "symptoms",
    "negatives",
    "history",
    "meds",
    "exam",
    "vitals",
    "labs",
    "investigations",
)
ORDERS = (
    SECTIONS,
    (
        "opening",
        "symptoms",
        "negatives",
        "exam",
        "investigations",
        "vitals",
        "labs",
        "history",
        "meds",
    ),
    (
        "opening",
        "symptoms",
        "history",
        "negatives",
        "vitals",
        "exam",
        "labs",
        "investigations",
        "meds",
    ),
)

TEMPLATES: dict[str, dict[str, tuple[str, ...]]] = {
    "terse": {
        "opening": (
            "{age}{sx} c/o {complaint} x{dur}.",
            "{age}yo {sx} c/o {complaint} x{dur}.",
            "{age}{sx} pt, {complaint} x{dur}.",
        ),
        "symptoms": ("Assoc {items}.", "+ {items}.", "Also {items}."),
        "negatives": ("{neg} {items}.",),
        "history": ("hx {items}.", "PMH {items}.", "bg {items}."),
        "meds": ("DH {items}.", "meds {items}.", "on {items}."),
        "exam": ("O/E {items}.", "OE: {items}."),
        "vitals": ("{items}.", "obs {items}."),
        "labs": ("bloods {items}.", "{items}."),
        "investigations": ("{items}.",),
    },
    "prose": {
        "opening": (
            "A {age}-year-old {sx} presents with {dur} of {complaint}.",
            "This {age}-year-old {sx} attended with {complaint} over the last {dur}.",
            "{age}-year-old {sx} presenting with {complaint} for {dur}.",
        ),
        "symptoms": (
            "{He} also reports {items}.",
            "There is associated {items}.",
            "{He} describes {items}.",
        ),
        "negatives": ("{He} denies {items}.", "There is no {items}.", "No {items}."),
        "history": (
            "{His} past history includes {items}.",
            "Background of {items}.",
            "{He} has a history of {items}.",
        ),
        "meds": ("{He} takes {items}.", "Regular medications are {items}."),
        "exam": ("On examination, {items}.", "Examination: {items}."),
        "vitals": ("Observations: {items}.", "{Items}."),
        "labs": ("Blood tests show {items}.", "Bloods: {items}."),
        "investigations": ("{Items}.",),
    },
    "headers": {
        "opening": (
            "PC: {complaint} x {dur}. {age}{sx}.",
            "Pt: {age} {sx}. PC: {complaint}, {dur}.",
            "PC: {complaint} ({dur}). Age {age}, {sx}.",
        ),
        "symptoms": ("HPI: {items}.", "Hx: {items}."),
        "negatives": ("ROS: {neg} {items}.", "Neg: {neg} {items}."),
        "history": ("PMH: {items}.",),
        "meds": ("DH: {items}.", "Meds: {items}."),
        "exam": ("Exam: {items}.", "O/E: {items}."),
        "vitals": ("Obs: {items}.", "Vitals: {items}."),
        "labs": ("Bloods: {items}.", "Labs: {items}."),
        "investigations": ("Ix: {items}.", "Results: {items}."),
    },
    "neutral": {
        "opening": ("{age}-year-old {sx}. Presenting complaint: {complaint} for {dur}.",),
        "symptoms": ("Associated symptoms: {items}.",),
        "negatives": ("Negatives: {neg} {items}.",),
        "history": ("Past medical history: {items}.",),
        "meds": ("Medications: {items}.",),
        "exam": ("Examination: {items}.",),
        "vitals": ("Observations: {items}.",),
        "labs": ("Blood tests: {items}.",),
        "investigations": ("Investigations: {items}.",),
    },
}

SEX_WORDS = {
    "terse": ("M", "F"),
    "prose": ("man", "woman"),
    "headers": ("M", "F"),
    "neutral": ("male", "female"),
}
VITAL_LABEL_CHOICES = {
    "terse": ("abbr",),
    "prose": ("words", "mixed"),
    "headers": ("abbr", "mixed"),
}
VITAL_LABELS = {
    "abbr": {"hr": "HR", "bp": "BP", "rr": "RR", "spo2": "SpO2", "temp": "T"},
    "mixed": {"hr": "pulse", "bp": "BP", "rr": "RR", "spo2": "sats", "temp": "temp"},
    "words": {
        "hr": "heart rate",
        "bp": "blood pressure",
        "rr": "respiratory rate",
        "spo2": "oxygen saturation",
        "temp": "temperature",
    },
}

# (canonical phrase as written in the catalogue, full-word synonyms, abbreviations)
SYNONYMS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("shortness of breath", ("breathlessness", "dyspnoea"), ("SOB",)),
    ("chest pain", (), ("CP",)),
    ("abdominal pain", (), ("abdo pain",)),
    ("diarrhoea and vomiting", (), ("D&V",)),
    ("vomiting", ("being sick",), ()),
    ("diarrhoea", ("loose stools",), ()),
    ("right iliac fossa", (), ("RIF",)),
    ("left iliac fossa", (), ("LIF",)),
    ("right upper quadrant", (), ("RUQ",)),
    ("hypertension", ("high blood pressure",), ("HTN",)),
    ("type 2 diabetes", ("type 2 diabetes mellitus",), ("T2DM",)),
    ("type 1 diabetes", ("type 1 diabetes mellitus",), ("T1DM",)),
    ("atrial fibrillation", (), ("AF",)),
    ("myocardial infarction", ("heart attack",), ("MI",)),
    ("ischaemic heart disease", ("coronary artery disease",), ("IHD",)),
    ("chronic kidney disease", (), ("CKD",)),
    ("osteoarthritis", (), ("OA",)),
    ("blood pressure", (), ("BP",)),
    ("fever", ("pyrexia",), ()),
    ("sweating", ("diaphoresis",), ()),
    ("palpitations", (), ("palps",)),
    ("headache", (), ("HA",)),
    ("haemoptysis", ("coughing up blood",), ()),
    ("dysuria", ("pain passing urine",), ()),
    ("photophobia", ("sensitivity to light",), ()),
    ("anorexia", ("loss of appetite",), ()),
    ("orthopnoea", ("breathlessness lying flat",), ()),
    ("paroxysmal nocturnal dyspnoea", (), ("PND",)),
    ("wheeze", ("wheezing",), ()),
    ("weight loss", (), ("wt loss",)),
    ("no focal neurology", ("neurologically intact",), ("no FND",)),
    ("bilateral", (), ("bilat",)),
    ("previous", ("prior",), ("prev",)),
    ("history of", (), ("hx",)),
    ("left", (), ("L",)),
    ("right", (), ("R",)),
    ("with", (), ("w/",)),
    ("ST elevation", ("ST-segment elevation",), ("STE",)),
    ("CXR", ("chest X-ray", "chest radiograph"), ()),
    ("LP", ("lumbar puncture",), ()),
    ("urine dip", ("urinalysis", "urine dipstick"), ("UA",)),
    ("tenderness", (), ("TTP",)),
    ("DVT", ("deep vein thrombosis",), ()),
    ("blood cultures", (), ("BCs",)),
    ("sputum", ("phlegm",), ()),
    ("confusion", ("disorientation",), ()),
)
_SYNONYM_INDEX = {canonical: i for i, (canonical, _, _) in enumerate(SYNONYMS)}
_SYNONYM_RE = re.compile(
    r"(?<![\w-])("
    + "|".join(re.escape(c) for c in sorted(_SYNONYM_INDEX, key=len, reverse=True))
    + r")(?![\w-])"
)
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


def _variants(entry: int, register: str) -> tuple[str, ...]:
    """The spellings a register may use: prose never abbreviates, terse notes prefer to."""
    canonical, words, abbrevs = SYNONYMS[entry]
    if register in ("prose", "neutral"):
        return (canonical, *words)
    return (canonical, *words, *abbrevs)


def _preferred_spelling(entry: int, register: str, rng: random.Random) -> str:
    abbrevs = SYNONYMS[entry][2]
    if register == "terse" and abbrevs and rng.random() < 0.85:
        return rng.choice(abbrevs)
    return rng.choice(_variants(entry, register))


def hospital_style(index: int, seed: int) -> HospitalStyle:
    """The writing habits of hospital ``index`` (0-based) in the consortium drawn with ``seed``.

    Registers rotate so that the first three hospitals always write differently; everything
    else (synonyms, units, templates, section order) is drawn from a seeded stream.
    """
    rng = random.Random(f"federimed-style:{seed}:{index}")
    register = REGISTERS[(index + seed) % len(REGISTERS)]
    return HospitalStyle(
        name=f"hospital-{index + 1}",
        register=register,
        consistency=rng.uniform(0.75, 0.92),
        synonyms=tuple(_preferred_spelling(i, register, rng) for i in range(len(SYNONYMS))),
        templates=tuple(rng.randrange(len(TEMPLATES[register][s])) for s in SECTIONS),
        lab_names=tuple(rng.choice(lab.names) for lab in LABS.values()),
        vital_labels=rng.choice(VITAL_LABEL_CHOICES[register]),
        order=rng.choice(ORDERS),
        negation=rng.choice(("denies", "no", "nil")),
        show_units=register == "prose" or rng.random() < 0.4,
        lab_flags=rng.random() < 0.5,
        units=frozenset(
            u for u in ("glucose_mgdl", "creatinine_mgdl", "fahrenheit") if rng.random() < 0.3
        ),
    )


NEUTRAL_STYLE = HospitalStyle(
    name="neutral",
    register="neutral",
    consistency=0.9,
    synonyms=tuple(canonical for canonical, _, _ in SYNONYMS),
    templates=(0,) * len(SECTIONS),
    lab_names=tuple(lab.names[0] for lab in LABS.values()),
    vital_labels="words",
    order=SECTIONS,
    negation="no",
    show_units=True,
    lab_flags=False,
)


# --------------------------------------------------------------------------------------------
# Drawing the clinical content of one case
# --------------------------------------------------------------------------------------------


@dataclass
class _Case:
    """The findings of one patient before any wording is chosen (lists may be emptied)."""

    age: int
    female: bool
    complaint: str
    hours: float
    symptoms: list[str]
    negatives: list[str]
    history: list[str]
    meds: list[str]
    exam: list[str]
    vitals: dict[str, float]
    labs: list[tuple[str, float]]
    investigations: list[str]


_STOPWORDS = frozenset({"a", "an", "the", "of", "on", "in", "to", "and", "or", "with", "at"})


@cache
def _vocabulary(code: str) -> frozenset[str]:
    """Content words of every finding of a condition, to keep negations non-contradictory."""
    c = BY_CODE[code]
    banks = (c.complaints, c.symptoms, c.exam, c.investigations, c.risks, c.hallmarks)
    return frozenset(w for bank in banks for p in bank for w in _words(p)) - _STOPWORDS


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _sex_ok(phrase: str, female: bool) -> bool:
    return phrase not in (MALE_ONLY if female else FEMALE_ONLY)


def _sample(rng: random.Random, items: Sequence[str], low: int, high: int) -> list[str]:
    return rng.sample(list(items), min(len(items), rng.randint(low, high)))


def _bank(items: Sequence[str], atypical: bool, female: bool) -> list[str]:
    """A finding bank for this patient; atypical cases lose the classic first item."""
    return [p for p in (items[1:] if atypical else items) if _sex_ok(p, female)]


def _background(
    pool: Iterable[Incidental], code: str, female: bool, rng: random.Random, most: int
) -> list[str]:
    sex = "F" if female else "M"
    fitting = [i.text for i in pool if code not in i.excludes and i.sex in (None, sex)]
    return _sample(rng, fitting, 0, most)


def _negatives(c: Condition, female: bool, rng: random.Random) -> list[str]:
    """Pertinent negatives: mostly the hallmarks of this condition's look-alikes."""
    own = _vocabulary(c.code)
    picked: list[str] = []
    for _ in range(rng.randint(1, 3)):
        source = (
            BY_CODE[rng.choice(c.mimics)]
            if rng.random() < 0.8
            else rng.choice([other for other in CONDITIONS if other.group == c.group])
        )
        hallmark = rng.choice(source.hallmarks)
        content = set(_words(hallmark)) - _STOPWORDS
        if not content <= own and _sex_ok(hallmark, female) and hallmark not in picked:
            picked.append(hallmark)
    return picked


def _vitals(c: Condition, rng: random.Random) -> dict[str, float]:
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
    dropped = {k for k in ("hr", "rr", "spo2", "temp") if rng.random() < 0.1}
    return {k: x for k, x in values.items() if k not in dropped}


def _normal_panel(c: Condition) -> list[str]:
    """Panel tests that come back normal: never one this condition makes abnormal."""
    abnormal = {key for key, _, _ in c.labs}
    return [key for key in PANELS[c.group] if key not in abnormal]


def _labs(c: Condition, atypical: bool, rng: random.Random) -> list[tuple[str, float]]:
    """Abnormal results of the condition plus normal results of its system's usual panel."""
    keep = 0.6 if atypical else 0.8
    labs = [(key, rng.uniform(lo, hi)) for key, lo, hi in c.labs if rng.random() < keep]
    spare = _normal_panel(c)
    labs += [(key, rng.uniform(*LABS[key].normal)) for key in _sample(rng, spare, 1, 3)]
    rng.shuffle(labs)
    return labs


def _investigations(
    c: Condition, atypical: bool, female: bool, age: int, rng: random.Random
) -> list[str]:
    found = _sample(rng, _bank(c.investigations, atypical, female), 0 if atypical else 1, 2)
    if c.group == "abdo" and female and 16 <= age <= 45 and c.code != "O00" and rng.random() < 0.5:
        found.append("urine beta-hCG negative")
    return found


def _draw_case(c: Condition, rng: random.Random) -> _Case:
    """Sample the findings; atypical cases are sparser as well as lacking the classic ones."""
    female = rng.random() < c.female
    age = rng.randint(*c.age)
    atypical = rng.random() < ATYPICAL_RATE
    complaints = _bank(c.complaints, atypical, female)
    classic = not atypical and rng.random() < CLASSIC_COMPLAINT_RATE
    complaint = complaints[0] if classic else rng.choice(complaints)
    symptoms = [s for s in _bank(c.symptoms, atypical, female) if s not in complaint]
    risks = [r for r in c.risks if _sex_ok(r, female)]
    history = _sample(rng, risks, 0, 2) + _background(INCIDENTAL_HISTORY, c.code, female, rng, 2)
    case = _Case(
        age=age,
        female=female,
        complaint=complaint,
        hours=math.exp(rng.uniform(*(math.log(h) for h in c.onset_hours))),
        symptoms=_sample(rng, symptoms, 1, 2 if atypical else 3),
        negatives=_negatives(c, female, rng),
        history=list(dict.fromkeys(rng.sample(history, len(history)))),
        meds=_background(MEDICATIONS, c.code, female, rng, 2),
        exam=_sample(rng, _bank(c.exam, atypical, female), 1, 1 if atypical else 3),
        vitals=_vitals(c, rng),
        labs=_labs(c, atypical, rng),
        investigations=_investigations(c, atypical, female, age, rng),
    )
    return _omit_sections(case, rng)


def _omit_sections(case: _Case, rng: random.Random) -> _Case:
    empty = {name: type(getattr(case, name))() for name, p in OMIT.items() if rng.random() < p}
    return replace(case, **empty)


# --------------------------------------------------------------------------------------------
# Writing one case in a style
# --------------------------------------------------------------------------------------------


def _respell(text: str, style: HospitalStyle, rng: random.Random) -> str:
    """Apply the style's synonyms and abbreviations, with occasional per-note deviations."""

    def pick(match: re.Match[str]) -> str:
        entry = _SYNONYM_INDEX[match.group(1)]
        if rng.random() < style.consistency:
            return style.synonyms[entry]
        return rng.choice(_variants(entry, style.register))

    return _SYNONYM_RE.sub(pick, text)


_UNITS = (("week", 168.0, "/52"), ("day", 24.0, "d"), ("hour", 1.0, "h"))


def _duration(hours: float, register: str) -> str:
    """Durations as clinicians write them: minutes, hours, days from 48 h, weeks from 14 days."""
    if hours < 55 / 60:
        unit, n, short = "minute", max(10, round(hours * 6) * 10), "min"
    else:
        unit, size, short = next(u for u in _UNITS if hours >= 2 * u[1] or u[0] == "hour")
        n = round(hours / size)
    if register == "terse":
        return f"{n}{short}"
    spelled = _NUMBER_WORDS[n] if register == "prose" and n <= 10 else str(n)
    return f"{spelled} {unit}{'s' if n != 1 else ''}"


def _join(items: Sequence[str], register: str, last: str = "and") -> str:
    if register in ("prose", "neutral") and len(items) > 1:
        return f"{', '.join(items[:-1])} {last} {items[-1]}"
    return ", ".join(items)


def _format_lab(key: str, value: float, style: HospitalStyle) -> str:
    lab = LABS[key]
    name = style.lab_names[list(LABS).index(key)]
    low, high = lab.normal
    flag = " (H)" if value > high else " (L)" if value < low else ""
    unit, decimals = lab.unit, lab.decimals
    if key == "glucose" and "glucose_mgdl" in style.units:
        value, unit, decimals = value * 18.0, "mg/dL", 0
    if key == "creatinine" and "creatinine_mgdl" in style.units:
        value, unit, decimals = value / 88.4, "mg/dL", 2
    text = f"{value:.{decimals}f}" if value >= 10**-decimals else f"<{10**-decimals:.{decimals}f}"
    if style.show_units and unit:
        text += f" {unit}"
    if style.lab_flags:
        text += flag
    return f"{name} {text}"


def _format_vitals(vitals: dict[str, float], style: HospitalStyle) -> list[str]:
    labels = VITAL_LABELS[style.vital_labels]
    out = []
    if "hr" in vitals:
        out.append(f"{labels['hr']} {vitals['hr']}")
    out.append(f"{labels['bp']} {vitals['sbp']}/{vitals['dbp']}")
    if "rr" in vitals:
        out.append(f"{labels['rr']} {vitals['rr']}")
    if "spo2" in vitals:
        out.append(f"{labels['spo2']} {vitals['spo2']}%")
    if "temp" in vitals:
        temp = vitals["temp"]
        shown = f"{temp * 9 / 5 + 32:.1f}F" if "fahrenheit" in style.units else f"{temp:.1f}C"
        out.append(f"{labels['temp']} {shown}")
    return out


def _format_investigation(text: str, register: str) -> str:
    test, sep, finding = text.partition(": ")
    if not sep:
        return text[0].upper() + text[1:] if register == "prose" else text
    if register == "prose":
        return f"{test[0].upper()}{test[1:]} shows {finding}"
    return f"{test} - {finding}" if register == "headers" else text


def _section_items(case: _Case, section: str, style: HospitalStyle, rng: random.Random) -> str:
    """The filled-in list of one section, or "" when the case has nothing to say there."""
    register = style.register
    if section == "vitals":
        if not case.vitals:
            return ""
        return (" " if register == "terse" else ", ").join(_format_vitals(case.vitals, style))
    if section == "labs":
        return ", ".join(_format_lab(k, v, style) for k, v in case.labs)
    if section == "investigations":
        found = [
            _format_investigation(_respell(i, style, rng), register) for i in case.investigations
        ]
        return (". " if register in ("prose", "terse") else "; ").join(found)
    if section == "meds":
        return _join(case.meds, register)
    items = [_respell(p, style, rng) for p in getattr(case, section)]
    return _join(items, register, last="or" if section == "negatives" else "and")


def _template(section: str, style: HospitalStyle, rng: random.Random) -> str:
    options = TEMPLATES[style.register][section]
    if rng.random() < style.consistency:
        return options[style.templates[SECTIONS.index(section)]]
    return rng.choice(options)


def _render(case: _Case, style: HospitalStyle, seed: str) -> str:
    rng = random.Random(seed)
    register = style.register
    he, his = ("She", "Her") if case.female else ("He", "His")
    sx = SEX_WORDS[register][case.female]
    if register == "prose" and case.age < 16:
        sx = "girl" if case.female else "boy"
    fields = {
        "age": case.age,
        "sx": sx,
        "He": he,
        "His": his,
        "neg": style.negation,
        "complaint": _respell(case.complaint, style, rng),
        "dur": _duration(case.hours, register),
    }
    sentences = []
    for section in style.order:
        items = "" if section == "opening" else _section_items(case, section, style, rng)
        if section != "opening" and not items:
            continue
        template = _template(section, style, rng)
        sentences.append(
            template.format(items=items, Items=items[:1].upper() + items[1:], **fields)
        )
    return " ".join(sentences)


_TRIM_ORDER = ("meds", "history", "negatives", "labs", "symptoms", "investigations", "exam")


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
    sex = "F" if case.female else "M"
    options: list[_Case] = []
    if not case.vitals:
        options.append(replace(case, vitals=_vitals(c, rng)))
    taken = {key for key, _ in case.labs}
    spare = [key for key in _normal_panel(c) if key not in taken]
    if spare:
        key = rng.choice(spare)
        options.append(replace(case, labs=[*case.labs, (key, rng.uniform(*LABS[key].normal))]))
    for name, pool in (("history", INCIDENTAL_HISTORY), ("meds", MEDICATIONS)):
        have = getattr(case, name)
        fresh = [
            i.text
            for i in pool
            if i.text not in have and c.code not in i.excludes and i.sex in (None, sex)
        ]
        if fresh:
            options.append(replace(case, **{name: [*have, rng.choice(fresh)]}))
    return rng.choice(options) if options else None


def write_case(c: Condition, style: HospitalStyle, seed: str) -> str:
    """One free-text note for condition ``c`` written in ``style``; pure in ``seed``.

    Notes are padded up to MIN_WORDS and trimmed down to MAX_WORDS words.
    """
    rng = random.Random(seed)
    case = _draw_case(c, rng)
    text = _render(case, style, seed)
    while len(text.split()) < MIN_WORDS and (longer := _padded(case, c, rng)) is not None:
        case, text = longer, _render(longer, style, seed)
    while len(text.split()) > MAX_WORDS and (shorter := _trimmed(case)) is not None:
        case, text = shorter, _render(shorter, style, seed)
    return text


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


def _records(
    counts: Counter[str],
    style_for: Sequence[HospitalStyle],
    prefix: str,
    start: int,
    rng: random.Random,
) -> list[dict]:
    labels = [code for code in label_names() if counts[code] for _ in range(counts[code])]
    rng.shuffle(labels)
    out = []
    for i, code in enumerate(labels, start=start):
        record_id = f"{prefix}-{i:05d}"
        style = style_for[rng.randrange(len(style_for))]
        text = write_case(BY_CODE[code], style, f"federimed-case:{record_id}:{rng.random()}")
        out.append({"id": record_id, "text": text, "label": code})
    return out


def _hospital(
    index: int, n: int, unseen: tuple[str, ...], config: SynthConfig, np_rng: np.random.Generator
) -> HospitalData:
    seen = [code for code in label_names() if code not in unseen]
    train_counts, validation_counts = _label_counts(n, config, seen, np_rng)
    style = (hospital_style(index, config.seed),)
    rng = random.Random(f"federimed-hospital:{config.seed}:{index}")
    prefix = f"h{index + 1}"
    train = _records(train_counts, style, prefix, 0, rng)
    validation = _records(validation_counts, style, prefix, len(train), rng)
    return HospitalData(style[0].name, train, validation, unseen)


def generate(config: SynthConfig) -> SynthDataset:
    """The whole synthetic consortium; identical configs give identical datasets."""
    np_rng = np.random.default_rng([config.seed, 20240])
    unseen = _choose_unseen(config, np_rng)
    hospitals = [_hospital(i, n, unseen[i], config, np_rng) for i, n in enumerate(_sizes(config))]
    styles = [hospital_style(i, config.seed) for i in range(config.hospitals)] + [NEUTRAL_STYLE]
    test_counts = Counter({code: config.test_cases_per_condition for code in label_names()})
    test_rng = random.Random(f"federimed-test:{config.seed}")
    test = _records(test_counts, styles, "test", 0, test_rng)
    return SynthDataset(hospitals=hospitals, test=test, labels=label_names(), config=config)


# --------------------------------------------------------------------------------------------
# Writing to disk
# --------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, records: Iterable[dict]) -> None:
    lines = (
        json.dumps({k: r[k] for k in ("id", "text", "label")}, ensure_ascii=False) for r in records
    )
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _label_counts_in_order(records: list[dict], labels: dict[str, str]) -> dict[str, int]:
    counts = Counter(r["label"] for r in records)
    return {code: counts[code] for code in labels if counts[code]}


def _manifest(dataset: SynthDataset) -> dict:
    hospitals = [
        {
            "name": h.name,
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
        "test": len(dataset.test),
        "hospitals": hospitals,
    }


def write_dataset(dataset: SynthDataset, out: Path) -> None:
    """Write labels, test set, manifest and one folder per hospital under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = [{"code": code, "name": name} for code, name in dataset.labels.items()]
    (out / "labels.json").write_text(json.dumps(labels, indent=2) + "\n", encoding="utf-8")
    _write_jsonl(out / "test.jsonl", dataset.test)
    for h in dataset.hospitals:
        (out / h.name).mkdir(exist_ok=True)
        _write_jsonl(out / h.name / "train.jsonl", h.train)
        _write_jsonl(out / h.name / "validation.jsonl", h.validation)
    manifest = json.dumps(_manifest(dataset), indent=2)
    (out / "manifest.json").write_text(manifest + "\n", encoding="utf-8")

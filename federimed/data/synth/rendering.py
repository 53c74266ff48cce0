"""Writing one case in a style: wordings, negations, formats, sections, typos."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from functools import cache
from typing import TypeVar

from federimed.data.conditions import (
    LABS,
)
from federimed.data.paraphrase import PARAPHRASES, join_and, segments
from federimed.data.synth.cases import DX_NAMES, NOT_FORMS, NURSING_CARE, _Case
from federimed.data.synth.styles import _NEUTRAL, _STYLES, HospitalHabits, _Style

# Writing one case in a style
# --------------------------------------------------------------------------------------------

_CUES = ("no", "not", "nil", "denies", "denied", "without", "-ve", "neg", "negative")
_CUE_RE = re.compile(r"(?<![\w-])(?:no|not|nil|denies|denied|without|-ve|neg|negative)(?![\w-])")
# Forms a negated hallmark may take after "not" ("not febrile"); others fall back to "no".
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

"""Drawing the clinical content of one case: patient, findings, background, vitals, labs."""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from functools import cache

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
)
from federimed.data.paraphrase import variants
from federimed.data.synth.config import (
    ATYPICAL_SHARE,
    CLASSIC_COMPLAINT_RATE,
    CONTEXT_RATE,
    CONTEXTS,
    ELDERLY_AGE,
    OMIT,
    PREGNANT_AGES,
)

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

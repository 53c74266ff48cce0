"""Unit tests of the condition catalogue and the synthetic, non-IID clinical dataset."""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import pytest

from federimed.data.conditions import (
    ATYPICAL_PRESENTATIONS,
    BY_CODE,
    CONDITIONS,
    FEMALE_ONLY,
    LABS,
    label_names,
)
from federimed.data.synth import (
    CONTEXTS,
    PARAPHRASES,
    STYLES,
    HospitalData,
    Note,
    SynthConfig,
    SynthDataset,
    estimated_tokens,
    free_habits,
    generate,
    hospital_habits,
    hospital_styles,
    style_examples,
    variants,
    write_case,
    write_dataset,
    write_note,
)

EXPECTED = [
    ("I21", "Acute myocardial infarction"),
    ("I48", "Atrial fibrillation"),
    ("I50", "Heart failure"),
    ("I26", "Pulmonary embolism"),
    ("I80", "Deep vein thrombosis"),
    ("I63", "Ischaemic stroke"),
    ("J18", "Pneumonia"),
    ("J45", "Asthma exacerbation"),
    ("J44.1", "COPD exacerbation"),
    ("J93", "Pneumothorax"),
    ("K35", "Acute appendicitis"),
    ("K81", "Acute cholecystitis"),
    ("K85", "Acute pancreatitis"),
    ("A09", "Gastroenteritis"),
    ("N39.0", "Urinary tract infection"),
    ("N20", "Renal colic"),
    ("E10.1", "Diabetic ketoacidosis"),
    ("G43", "Migraine"),
    ("L03", "Cellulitis"),
    ("M10", "Gout"),
    ("I71.0", "Aortic dissection"),
    ("I60", "Subarachnoid haemorrhage"),
    ("G00", "Bacterial meningitis"),
    ("A41", "Sepsis"),
    ("T78.2", "Anaphylaxis"),
    ("O00", "Ectopic pregnancy"),
    ("E27.2", "Adrenal crisis"),
    ("G61.0", "Guillain-Barre syndrome"),
    ("M31.6", "Giant cell arteritis"),
    ("E05.5", "Thyroid storm"),
    ("G70.0", "Myasthenic crisis"),
    ("M72.6", "Necrotising fasciitis"),
]
CODES = [code for code, _ in EXPECTED]
NOTES_PER_CONDITION = 60
NOTES_PER_STYLE = 10  # per condition, in every style


@pytest.fixture(scope="module")
def dataset() -> SynthDataset:
    return generate(SynthConfig())


@pytest.fixture(scope="module")
def canonical_notes() -> dict[str, list[Note]]:
    """Notes in the neutral style with canonical wording, so findings can be parsed back."""
    return {
        c.code: [write_note(c, "neutral", f"test:{c.code}:{i}") for i in range(NOTES_PER_CONDITION)]
        for c in CONDITIONS
    }


@pytest.fixture(scope="module")
def style_notes() -> list[Note]:
    """Many notes of every condition in every style, habits of no particular hospital."""
    return [
        write_note(c, style, f"styles:{c.code}:{style}:{i}")
        for c in CONDITIONS
        for style in STYLES
        for i in range(NOTES_PER_STYLE)
    ]


def _all_records(ds: SynthDataset) -> list[dict]:
    return [r for h in ds.hospitals for r in h.train + h.validation] + ds.test


def _train_counts(h: HospitalData) -> Counter[str]:
    return Counter(r["label"] for r in h.train)


def _values(pattern: str, notes: list[Note]) -> list[float]:
    return [float(m) for note in notes for m in re.findall(pattern, note.text)]


# --- catalogue --------------------------------------------------------------------------------


def test_catalogue_has_the_32_conditions_in_order_with_names() -> None:
    assert [(c.code, c.name) for c in CONDITIONS] == EXPECTED
    assert list(label_names().items()) == EXPECTED


def test_last_twelve_conditions_are_the_rare_ones() -> None:
    assert [c.rare for c in CONDITIONS] == [False] * 20 + [True] * 12


def test_every_condition_has_alternative_findings_and_known_mimics() -> None:
    for c in CONDITIONS:
        assert len(c.complaints) >= 4 and len(c.symptoms) >= 5 and len(c.exam) >= 4, c.code
        assert c.hallmarks and c.mimics and c.code not in c.mimics, c.code
        assert set(c.mimics) <= set(BY_CODE), c.code
        assert {key for key, _, _ in c.labs} <= set(LABS), c.code


def test_atypical_presentations_name_known_contexts() -> None:
    assert set(ATYPICAL_PRESENTATIONS) <= set(BY_CODE)
    for code, presentations in ATYPICAL_PRESENTATIONS.items():
        contexts = [a.context for a in presentations]
        assert set(contexts) <= set(CONTEXTS) and len(contexts) == len(set(contexts)), code
        assert all(a.complaints for a in presentations), code
    assert len(ATYPICAL_PRESENTATIONS) >= 24


# --- determinism and speed --------------------------------------------------------------------


def test_generation_is_deterministic_in_the_config(dataset: SynthDataset) -> None:
    assert generate(SynthConfig()) == dataset
    other = generate(SynthConfig(seed=1))
    assert [r["text"] for r in other.test] != [r["text"] for r in dataset.test]
    assert [h.unseen for h in other.hospitals] != [h.unseen for h in dataset.hospitals]


def test_same_config_writes_identical_files(tmp_path: Path) -> None:
    config = SynthConfig(seed=7, cases_per_hospital=120, test_cases_per_condition=2)
    write_dataset(generate(config), tmp_path / "a")
    write_dataset(generate(config), tmp_path / "b")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.*"))
    assert Path("test-unseen-style.jsonl") in files
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    write_dataset(generate(replace(config, seed=8)), tmp_path / "c")
    a, c = ((tmp_path / x / "test.jsonl").read_text() for x in "ac")
    assert a != c


def test_hospital_habits_are_deterministic_and_hospital_specific() -> None:
    styles = ("ed", "gp")
    assert hospital_habits(0, 0, styles) == hospital_habits(0, 0, styles)
    assert hospital_habits(0, 0, styles) != hospital_habits(1, 0, styles)
    assert hospital_habits(0, 0, styles) != hospital_habits(0, 1, styles)
    assert write_case(BY_CODE["I21"], "ed", "x") == write_case(BY_CODE["I21"], "ed", "x")


# --- coverage and the non-IID split -----------------------------------------------------------


def test_test_set_is_balanced_over_every_condition(dataset: SynthDataset) -> None:
    assert Counter(r["label"] for r in dataset.test) == dict.fromkeys(CODES, 10)
    assert Counter(r["label"] for r in dataset.unseen_style_test) == dict.fromkeys(CODES, 5)
    assert dataset.labels == dict(EXPECTED)


@pytest.mark.parametrize(
    "config",
    [
        SynthConfig(),
        SynthConfig(hospitals=2, seed=3),
        SynthConfig(hospitals=5, seed=4, unseen_per_hospital=12),
        SynthConfig(hospitals=2, seed=5, unseen_per_hospital=16),
    ],
)
def test_every_condition_is_trained_somewhere(config: SynthConfig) -> None:
    ds = generate(config)
    present = set().union(*(_train_counts(h) for h in ds.hospitals))
    assert present == set(CODES)
    assert len(ds.hospitals) == config.hospitals
    assert [h.name for h in ds.hospitals] == [f"hospital-{i + 1}" for i in range(config.hospitals)]


def test_unseen_codes_are_absent_and_seen_codes_have_two_cases(dataset: SynthDataset) -> None:
    for h in dataset.hospitals:
        counts = _train_counts(h)
        assert len(h.unseen) == 6
        assert set(counts) == set(CODES) - set(h.unseen)
        assert min(counts.values()) >= 2
        assert {r["label"] for r in h.validation} <= set(counts)


def test_rare_conditions_are_over_represented_among_unseen() -> None:
    configs = (
        SynthConfig(seed=s, cases_per_hospital=120, test_cases_per_condition=1) for s in range(5)
    )
    unseen = [u for config in configs for h in generate(config).hospitals for u in h.unseen]
    rare_share = sum(BY_CODE[u].rare for u in unseen) / len(unseen)
    assert rare_share > 0.55  # base rate of rare codes in the catalogue is 12/32 = 0.375


def test_single_hospital_sees_every_condition() -> None:
    ds = generate(SynthConfig(hospitals=1, cases_per_hospital=200))
    assert ds.hospitals[0].unseen == ()
    assert set(_train_counts(ds.hospitals[0])) == set(CODES)


def test_hospital_label_distributions_are_skewed(dataset: SynthDataset) -> None:
    shares = []
    for h in dataset.hospitals:
        counts = _train_counts(h)
        shares.append({code: counts[code] / len(h.train) for code in CODES})
    for a, b in itertools.combinations(shares, 2):
        assert 0.5 * sum(abs(a[code] - b[code]) for code in CODES) > 0.35


def test_hospitals_differ_in_size_and_keep_the_validation_fraction(
    dataset: SynthDataset,
) -> None:
    sizes = [len(h.train) + len(h.validation) for h in dataset.hospitals]
    assert max(sizes) >= 1.5 * min(sizes)
    assert 0.8 * 300 * 3 <= sum(sizes) <= 1.2 * 300 * 3
    for h, n in zip(dataset.hospitals, sizes, strict=True):
        assert abs(len(h.validation) / n - 0.15) < 0.01


def test_ids_are_unique_and_well_formed(dataset: SynthDataset) -> None:
    ids = [r["id"] for r in _all_records(dataset) + dataset.unseen_style_test]
    assert len(ids) == len(set(ids))
    for i, h in enumerate(dataset.hospitals, start=1):
        assert all(re.fullmatch(rf"h{i}-\d{{5}}", r["id"]) for r in h.train + h.validation)
    assert all(re.fullmatch(r"test-\d{5}", r["id"]) for r in dataset.test)
    unseen = dataset.unseen_style_test
    assert all(re.fullmatch(r"test-unseen-style-\d{5}", r["id"]) for r in unseen)


# --- styles and the held-out style ------------------------------------------------------------


def test_the_eight_styles() -> None:
    assert STYLES == (
        "ed",
        "triage",
        "nursing",
        "sbar",
        "referral",
        "discharge",
        "gp",
        "telegraphic",
    )


def test_every_style_appears_and_each_hospital_writes_only_its_styles(
    dataset: SynthDataset,
) -> None:
    assert Counter(r["style"] for r in dataset.test) == dict.fromkeys(STYLES, 40)
    for h in dataset.hospitals:
        assert 2 <= len(h.styles) <= 3
        used = Counter(r["style"] for r in h.train + h.validation)
        assert set(used) == set(h.styles), h.name
        assert used.most_common(1)[0][0] == h.styles[0]  # its main style


def test_three_hospitals_use_every_style_but_the_held_out_one(dataset: SynthDataset) -> None:
    used = [s for h in dataset.hospitals for s in h.styles]
    assert sorted(used) == sorted(s for s in STYLES if s != dataset.held_out_style)
    for config in (SynthConfig(hospitals=5, seed=2), SynthConfig(hospitals=4, seed=9)):
        styles = hospital_styles(config)
        assert set().union(*styles) == set(STYLES) - {config.held_out}


def test_held_out_style_is_written_by_no_hospital(dataset: SynthDataset) -> None:
    held_out = dataset.held_out_style
    assert held_out == STYLES[0]  # seed 0
    for h in dataset.hospitals:
        assert held_out not in h.styles
        assert all(r["style"] != held_out for r in h.train + h.validation)
    assert {r["style"] for r in dataset.unseen_style_test} == {held_out}
    assert any(r["style"] == held_out for r in dataset.test)


def test_held_out_style_rotates_with_the_seed_and_can_be_set() -> None:
    assert [SynthConfig(seed=s).held_out for s in range(8)] == list(STYLES)
    config = SynthConfig(seed=3, held_out_style="gp", cases_per_hospital=120)
    ds = generate(config)
    assert ds.held_out_style == "gp"
    assert all("gp" not in h.styles for h in ds.hospitals)
    assert {r["style"] for r in ds.unseen_style_test} == {"gp"}
    with pytest.raises(ValueError, match="held_out_style must be one of ed, triage"):
        SynthConfig(held_out_style="letter")


SIGNATURES = {
    "ed": r"^(PC:|.{1,25}? presents with|.{1,25}?\. PC |.{1,25}? BIBA with)",
    "nursing": r"^(Pt |.{1,25}? admitted via ED)",
    "sbar": r"^(S:|Situation:|Handover:)",
    "referral": r"^(Referral to|I would be grateful|Reason for referral)",
    "discharge": r"^(Discharge summary|Presenting complaint:|This .{1,30} was admitted)",
    "gp": r"^(Dear |Re: )",
    "telegraphic": r"^\d{1,3} ?(yo ?)?[MF]\b",
    "triage": r"^(Triage: )?([MF] \d{1,3}|\d{1,3} ?(yo ?)?[MF])\b",
}


def test_each_style_is_recognisable(style_notes: list[Note]) -> None:
    by_style = defaultdict(list)
    for note in style_notes:
        by_style[note.style].append(note.text)
    for style, pattern in SIGNATURES.items():
        notes = by_style[style]
        share = sum(bool(re.search(pattern, n)) for n in notes) / len(notes)
        assert share > 0.9, (style, share)


def test_notes_fit_the_length_budget(dataset: SynthDataset, style_notes: list[Note]) -> None:
    records = _all_records(dataset) + dataset.unseen_style_test
    lengths = [len(r["text"].split()) for r in records]
    assert min(lengths) >= 9 and max(lengths) <= 110
    assert 35 <= sum(lengths) / len(lengths) <= 75
    assert max(estimated_tokens(r["text"]) for r in records) <= 118 + 4  # typos: a few more
    by_style = defaultdict(list)
    for note in style_notes:
        by_style[note.style].append(len(note.text.split()))
    assert max(by_style["triage"]) <= 40 and min(by_style["triage"]) <= 15
    assert max(by_style["telegraphic"]) <= 75
    for style in ("referral", "discharge", "gp"):
        assert min(by_style[style]) >= 30, style
        assert sum(by_style[style]) / len(by_style[style]) > 2 * (
            sum(by_style["triage"]) / len(by_style["triage"])
        )


def test_shorthand_depends_on_the_style(style_notes: list[Note]) -> None:
    marks = re.compile(
        r"(?<![\w/])(c/o|O/?E|SOB|CP|HTN|T2DM|RIF|RUQ|h/o|N/V|D&V|PMHx|abdo|obs)(?![\w/])|[↑↓→]"
    )
    rate: dict[str, float] = {}
    for style in STYLES:
        notes = [n.text for n in style_notes if n.style == style]
        rate[style] = sum(len(marks.findall(n)) for n in notes) / len(notes)
    assert rate["telegraphic"] > 3 * rate["referral"] + 0.5
    assert rate["triage"] > 3 * rate["discharge"] + 0.5


def test_hospitals_writing_the_same_style_have_their_own_habits() -> None:
    a, b = hospital_habits(0, 0, ("ed",)), hospital_habits(1, 0, ("ed",))
    seeds = [(c, f"habits:{c.code}:{i}") for c in CONDITIONS for i in range(3)]
    same = sum(write_case(c, "ed", seed, a) == write_case(c, "ed", seed, b) for c, seed in seeds)
    assert same / len(seeds) < 0.05
    assert a.wording != b.wording and a.lab_names != b.lab_names


# --- variety ----------------------------------------------------------------------------------

VITALS = {
    "abbr": r"\bHR \d+ BP \d+/\d+",
    "compact": r"\bP\d+ BP\d+/\d+",
    "slash": r"\bobs \d+/\d+/\d+/\d+/\d+%RA/\d",
    "words": r"heart rate \d+, blood pressure \d+/\d+",
    "mixed": r"pulse \d+, BP \d+/\d+",
    "equals": r"\bHR=\d+ BP=\d+/\d+",
    "units": r"\bHR \d+ bpm, BP \d+/\d+ mmHg",
    "tpr": r"\bT \d+(\.\d)?F? P \d+ R \d+ BP",
    "colon": r"\bHR: \d+ \| BP: \d+/\d+",
    "prose": r"pulse of \d+, blood pressure of \d+/\d+",
}
LAB_FORMATS = {
    "flag": r"\b[A-Za-z-]+ \d+(\.\d+)? \S+ \((H|L)\)",
    "equals": r"\b[A-Za-z-]+=\d",
    "arrow": r"\b[A-Za-z-]+: \d+(\.\d+)? [↑↓]",
    "prose": r"\b[A-Za-z-]+ of \d+(\.\d+)? [a-zA-Z]",
    "plain": r"\b(Hb|CRP|WBC|WCC|K|Na|Cr|trop|lactate|sodium|potassium) \d+(\.\d+)?[,.]",
}


def test_vitals_and_labs_come_in_many_formats(dataset: SynthDataset) -> None:
    texts = [r["text"] for r in dataset.test]
    vitals = {name for name, p in VITALS.items() if any(re.search(p, t) for t in texts)}
    assert len(vitals) >= 8, vitals
    labs = {name for name, p in LAB_FORMATS.items() if any(re.search(p, t) for t in texts)}
    assert labs == set(LAB_FORMATS)
    assert any(re.search(r"\d+(\.\d)?F\b", t) for t in texts)  # some hospitals use Fahrenheit


def test_negations_come_in_many_forms(style_notes: list[Note]) -> None:
    texts = " ".join(n.text for n in style_notes)
    forms = {
        "no": r"\b[Nn]o [a-z]",
        "denies": r"\b[Dd]enie[sd] ",
        "nil": r"\b[Nn]il [a-zA-Z]",
        "not": r"\b[Nn]ot (febrile|pyrexial|sweaty|wheezy|jaundiced|vomiting|coughing|rigoring)",
        "without": r"\bwithout [a-z]",
        "-ve": r"\S -ve\b",
        "neg": r"[a-z] neg[,.]",
        "apyrexial": r"\b([Aa]pyrexial|[Aa]febrile)\b",
        "negative for": r"negative for ",
    }
    missing = [name for name, p in forms.items() if not re.search(p, texts)]
    assert not missing


def test_findings_are_paraphrased(style_notes: list[Note]) -> None:
    assert len(PARAPHRASES) >= 150
    phrases = {p for c in CONDITIONS for bank in (c.complaints, c.symptoms, c.exam) for p in bank}
    covered = sum(len(variants(p)) > 1 for p in phrases) / len(phrases)
    assert covered > 0.75
    texts = " ".join(n.text for n in style_notes)
    for wordings in (
        ("shortness of breath", "SOB", "breathlessness", "dyspnoea"),
        ("radiating to", "radiating into", "going to", "→", "spreading to"),
        ("vomiting", "emesis", "being sick", "vom"),
        ("sudden onset", "abrupt-onset", "of sudden onset", "came on suddenly"),
        ("tenderness", "TTP", "soreness"),
        ("abdominal pain", "abdo pain", "tummy pain"),
    ):
        assert all(w in texts for w in wordings), wordings


def test_typos_are_modest_and_deterministic() -> None:
    """Typos change one letter of a long word; without sloppiness the words are the same."""
    changed = words = 0
    for c, style in itertools.product(CONDITIONS, STYLES):
        seed = f"typos:{c.code}:{style}"
        habits = free_habits(seed)
        careful = replace(habits, sloppiness=0.0)
        sloppy_text = write_case(c, style, seed, habits)
        assert sloppy_text == write_case(c, style, seed, habits)
        a = [w.strip(".,").lower() for w in sloppy_text.split()]
        b = [w.strip(".,").lower() for w in write_case(c, style, seed, careful).split()]
        assert len(a) == len(b), (sloppy_text, b)
        for x, y in zip(a, b, strict=True):
            if x != y:
                assert abs(len(x) - len(y)) <= 1 and len(set(x) ^ set(y)) <= 1, (x, y)
                changed += 1
        words += len(a)
    assert 0.001 < changed / words < 0.03


def test_missing_full_stops_are_style_dependent() -> None:
    def dropped(style: str) -> int:
        count = 0
        for c in CONDITIONS:
            seed = f"stops:{c.code}:{style}"
            habits = free_habits(seed)
            careful = write_case(c, style, seed, replace(habits, sloppiness=0.0))
            count += careful.count(".") - write_case(c, style, seed, habits).count(".")
        return count

    assert dropped("telegraphic") > 3 * max(1, dropped("referral"))


# --- negations never contradict the label -----------------------------------------------------

NEGATION_BEFORE = re.compile(
    r"(?<![\w-])(?:no|not|nil|denies|denied|without|negative for|neg for)(?![\w-])"
)
NEGATION_AFTER = re.compile(r"\s(?:-ve|neg|negative)(?![\w-])")
CLAUSE_END = re.compile(r"[.;:!?]| but ")
# Shorthand and paraphrases mapped back to the catalogue's words (kept beside the original).
CANONICAL = {
    "sob": "shortness of breath",
    "soboe": "shortness of breath exertion",
    "cp": "chest pain",
    "n/v": "nausea vomiting",
    "d&v": "diarrhoea vomiting",
    "d+v": "diarrhoea vomiting",
    "pnd": "paroxysmal nocturnal dyspnoea",
    "ha": "headache",
    "h/a": "headache",
    "palps": "palpitations",
    "pvb": "vaginal bleeding",
    "pv": "vaginal",
    "febrile": "fever",
    "pyrexial": "fever",
    "pyrexia": "fever",
    "temperatures": "fever",
    "temp": "fever",
    "sweaty": "sweating",
    "diaphoresis": "sweating",
    "wheezy": "wheeze",
    "wheezing": "wheeze",
    "jaundiced": "jaundice",
    "icterus": "jaundice",
    "tremulous": "tremor",
    "coughing": "cough",
    "rigoring": "rigors",
    "photophobic": "photophobia",
    "thirsty": "thirst",
    "polydipsia": "thirst",
    "diplopia": "double vision",
    "dysphagia": "difficulty swallowing",
    "dysarthria": "slurred speech",
    "meningism": "neck stiffness",
    "etoh": "alcohol excess",
    "l": "left",
    "r": "right",
    "lt": "left",
    "rt": "right",
    "rif": "right iliac fossa",
    "ruq": "right upper quadrant",
    "bullae": "skin blistering",
    "erythema": "skin redness",
    "swollen": "swelling",
    "oedema": "swelling",
    "tender": "tenderness",
    "ttp": "tenderness",
    "→": "radiating",
    "rad": "radiating",
    "amenorrhoea": "missed period",
}
STOPWORDS = {"a", "an", "the", "of", "on", "in", "to", "and", "or", "with", "at", "by"}


def _canonical_words(text: str) -> set[str]:
    words = set(re.findall(r"[a-z0-9/&+→]+", text.lower()))
    for w in list(words):
        words |= set(CANONICAL.get(w, "").split())
    return words - STOPWORDS


def _negated_spans(text: str) -> list[set[str]]:
    lowered = text.lower()
    spans = []
    for m in NEGATION_BEFORE.finditer(lowered):
        end = CLAUSE_END.search(lowered, m.end())
        spans.append(lowered[m.end() : end.start() if end else len(lowered)])
    for clause in re.split(r"[.;:,!?]", lowered):
        spans += [clause[: m.start()] for m in NEGATION_AFTER.finditer(clause)]
    spans += ["fever" for _ in re.finditer(r"\b(apyrexial|afebrile)\b", lowered)]
    return [_canonical_words(s) for s in spans]


def _hallmark_wordings(code: str) -> list[set[str]]:
    wordings = [w for h in BY_CODE[code].hallmarks for w in (h, *variants(h))]
    return [_canonical_words(w) for w in wordings if _canonical_words(w)]


def test_a_condition_hallmark_is_never_negated_in_its_own_notes(
    style_notes: list[Note], dataset: SynthDataset
) -> None:
    notes = [(n.code, n.text) for n in style_notes]
    notes += [(r["label"], r["text"]) for r in _all_records(dataset) + dataset.unseen_style_test]
    negating = 0
    for code, text in notes:
        spans = _negated_spans(text)
        negating += bool(spans)
        for span in spans:
            for hallmark in _hallmark_wordings(code):
                assert not hallmark <= span, (code, sorted(hallmark), text)
    assert negating / len(notes) > 0.4  # pertinent negatives are common


def test_negations_quote_other_conditions_findings(dataset: SynthDataset) -> None:
    records = _all_records(dataset)
    misleading = 0
    for r in records:
        spans = _negated_spans(r["text"])
        others = (
            _canonical_words(h) for c in CONDITIONS if c.code != r["label"] for h in c.hallmarks
        )
        misleading += any(h <= span for h in others for span in spans)
    assert misleading / len(records) > 0.2


def test_no_single_token_gives_the_label_away() -> None:
    """No token is in >95% of one label's notes while in <2% of all other notes."""
    ds = generate(
        SynthConfig(hospitals=1, cases_per_hospital=2400, alpha=100.0, unseen_per_hospital=0)
    )
    records = ds.hospitals[0].train + ds.test
    tokens_by_label: dict[str, list[set[str]]] = defaultdict(list)
    for r in records:
        tokens_by_label[r["label"]].append(set(re.findall(r"[a-z0-9]+", r["text"].lower())))
    doc_freq = {
        label: Counter(t for s in notes for t in s) for label, notes in tokens_by_label.items()
    }
    total = Counter(t for notes in tokens_by_label.values() for s in notes for t in s)
    for label, notes in tokens_by_label.items():
        outside_n = len(records) - len(notes)
        for token, k in doc_freq[label].items():
            inside, outside = k / len(notes), (total[token] - k) / outside_n
            assert not (inside > 0.95 and outside < 0.02), (label, token, inside, outside)


def test_classic_complaint_is_common_but_not_universal(
    canonical_notes: dict[str, list[Note]],
) -> None:
    shares = []
    for c in CONDITIONS:
        classic = f"Presenting complaint: {c.complaints[0]} for"
        notes = canonical_notes[c.code]
        share = sum(classic in note.text for note in notes) / NOTES_PER_CONDITION
        assert share < 0.85, c.code
        shares.append(share)
    assert 0.3 < sum(shares) / len(shares) < 0.6


def test_some_notes_lack_every_classic_finding(canonical_notes: dict[str, list[Note]]) -> None:
    """Atypical cases (~30%) drop the classic item of each bank; typical ones rarely miss all."""
    shares = []
    for c in CONDITIONS:
        classics = [bank[0] for bank in (c.complaints, c.symptoms, c.exam, c.investigations)]
        notes = canonical_notes[c.code]
        shares.append(sum(not any(p in n.text for p in classics) for n in notes) / len(notes))
    assert 0.25 < sum(shares) / len(shares) < 0.5


# --- atypical presentations in their patient context ------------------------------------------

CONTEXT_MARKS = {
    "diabetic": r"diabet|T2DM|NIDDM|metformin|gliclazide|insulin",
    "pregnant": r"pregnan|/40\b|gestation",
    "immunosuppressed": r"transplant|methotrexate|prednisolone|chemotherapy|azathioprine|immuno",
}
AGE = re.compile(
    r"(?<![\d/.])(\d{1,3})(?=-year-old| year old| y/o|yo|\s?[MF]\b)|\b[MF] (\d{1,3})\b"
)


def _age(text: str) -> int:
    match = AGE.search(text)
    assert match, text
    return int(match.group(1) or match.group(2))


def test_about_a_third_of_cases_are_atypical_with_a_visible_context(
    style_notes: list[Note],
) -> None:
    share = sum(n.atypical for n in style_notes) / len(style_notes)
    assert 0.24 < share < 0.36
    for note in style_notes:
        if note.atypical:
            assert note.context in CONTEXTS, note
        if note.context == "elderly":
            assert _age(note.text) >= 75, note.text
        elif note.context:
            assert re.search(CONTEXT_MARKS[note.context], note.text, re.I), note.text
    contexts = Counter(n.context for n in style_notes if n.atypical)
    assert set(contexts) == set(CONTEXTS)
    assert sum(n.context is not None and not n.atypical for n in style_notes) > 0.05 * len(
        style_notes
    )  # contexts also come with typical presentations


def test_atypical_contexts_are_medically_consistent(
    canonical_notes: dict[str, list[Note]],
) -> None:
    afebrile = {
        (code, a.context)
        for code, group in ATYPICAL_PRESENTATIONS.items()
        for a in group
        if a.afebrile
    }
    checked = 0
    for note in itertools.chain.from_iterable(canonical_notes.values()):
        age, sex = _demographics(note.text)
        if note.context == "pregnant":
            assert sex == "female" and 18 <= age <= 42, note.text
            assert "missed period" not in note.text and "beta-hCG negative" not in note.text
            assert note.code != "O00"
        if note.context == "elderly":
            assert age >= 75
        if note.atypical and (note.code, note.context) in afebrile:
            temps = _values(r"temperature (\d+(?:\.\d+)?)C", [note])
            assert all(t <= 37.5 for t in temps), note.text
            checked += bool(temps)
    assert checked >= 20


# --- clinical plausibility --------------------------------------------------------------------


def _demographics(note: str) -> tuple[int, str]:
    match = re.match(r"(\d+)-year-old (male|female)\.", note)
    assert match, note
    return int(match.group(1)), match.group(2)


def test_sex_and_age_constraints(canonical_notes: dict[str, list[Note]]) -> None:
    for note in canonical_notes["O00"]:
        age, sex = _demographics(note.text)
        assert sex == "female" and 16 <= age <= 45
    assert all(_demographics(n.text)[0] > 50 for n in canonical_notes["M31.6"])
    for note in itertools.chain.from_iterable(canonical_notes.values()):
        age, sex = _demographics(note.text)
        if sex == "male":
            assert not any(phrase in note.text for phrase in FEMALE_ONLY), note.text
        if age < 25:
            assert not re.search(r"atorvastatin|cataract|osteoporosis|hysterectomy", note.text)


@pytest.mark.parametrize(
    ("code", "pattern", "low", "high"),
    [
        ("I21", r"troponin (\d+)", 15, 10_000),
        ("K85", r"lipase (\d+)", 61, 10_000),
        ("E10.1", r"glucose (\d+(?:\.\d+)?)", 15, 50),
        ("E10.1", r"pH (\d+(?:\.\d+)?)", 6.8, 7.3),
        ("E27.2", r"sodium (\d+)", 110, 134),
        ("M31.6", r"ESR (\d+)", 50, 150),
        ("G70.0", r"FVC (\d+(?:\.\d+)?)", 0.5, 2.9),
        ("G61.0", r"FVC (\d+(?:\.\d+)?)", 0.5, 2.9),
        ("J93", r"troponin (\d+)", 0, 14),
        ("K35", r"lipase (\d+)", 0, 60),
    ],
)
def test_labs_depend_on_the_condition(
    canonical_notes: dict[str, list[Note]], code: str, pattern: str, low: float, high: float
) -> None:
    values = _values(rf"\b{pattern}", canonical_notes[code])
    assert values, f"{code}: {pattern} never reported"
    assert all(low <= v <= high for v in values), (code, values)


def test_adrenal_crisis_from_steroids_spares_skin_and_potassium(
    canonical_notes: dict[str, list[Note]],
) -> None:
    """Primary adrenal failure raises potassium and pigments the skin; failure from steroids or
    the pituitary does neither (``ATYPICAL_PRESENTATIONS``, ``SECONDARY_PICTURES``)."""
    secondary = 0
    for note in canonical_notes["E27.2"]:
        potassium = _values(r"\bpotassium (\d+(?:\.\d+)?)", [note])
        assert all(3.5 <= v <= 7.5 for v in potassium), note.text
        steroids = re.search(r"prednisolone|steroids|hypopituitarism", note.text)
        if steroids and "Addison" not in note.text:
            secondary += 1
            assert "pigment" not in note.text and all(v <= 5.0 for v in potassium), note.text
        if "Addison" in note.text:
            assert all(v >= 5.1 for v in potassium), note.text
    assert secondary >= 5


def test_vitals_are_plausible(canonical_notes: dict[str, list[Note]]) -> None:
    notes = list(itertools.chain.from_iterable(canonical_notes.values()))
    assert all(30 <= v <= 200 for v in _values(r"heart rate (\d+)", notes))
    assert all(75 <= v <= 100 for v in _values(r"oxygen saturation (\d+)%", notes))
    assert all(34 <= v <= 41.5 for v in _values(r"temperature (\d+(?:\.\d+)?)", notes))
    for systolic, diastolic in re.findall(
        r"blood pressure (\d+)/(\d+)", " ".join(n.text for n in notes)
    ):
        assert 30 <= int(diastolic) < int(systolic) <= 230


def test_positive_pregnancy_test_only_in_ectopic(
    canonical_notes: dict[str, list[Note]],
) -> None:
    for code, notes in canonical_notes.items():
        positive = sum("beta-hCG positive" in n.text or "serum beta-hCG" in n.text for n in notes)
        assert (positive > 0) == (code == "O00"), code


# --- writing to disk --------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_write_dataset_layout_and_format(dataset: SynthDataset, tmp_path: Path) -> None:
    write_dataset(dataset, tmp_path)
    labels = json.loads((tmp_path / "labels.json").read_text(encoding="utf-8"))
    assert labels == [{"code": code, "name": name} for code, name in EXPECTED]
    assert _read_jsonl(tmp_path / "test.jsonl") == dataset.test
    unseen = _read_jsonl(tmp_path / "test-unseen-style.jsonl")
    assert unseen == dataset.unseen_style_test and len(unseen) == 5 * 32
    manifest = json.loads((tmp_path / "manifest.json").read_text(encoding="utf-8"))
    assert (manifest["seed"], manifest["alpha"]) == (0, 0.5)
    assert manifest["held_out_style"] == dataset.held_out_style
    ids = [r["id"] for r in dataset.test + dataset.unseen_style_test]
    for h, entry in zip(dataset.hospitals, manifest["hospitals"], strict=True):
        assert entry["styles"] == list(h.styles)
        for split in ("train", "validation"):
            records = _read_jsonl(tmp_path / h.name / f"{split}.jsonl")
            assert records == getattr(h, split)
            assert all(list(r) == ["id", "text", "label", "style"] for r in records)
            assert entry[split] == len(records)
            ids += [r["id"] for r in records]
        assert entry["train_label_counts"] == dict(_train_counts(h))
        assert entry["unseen"] == list(h.unseen)
    assert len(ids) == len(set(ids))


def test_docs_show_what_the_generator_writes() -> None:
    docs = (Path(__file__).parents[1] / "docs" / "data.md").read_text(encoding="utf-8")
    examples = style_examples()
    assert list(examples) == list(STYLES)
    for style, text in examples.items():
        assert text in docs, f"docs/data.md: the {style} example is not what the generator writes"


# --- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"hospitals": 0}, "hospitals"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": -1.0}, "alpha"),
        ({"cases_per_hospital": 60}, "cases_per_hospital"),
        ({"hospitals": 1, "cases_per_hospital": 70}, "cases_per_hospital"),
        ({"validation_fraction": 1.0}, "validation_fraction"),
        ({"test_cases_per_condition": 0}, "test_cases_per_condition"),
        ({"unseen_per_hospital": 17}, "unseen_per_hospital"),
        ({"unseen_per_hospital": -1}, "unseen_per_hospital"),
        ({"held_out_style": "neutral"}, "held_out_style"),
        ({"unseen_style_cases_per_condition": 0}, "unseen_style_cases_per_condition"),
    ],
)
def test_invalid_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SynthConfig(**kwargs)


def test_smallest_valid_hospitals_still_get_two_cases_per_seen_condition() -> None:
    config = SynthConfig(cases_per_hospital=87, validation_fraction=0.0)
    for h in generate(config).hospitals:
        assert min(_train_counts(h).values()) >= 2


def test_a_misspelt_format_or_section_in_a_style_table_fails_at_once() -> None:
    from dataclasses import replace

    from federimed.data.synth.styles import _STYLES

    with pytest.raises(ValueError, match=r"unknown vitals format.*'abbrev'"):
        replace(_STYLES["ed"], vitals=("abbr", "abbrev"))
    with pytest.raises(ValueError, match=r"unknown section.*'histroy'"):
        replace(_STYLES["ed"], layouts=(("opening", "histroy"),))

"""Unit tests of the condition catalogue and the synthetic, non-IID clinical dataset."""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import pytest

from federimed.data.conditions import BY_CODE, CONDITIONS, FEMALE_ONLY, LABS, label_names
from federimed.data.synth import (
    NEUTRAL_STYLE,
    HospitalData,
    SynthConfig,
    SynthDataset,
    generate,
    hospital_style,
    write_case,
    write_dataset,
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


@pytest.fixture(scope="module")
def dataset() -> SynthDataset:
    return generate(SynthConfig())


@pytest.fixture(scope="module")
def canonical_notes() -> dict[str, list[str]]:
    """Notes in the neutral style with canonical spelling, so findings can be parsed back."""
    style = replace(NEUTRAL_STYLE, consistency=1.0)
    return {
        c.code: [write_case(c, style, f"test:{c.code}:{i}") for i in range(NOTES_PER_CONDITION)]
        for c in CONDITIONS
    }


def _all_records(ds: SynthDataset) -> list[dict]:
    return [r for h in ds.hospitals for r in h.train + h.validation] + ds.test


def _train_counts(h: HospitalData) -> Counter[str]:
    return Counter(r["label"] for r in h.train)


def _values(pattern: str, notes: list[str]) -> list[float]:
    return [float(m) for note in notes for m in re.findall(pattern, note)]


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


# --- determinism and speed --------------------------------------------------------------------


def test_generation_is_deterministic_in_the_config(dataset: SynthDataset) -> None:
    assert generate(SynthConfig()) == dataset
    other = generate(SynthConfig(seed=1))
    assert [r["text"] for r in other.test] != [r["text"] for r in dataset.test]
    assert [h.unseen for h in other.hospitals] != [h.unseen for h in dataset.hospitals]


def test_hospital_style_is_deterministic_and_hospital_specific() -> None:
    assert hospital_style(0, 0) == hospital_style(0, 0)
    assert hospital_style(0, 0) != hospital_style(1, 0)
    assert hospital_style(0, 0) != hospital_style(0, 1)


# --- coverage and the non-IID split -----------------------------------------------------------


def test_test_set_is_balanced_over_every_condition(dataset: SynthDataset) -> None:
    assert Counter(r["label"] for r in dataset.test) == dict.fromkeys(CODES, 10)
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
    ids = [r["id"] for r in _all_records(dataset)]
    assert len(ids) == len(set(ids))
    for i, h in enumerate(dataset.hospitals, start=1):
        assert all(re.fullmatch(rf"h{i}-\d{{5}}", r["id"]) for r in h.train + h.validation)
    assert all(re.fullmatch(r"test-\d{5}", r["id"]) for r in dataset.test)


# --- the text ---------------------------------------------------------------------------------

OPENINGS = {
    "terse": r"^\d+(yo )?[MF]\b",
    "prose": r"year-old (man|woman|boy|girl)",
    "headers": r"^P[Ct]:",
    "neutral": r"^\d+-year-old (male|female)\. Presenting complaint:",
}


def _register_shares(records: list[dict]) -> dict[str, float]:
    return {
        name: sum(bool(re.search(p, r["text"])) for r in records) / len(records)
        for name, p in OPENINGS.items()
    }


def test_each_hospital_writes_in_its_own_register(dataset: SynthDataset) -> None:
    dominant = []
    for h in dataset.hospitals:
        shares = _register_shares(h.train)
        name = max(shares, key=shares.__getitem__)
        assert shares[name] > 0.9
        dominant.append(name)
    assert len(set(dominant)) == 3


def test_test_set_mixes_every_style_and_the_neutral_one(dataset: SynthDataset) -> None:
    assert all(share > 0.1 for share in _register_shares(dataset.test).values())


def test_abbreviation_habits_differ_between_hospitals(dataset: SynthDataset) -> None:
    def abbreviation_rate(h: HospitalData) -> float:
        marks = re.compile(r"\b(c/o|O/?E|hx|SOB|CP|HTN|T2DM|RIF|pt)\b")
        return sum(len(marks.findall(r["text"])) for r in h.train) / len(h.train)

    rates = sorted(abbreviation_rate(h) for h in dataset.hospitals)
    assert rates[-1] > 3 * rates[0] + 0.5


def test_notes_fit_the_length_budget(dataset: SynthDataset) -> None:
    lengths = [len(r["text"].split()) for r in _all_records(dataset)]
    assert min(lengths) >= 40 and max(lengths) <= 110
    assert 45 <= sum(lengths) / len(lengths) <= 80


def test_negations_quote_other_conditions_findings(dataset: SynthDataset) -> None:
    records = _all_records(dataset)
    negation = re.compile(r"\b(?:denies|no|nil)\b([^.]*)", re.IGNORECASE)
    misleading = 0
    for r in records:
        spans = " ".join(negation.findall(r["text"])).lower()
        others = (h for c in CONDITIONS if c.code != r["label"] for h in c.hallmarks)
        misleading += any(h.lower() in spans for h in others)
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
    canonical_notes: dict[str, list[str]],
) -> None:
    shares = []
    for c in CONDITIONS:
        classic = f"Presenting complaint: {c.complaints[0]} for"
        share = sum(classic in note for note in canonical_notes[c.code]) / NOTES_PER_CONDITION
        assert share < 0.85, c.code
        shares.append(share)
    assert 0.35 < sum(shares) / len(shares) < 0.65


def test_some_notes_lack_every_classic_finding(canonical_notes: dict[str, list[str]]) -> None:
    """Atypical cases (~20%) drop the classic item of each bank; typical ones rarely miss all."""
    shares = []
    for c in CONDITIONS:
        classics = [bank[0] for bank in (c.complaints, c.symptoms, c.exam, c.investigations)]
        notes = canonical_notes[c.code]
        shares.append(sum(not any(p in n for p in classics) for n in notes) / len(notes))
    assert 0.2 < sum(shares) / len(shares) < 0.45


# --- clinical plausibility --------------------------------------------------------------------


def _demographics(note: str) -> tuple[int, str]:
    match = re.match(r"(\d+)-year-old (male|female)\.", note)
    assert match, note
    return int(match.group(1)), match.group(2)


def test_sex_and_age_constraints(canonical_notes: dict[str, list[str]]) -> None:
    for note in canonical_notes["O00"]:
        age, sex = _demographics(note)
        assert sex == "female" and 16 <= age <= 45
    assert all(_demographics(n)[0] > 50 for n in canonical_notes["M31.6"])
    for note in itertools.chain.from_iterable(canonical_notes.values()):
        if _demographics(note)[1] == "male":
            assert not any(phrase in note for phrase in FEMALE_ONLY), note


@pytest.mark.parametrize(
    ("code", "pattern", "low", "high"),
    [
        ("I21", r"troponin (\d+)", 15, 10_000),
        ("K85", r"lipase (\d+)", 61, 10_000),
        ("E10.1", r"glucose (\d+(?:\.\d+)?)", 15, 50),
        ("E10.1", r"pH (\d+(?:\.\d+)?)", 6.8, 7.3),
        ("E27.2", r"sodium (\d+)", 110, 134),
        ("E27.2", r"potassium (\d+(?:\.\d+)?)", 5.1, 7.5),
        ("M31.6", r"ESR (\d+)", 50, 150),
        ("G70.0", r"FVC (\d+(?:\.\d+)?)", 0.5, 2.9),
        ("G61.0", r"FVC (\d+(?:\.\d+)?)", 0.5, 2.9),
        ("J93", r"troponin (\d+)", 0, 14),
        ("K35", r"lipase (\d+)", 0, 60),
    ],
)
def test_labs_depend_on_the_condition(
    canonical_notes: dict[str, list[str]], code: str, pattern: str, low: float, high: float
) -> None:
    values = _values(rf"\b{pattern}", canonical_notes[code])
    assert values, f"{code}: {pattern} never reported"
    assert all(low <= v <= high for v in values), (code, values)


def test_vitals_are_plausible(canonical_notes: dict[str, list[str]]) -> None:
    notes = list(itertools.chain.from_iterable(canonical_notes.values()))
    assert all(30 <= v <= 200 for v in _values(r"heart rate (\d+)", notes))
    assert all(75 <= v <= 100 for v in _values(r"oxygen saturation (\d+)%", notes))
    assert all(34 <= v <= 41.5 for v in _values(r"temperature (\d+(?:\.\d+)?)", notes))
    for systolic, diastolic in re.findall(r"blood pressure (\d+)/(\d+)", " ".join(notes)):
        assert 30 <= int(diastolic) < int(systolic) <= 230


def test_positive_pregnancy_test_only_in_ectopic(
    canonical_notes: dict[str, list[str]],
) -> None:
    for code, notes in canonical_notes.items():
        positive = sum("beta-hCG positive" in n or "serum beta-hCG" in n for n in notes)
        assert (positive > 0) == (code == "O00"), code


# --- writing to disk --------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_write_dataset_layout_and_format(dataset: SynthDataset, tmp_path: Path) -> None:
    write_dataset(dataset, tmp_path)
    labels = json.loads((tmp_path / "labels.json").read_text(encoding="utf-8"))
    assert labels == [{"code": code, "name": name} for code, name in EXPECTED]
    assert _read_jsonl(tmp_path / "test.jsonl") == dataset.test
    manifest = json.loads((tmp_path / "manifest.json").read_text(encoding="utf-8"))
    assert (manifest["seed"], manifest["alpha"]) == (0, 0.5)
    ids = [r["id"] for r in dataset.test]
    for h, entry in zip(dataset.hospitals, manifest["hospitals"], strict=True):
        for split in ("train", "validation"):
            records = _read_jsonl(tmp_path / h.name / f"{split}.jsonl")
            assert records == getattr(h, split)
            assert all(list(r) == ["id", "text", "label"] for r in records)
            assert entry[split] == len(records)
            ids += [r["id"] for r in records]
        assert entry["train_label_counts"] == dict(_train_counts(h))
        assert entry["unseen"] == list(h.unseen)
    assert len(ids) == len(set(ids))


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
    ],
)
def test_invalid_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SynthConfig(**kwargs)


def test_smallest_valid_hospitals_still_get_two_cases_per_seen_condition() -> None:
    config = SynthConfig(cases_per_hospital=87, validation_fraction=0.0)
    for h in generate(config).hospitals:
        assert min(_train_counts(h).values()) >= 2

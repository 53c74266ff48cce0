"""Public textbook texts beside each hospital's cases (federimed/data/textbook.py)."""

from __future__ import annotations

from conftest import make_run

from federimed.data.conditions import BY_CODE, label_names
from federimed.data.records import Example
from federimed.data.textbook import ID_PREFIX, textbook_cases
from federimed.tracks.classify.task import training_cases

LABELS = list(label_names())


def test_every_condition_gets_its_texts_the_same_at_every_hospital():
    cases = textbook_cases(LABELS, 4, seed=3)
    assert len(cases) == 4 * len(LABELS)
    assert {c.label for c in cases} == set(LABELS)
    assert cases == textbook_cases(LABELS, 4, seed=3)  # seeded: every hospital draws the same
    assert cases != textbook_cases(LABELS, 4, seed=4)
    assert all(c.id.startswith(ID_PREFIX) for c in cases)
    assert len({c.id for c in cases}) == len(cases)


def test_the_texts_say_what_the_catalogue_says_and_hold_no_empty_part():
    for case in textbook_cases(LABELS, 8):
        condition = BY_CODE[case.label]
        text = case.text
        assert text.strip() and "  " not in text and ", ," not in text, text
        assert not text.rstrip(".").endswith((":", ";", ",", "background")), text
        banks = (condition.complaints, condition.symptoms, condition.hallmarks, condition.risks)
        findings = [f for bank in banks for f in bank] + list(condition.investigations)
        assert any(finding in text for finding in findings), text
    paragraphs = [c for c in textbook_cases(LABELS, 1)]
    assert all(c.text.startswith(BY_CODE[c.label].name + ":") for c in paragraphs)


def test_labels_outside_the_catalogue_get_no_texts():
    assert textbook_cases(["X99", "I21"], 2) == textbook_cases(["I21"], 2)


def test_a_hospital_trains_on_its_cases_and_the_runs_textbook_texts():
    own = [Example("case-1", "chest pain, sweating", "I21")]
    assert training_cases(make_run(textbook_cases=0), own) == own
    run = make_run(textbook_cases=2)
    cases = training_cases(run, own)
    assert cases[:1] == own and len(cases) == 1 + 2 * len(run.label_list)

"""Synthetic flashcards for the generative track, drawn from the same consortium as the cases.

Each hospital's cards come only from what it has seen: its own cases as "case -> most likely
diagnosis" cards, and knowledge cards (key investigation, risk factors, hallmark, the condition
it is confused with) for each condition it has cases of.  A condition a hospital never saw gives
it no card, so the encoder track's non-IID split (sizes, label skew, unseen conditions) carries
over unchanged.  The common test set: diagnosis cards from the test cases, and a knowledge card
about every condition.  The format is MedAlpaca's flashcards (``input``, ``output``,
``instruction``) plus ``kind`` and ``code`` for scoring.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from federimed.data.conditions import BY_CODE, Condition
from federimed.data.records import (
    DIAGNOSIS_KIND,
    FLASHCARDS_TRAIN,
    FLASHCARDS_VALIDATION,
    INSTRUCTION,
    TEST_FLASHCARDS,
    Flashcard,
)
from federimed.data.textbook import textbook_cases

if TYPE_CHECKING:  # the synthetic generator stays out of the hospitals' app bundle
    from federimed.data.synth import SynthDataset

DIAGNOSIS_QUESTION = "What is the most likely diagnosis for this patient?\n\n{case}"
# kind -> (question, answer drawn from the catalogue)
KNOWLEDGE: dict[str, tuple[str, Callable[[Condition], str]]] = {
    "investigation": (
        "What is the key investigation finding in {name}?",
        lambda c: c.investigations[0],
    ),
    "risk-factors": (
        "What are the main risk factors for {name}?",
        lambda c: ", ".join(c.risks[:3]),
    ),
    "hallmark": (
        "What is the hallmark clinical feature of {name}?",
        lambda c: c.hallmarks[0],
    ),
    "mimic": (
        "Which condition is {name} most often confused with?",
        lambda c: BY_CODE[c.mimics[0]].name,
    ),
}
# The test set asks for the same facts in words no training card uses: a model that only
# learnt a question's wording by heart does not score.
TEST_WORDING: dict[str, str] = {
    "investigation": "In a patient with {name}, which investigation result is most telling?",
    "risk-factors": "Who is most at risk of developing {name}?",
    "hallmark": "Which clinical feature is most typical of {name}?",
    "mimic": "What is {name} most commonly mistaken for?",
}


@dataclass(frozen=True)
class HospitalCards:
    name: str
    train: list[Flashcard]
    validation: list[Flashcard]
    unseen: tuple[str, ...]


@dataclass(frozen=True)
class FlashcardDataset:
    hospitals: list[HospitalCards]
    test: list[Flashcard]


def diagnosis_card(case: dict) -> Flashcard:
    code = case["label"]
    question = DIAGNOSIS_QUESTION.format(case=case["text"])
    return Flashcard(question, BY_CODE[code].name, INSTRUCTION, DIAGNOSIS_KIND, code)


def knowledge_cards(codes: Iterable[str], held_out: bool = False) -> list[Flashcard]:
    """What is known of each condition, one card per kind; ``held_out``: in the test set's
    wording."""
    cards = []
    for code in codes:
        condition = BY_CODE[code]
        for kind, (question, answer) in KNOWLEDGE.items():
            if reply := answer(condition):  # a bank the catalogue leaves empty: no card
                text = (TEST_WORDING[kind] if held_out else question).format(name=condition.name)
                cards.append(Flashcard(text, reply, INSTRUCTION, kind, code))
    return cards


def public_cards(labels: Iterable[str], per_condition: int, seed: int = 0) -> list[Flashcard]:
    """What any hospital may train on beside its own cards (run config ``textbook-cases``; none
    at 0): ``per_condition`` textbook texts per condition as case -> diagnosis cards, and the
    catalogue's knowledge cards about every condition, the ones it never saw included.  A
    text that names its condition loses the name: the card asks for it."""
    if per_condition == 0:
        return []
    codes = [code for code in labels if code in BY_CODE]
    texts = textbook_cases(codes, per_condition, seed)
    diagnoses = [
        diagnosis_card(
            {"label": t.label, "text": t.text.removeprefix(f"{BY_CODE[t.label].name}: ")}
        )
        for t in texts
    ]
    return diagnoses + knowledge_cards(codes)


def from_cases(dataset: SynthDataset, test_cases_per_condition: int = 1) -> FlashcardDataset:
    """The flashcards of ``dataset``'s hospitals and a test set: at most
    ``test_cases_per_condition`` diagnosis cards per condition and one knowledge card per
    condition, its kind taken in turn (generating answers is what scoring costs: 64 cards
    take SmolLM2 about 30 s on two cores)."""
    hospitals = []
    for h in dataset.hospitals:
        seen = [code for code in dataset.labels if code not in h.unseen]
        train = [diagnosis_card(case) for case in h.train] + knowledge_cards(seen)
        validation = [diagnosis_card(case) for case in h.validation]
        hospitals.append(HospitalCards(h.name, train, validation, h.unseen))
    taken: dict[str, int] = {}
    test = []
    for case in dataset.test:
        if taken.get(case["label"], 0) < test_cases_per_condition:
            taken[case["label"]] = taken.get(case["label"], 0) + 1
            test.append(diagnosis_card(case))
    kinds = list(KNOWLEDGE)
    for i, code in enumerate(dataset.labels):
        cards = knowledge_cards([code], held_out=True)
        test.append(next((c for c in cards if c.kind == kinds[i % len(kinds)]), cards[0]))
    return FlashcardDataset(hospitals, test)


def _card_line(card: Flashcard) -> str:
    line = {"input": card.question, "output": card.answer, "instruction": card.instruction}
    line |= {"kind": card.kind, "code": card.code}
    return json.dumps(line, ensure_ascii=False) + "\n"


def _write(path: Path, cards: Iterable[Flashcard]) -> None:
    path.write_text("".join(_card_line(card) for card in cards), encoding="utf-8")


def write_flashcards(cards: FlashcardDataset, out: Path) -> None:
    """Each hospital's ``flashcards.jsonl`` (and ``flashcards-validation.jsonl``) in its own
    folder, beside its cases when there are any; the test cards in ``test-flashcards.jsonl``."""
    out = Path(out)
    for h in cards.hospitals:
        (out / h.name).mkdir(parents=True, exist_ok=True)
        _write(out / h.name / FLASHCARDS_TRAIN, h.train)
        _write(out / h.name / FLASHCARDS_VALIDATION, h.validation)
    _write(out / TEST_FLASHCARDS, cards.test)
    manifest = {
        "test": len(cards.test),
        "hospitals": [
            {"name": h.name, "train": len(h.train), "validation": len(h.validation),
             "unseen": list(h.unseen)}
            for h in cards.hospitals
        ],
    }  # fmt: skip
    (out / "manifest-flashcards.json").write_text(json.dumps(manifest, indent=2) + "\n")

"""Public knowledge, not patient data: what a textbook says about each condition, as texts a
hospital may train on beside its own cases (run config ``textbook-cases``).

A hospital has no case of a condition it never saw, so on its own it can never name it; the
federation teaches it only what the others' updates carry.  What any textbook says about every
condition (its complaints, findings, investigations, risk factors, hallmarks, the atypical
pictures it warns about, the mimics it is told from) is no patient's record: every hospital, and
the server, may use it.  The texts are drawn from the condition catalogue the way a student
writes revision notes, in four forms (a paragraph naming the condition, a terse line, an
atypical presentation, hallmarks against the mimics' hallmarks), seeded, so every hospital
draws the same ones.  They hold no number about any patient: privacy accounting counts the
hospital's own cases only (more texts only lower the real sampling rate of each case).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

from federimed.data.conditions import ATYPICAL_PRESENTATIONS, BY_CODE, LABS, Condition
from federimed.data.records import Example

ID_PREFIX = "textbook-"


def textbook_cases(labels: Sequence[str], per_condition: int, seed: int = 0) -> list[Example]:
    """``per_condition`` texts for each label the catalogue knows (other labels get none)."""
    rng = random.Random(f"textbook-{seed}")
    return [
        Example(f"{ID_PREFIX}{code}-{k}", _text(BY_CODE[code], k, rng), code)
        for code in labels
        if code in BY_CODE
        for k in range(per_condition)
    ]


def _text(c: Condition, k: int, rng: random.Random) -> str:
    form = k % 4
    if form == 2 and c.code in ATYPICAL_PRESENTATIONS:
        return _atypical(c, rng)
    if form == 0:
        return _paragraph(c, rng)
    if form == 1:
        return _terse(c, rng)
    return _hallmarks(c, rng)


T = TypeVar("T")


def _pick(rng: random.Random, bank: Sequence[T], low: int, high: int) -> list[T]:
    return rng.sample(list(bank), min(len(bank), rng.randint(low, high)))


def _join(items: Sequence[str]) -> str:
    return ", ".join(items)


def _lab(c: Condition, rng: random.Random) -> list[str]:
    """One of the condition's abnormal results, with a value in its range."""
    if not c.labs:
        return []
    key, low, high = rng.choice(c.labs)
    lab = LABS[key]
    value = round(rng.uniform(low, high), lab.decimals)
    return [f"{lab.names[0]} {value:g} {lab.unit}"]


def _paragraph(c: Condition, rng: random.Random) -> str:
    return (
        f"{c.name}: presents with {_join(_pick(rng, c.complaints, 1, 2))}; "
        f"{_join(_pick(rng, c.symptoms, 2, 4))}. On examination "
        f"{_join(_pick(rng, c.exam, 1, 3))}. "
        f"{_join(_pick(rng, c.investigations, 1, 2) + _lab(c, rng))}."
        + (f" Risk factors: {_join(_pick(rng, c.risks, 1, 3))}." if c.risks else "")
    )


def _terse(c: Condition, rng: random.Random) -> str:
    parts = [rng.choice(c.complaints), *_pick(rng, c.symptoms, 1, 3), *_pick(rng, c.exam, 0, 1)]
    return "; ".join(parts + _pick(rng, c.investigations, 0, 1) + _lab(c, rng))


def _atypical(c: Condition, rng: random.Random) -> str:
    picture = rng.choice(ATYPICAL_PRESENTATIONS[c.code])
    visible = [s for s in c.symptoms if not any(word in s for word in picture.hide)]
    findings = _pick(rng, visible, 1, 2) + _pick(rng, c.investigations, 1, 2) + _lab(c, rng)
    background = _pick(rng, picture.history or c.risks, 1, 2)
    text = f"{picture.context} patient with {rng.choice(picture.complaints)}; {_join(findings)}"
    return f"{text}; background {_join(background)}" if background else text


def _hallmarks(c: Condition, rng: random.Random) -> str:
    mimics = [BY_CODE[m] for m in c.mimics if m in BY_CODE]
    unlike = [rng.choice(m.hallmarks) for m in _pick(rng, mimics, 1, 2) if m.hallmarks]
    own = [h for h in c.hallmarks if h not in unlike]
    negatives = [f"no {h}" for h in unlike if h not in c.hallmarks]
    parts = _pick(rng, own, 1, 3) + _pick(rng, c.risks, 1, 2) + negatives
    return _join(parts + _pick(rng, c.investigations, 1, 1))

"""Length control and the finished note: trimmed or padded to fit the model's window, checked
never to deny its own condition."""

from __future__ import annotations

import random
import re
from dataclasses import replace
from functools import cache

from federimed.data.conditions import (
    BY_CODE,
    INCIDENTAL_HISTORY,
    LABS,
    MEDICATIONS,
    Condition,
)
from federimed.data.synth.cases import (
    _Case,
    _consistent,
    _draw_case,
    _no_duplicates,
    _normal_panel,
    _Pick,
    _spells_own_hallmark,
    _visible,
    _vitals,
    _words,
)
from federimed.data.synth.config import MAX_TOKENS, MAX_WORDS, Note
from federimed.data.synth.rendering import _finish, _render
from federimed.data.synth.styles import (
    _NEUTRAL,
    _STYLES,
    NEUTRAL_HABITS,
    HospitalHabits,
    _Style,
    free_habits,
)

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

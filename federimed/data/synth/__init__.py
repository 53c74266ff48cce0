"""Deterministic synthetic clinical notes in eight writing styles, and the non-IID split.

Real notes cannot leave a hospital, so development and tests run on cases generated from the
catalogue in :mod:`federimed.data.conditions`.  A model that learns the generator's templates
instead of the medicine does well on our own test set and badly on notes clinicians write, so the
generator is built for variety where real notes vary and for consistency where medicine is fixed:

* eight writing styles (:data:`STYLES`): ED clerking, triage line, nursing note, SBAR handover,
  referral, discharge summary, GP letter and telegraphic shorthand, each with its own
  vocabulary, abbreviations, section orders and length (a triage line is one line);
* every finding is paraphrased at the phrase level (:data:`PARAPHRASES`: formal, shorthand and
  lay wordings, word-order changes), negations come in several forms (no, denies, nil, not,
  without, -ve), vitals and labs in several formats, with typos and missing punctuation at a
  modest per-style rate;
* a third of the cases present atypically, tied to a patient context visible in the note
  (elderly, diabetic, pregnant, immunosuppressed; see ``ATYPICAL_PRESENTATIONS``), and chronic
  findings of the patient's background conditions act as distractors;
* every hospital writes in two or three styles with its own habits, and one style
  (``held_out_style``) is written by no hospital: ``test-unseen-style.jsonl`` measures how well
  a model trained on the other styles reads it.

Nothing ever contradicts the label: a condition's hallmarks are never negated in its own notes,
negatives never deny what the note reports, and contexts only appear where age and sex allow.
Everything is a pure function of :class:`SynthConfig`: each random stream is seeded from the
config's seed and a fixed name, never from global random state.

One module per job: ``config`` (what to make), ``styles`` (how each style and hospital writes),
``cases`` (a case's clinical content), ``rendering`` (a case in a style), ``length`` (a note
that fits the model's window, checked against its own condition) and ``split`` (the non-IID
split and the files written).
"""

from federimed.data.paraphrase import PARAPHRASES, variants
from federimed.data.synth.config import (
    CONTEXTS,
    STYLES,
    HospitalData,
    Note,
    SynthConfig,
    SynthDataset,
)
from federimed.data.synth.length import estimated_tokens, style_examples, write_case, write_note
from federimed.data.synth.split import generate, write_dataset
from federimed.data.synth.styles import free_habits, hospital_habits, hospital_styles

__all__ = [
    "CONTEXTS",
    "PARAPHRASES",
    "STYLES",
    "HospitalData",
    "Note",
    "SynthConfig",
    "SynthDataset",
    "estimated_tokens",
    "free_habits",
    "generate",
    "hospital_habits",
    "hospital_styles",
    "style_examples",
    "variants",
    "write_case",
    "write_dataset",
    "write_note",
]

"""The non-IID split: hospital sizes, label skew, unseen conditions, and the files written."""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from federimed.data.conditions import (
    BY_CODE,
    CONDITIONS,
    label_names,
)
from federimed.data.synth.config import (
    MIN_TRAIN_PER_SEEN,
    RARE_UNSEEN_WEIGHT,
    STYLES,
    HospitalData,
    SynthConfig,
    SynthDataset,
    _sizes,
    _split_sizes,
)
from federimed.data.synth.length import write_case
from federimed.data.synth.styles import HospitalHabits, hospital_habits, hospital_styles

# The non-IID split
# --------------------------------------------------------------------------------------------


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


def _style_weights(styles: Sequence[str]) -> list[float]:
    """The first style is the hospital's main one: half its notes (three styles) or 60%."""
    if len(styles) == 1:
        return [1.0]
    main = 0.5 if len(styles) > 2 else 0.6
    return [main] + [(1 - main) / (len(styles) - 1)] * (len(styles) - 1)


def _records(
    counts: Counter[str], habits: HospitalHabits, prefix: str, start: int, rng: random.Random
) -> list[dict]:
    labels = [code for code in label_names() if counts[code] for _ in range(counts[code])]
    rng.shuffle(labels)
    weights = _style_weights(habits.styles)
    out = []
    for i, code in enumerate(labels, start=start):
        record_id = f"{prefix}-{i:05d}"
        style = rng.choices(habits.styles, weights)[0]
        seed = f"federimed-case:{record_id}:{rng.random()}"
        text = write_case(BY_CODE[code], style, seed, habits)
        out.append({"id": record_id, "text": text, "label": code, "style": style})
    return out


def _hospital(
    index: int,
    n: int,
    unseen: tuple[str, ...],
    styles: tuple[str, ...],
    config: SynthConfig,
    np_rng: np.random.Generator,
) -> HospitalData:
    seen = [code for code in label_names() if code not in unseen]
    train_counts, validation_counts = _label_counts(n, config, seen, np_rng)
    habits = hospital_habits(index, config.seed, styles)
    rng = random.Random(f"federimed-hospital:{config.seed}:{index}")
    prefix = f"h{index + 1}"
    train = _records(train_counts, habits, prefix, 0, rng)
    validation = _records(validation_counts, habits, prefix, len(train), rng)
    return HospitalData(habits.name, train, validation, unseen, styles)


def _test_records(
    per_condition: int, styles: Sequence[str], prefix: str, rng: random.Random
) -> list[dict]:
    """A balanced set written with habits of no hospital; styles in turn within a condition."""
    jobs = [
        (code, styles[(k + j) % len(styles)])
        for k, code in enumerate(label_names())
        for j in range(per_condition)
    ]
    rng.shuffle(jobs)
    out = []
    for i, (code, style) in enumerate(jobs):
        record_id = f"{prefix}-{i:05d}"
        seed = f"federimed-case:{record_id}:{rng.random()}"
        text = write_case(BY_CODE[code], style, seed)
        out.append({"id": record_id, "text": text, "label": code, "style": style})
    return out


def generate(config: SynthConfig) -> SynthDataset:
    """The whole synthetic consortium; identical configs give identical datasets."""
    np_rng = np.random.default_rng([config.seed, 20240])
    unseen = _choose_unseen(config, np_rng)
    styles = hospital_styles(config)
    hospitals = [
        _hospital(i, n, unseen[i], styles[i], config, np_rng) for i, n in enumerate(_sizes(config))
    ]
    test_rng = random.Random(f"federimed-test:{config.seed}")
    test = _test_records(config.test_cases_per_condition, STYLES, "test", test_rng)
    unseen_rng = random.Random(f"federimed-unseen-style:{config.seed}")
    unseen_style = _test_records(
        config.unseen_style_cases_per_condition,
        (config.held_out,),
        "test-unseen-style",
        unseen_rng,
    )
    return SynthDataset(
        hospitals=hospitals,
        test=test,
        labels=label_names(),
        config=config,
        held_out_style=config.held_out,
        unseen_style_test=unseen_style,
    )


RECORD_KEYS = ("id", "text", "label", "style")


def _write_jsonl(path: Path, records: Iterable[dict]) -> None:
    lines = (
        json.dumps({k: r[k] for k in RECORD_KEYS if k in r}, ensure_ascii=False) for r in records
    )
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _label_counts_in_order(records: list[dict], labels: dict[str, str]) -> dict[str, int]:
    counts = Counter(r["label"] for r in records)
    return {code: counts[code] for code in labels if counts[code]}


def _manifest(dataset: SynthDataset) -> dict:
    hospitals = [
        {
            "name": h.name,
            "styles": list(h.styles),
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
        "held_out_style": dataset.held_out_style,
        "test": len(dataset.test),
        "test_unseen_style": len(dataset.unseen_style_test),
        "hospitals": hospitals,
    }


def write_dataset(dataset: SynthDataset, out: Path) -> None:
    """Write labels, both test sets, manifest and one folder per hospital under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = [{"code": code, "name": name} for code, name in dataset.labels.items()]
    (out / "labels.json").write_text(json.dumps(labels, indent=2) + "\n", encoding="utf-8")
    _write_jsonl(out / "test.jsonl", dataset.test)
    _write_jsonl(out / "test-unseen-style.jsonl", dataset.unseen_style_test)
    for h in dataset.hospitals:
        (out / h.name).mkdir(exist_ok=True)
        _write_jsonl(out / h.name / "train.jsonl", h.train)
        _write_jsonl(out / h.name / "validation.jsonl", h.validation)
    manifest = json.dumps(_manifest(dataset), indent=2)
    (out / "manifest.json").write_text(manifest + "\n", encoding="utf-8")

"""Reading a hospital's data volume: JSONL, CSV or Parquet, checked row by row.

Training never drops a row silently: a file either loads whole or fails with every problem
listed as ``file:line: what is wrong``, which is also what ``federimed data validate`` prints.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUFFIXES = (".jsonl", ".csv", ".parquet")
SPLITS = ("train", "validation", "test")
MAX_PROBLEMS_SHOWN = 50


@dataclass(frozen=True)
class Example:
    id: str
    text: str
    label: str


@dataclass(frozen=True)
class Columns:
    """Which columns hold what: a hospital's export keeps its own names."""

    text: str = "text"
    label: str = "label"
    id: str = "id"


@dataclass(frozen=True)
class Problem:
    file: Path
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else str(self.file)
        return f"{where}: {self.message}"


class DataError(ValueError):
    """Bad input data; ``str()`` lists each problem with its file and line."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        shown = [str(p) for p in problems[:MAX_PROBLEMS_SHOWN]]
        more = len(problems) - len(shown)
        if more > 0:
            shown.append(f"... and {more} more problem(s)")
        super().__init__("\n".join(shown))


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, parsed value, parse error); blank lines are reported, not skipped."""
    with path.open(encoding="utf-8") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                yield number, None, "empty line"
                continue
            try:
                yield number, json.loads(raw.rstrip("\r\n")), None
            except json.JSONDecodeError as error:
                yield number, None, f"invalid JSON: {error.msg} (column {error.colno})"


def _table_rows(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """CSV and Parquet through `datasets`; CSV line = row + 2 (after the header)."""
    from datasets import Dataset

    loader = Dataset.from_csv if path.suffix == ".csv" else Dataset.from_parquet
    try:
        table = loader(str(path), keep_in_memory=True)
    except Exception as error:
        raise DataError([Problem(path, None, f"cannot read {path.suffix} file: {error}")]) from None
    offset = 2 if path.suffix == ".csv" else 1
    for index, row in enumerate(table):
        yield index + offset, row, None


def read_rows(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    if path.suffix not in SUFFIXES:
        raise DataError([Problem(path, None, f"unsupported format; use one of {SUFFIXES}")])
    if not path.is_file():
        raise DataError([Problem(path, None, "file not found")])
    return _jsonl_rows(path) if path.suffix == ".jsonl" else _table_rows(path)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _check_row(
    path: Path, line: int, row: Any, columns: Columns, labels: set[str] | None
) -> tuple[Example | None, list[Problem]]:
    if not isinstance(row, dict):
        return None, [Problem(path, line, "expected a JSON object")]
    problems = []
    for field in (columns.text, columns.label):
        if _missing(row.get(field)):
            problems.append(Problem(path, line, f"missing field '{field}'"))
    text, label = row.get(columns.text), row.get(columns.label)
    if not _missing(text) and (not isinstance(text, str) or not text.strip()):
        problems.append(Problem(path, line, f"field '{columns.text}' is empty or not text"))
    if not _missing(label):
        label = str(label).strip()
        if labels is not None and label not in labels:
            problems.append(Problem(path, line, f"unknown label '{label}'"))
    if problems:
        return None, problems
    raw_id = row.get(columns.id)
    example_id = f"{path.stem}-{line}" if _missing(raw_id) else str(raw_id)
    return Example(id=example_id, text=text.strip(), label=label), []


def load_examples(
    path: Path, labels: Iterable[str] | None = None, columns: Columns = Columns()
) -> list[Example]:
    """Every row of ``path`` as an Example, or a DataError naming each bad row."""
    examples, problems = check_file(path, labels, columns)
    if problems:
        raise DataError(problems)
    return examples


def check_file(
    path: Path, labels: Iterable[str] | None = None, columns: Columns = Columns()
) -> tuple[list[Example], list[Problem]]:
    path = Path(path)
    known = set(labels) if labels is not None else None
    examples: list[Example] = []
    problems: list[Problem] = []
    first_line: dict[str, int] = {}
    try:
        rows = list(read_rows(path))
    except DataError as error:
        return [], error.problems
    except UnicodeDecodeError:
        return [], [Problem(path, None, "not UTF-8 text")]
    for line, row, parse_error in rows:
        if parse_error:
            problems.append(Problem(path, line, parse_error))
            continue
        example, row_problems = _check_row(path, line, row, columns, known)
        problems.extend(row_problems)
        if example is None:
            continue
        if example.id in first_line:
            problems.append(
                Problem(
                    path,
                    line,
                    f"duplicate id '{example.id}' (first on line {first_line[example.id]})",
                )
            )
            continue
        first_line[example.id] = line
        examples.append(example)
    if not rows:
        problems.append(Problem(path, None, "no rows"))
    return examples, problems


def find_split(folder: Path, split: str) -> Path | None:
    for suffix in SUFFIXES:
        candidate = folder / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    return None


@dataclass(frozen=True)
class HospitalSplits:
    train: list[Example]
    validation: list[Example]


def load_hospital(
    folder: Path, labels: Iterable[str] | None = None, columns: Columns = Columns()
) -> HospitalSplits:
    """A hospital's data volume: ``train`` is required, ``validation`` optional."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError([Problem(folder, None, "data folder not found")])
    train_file = find_split(folder, "train")
    if train_file is None:
        names = ", ".join(f"train{s}" for s in SUFFIXES)
        raise DataError([Problem(folder, None, f"no training file (expected one of {names})")])
    validation_file = find_split(folder, "validation")
    labels = list(labels) if labels is not None else None
    train = load_examples(train_file, labels, columns)
    validation = load_examples(validation_file, labels, columns) if validation_file else []
    overlap = {e.id for e in train} & {e.id for e in validation}
    if overlap:
        sample = ", ".join(sorted(overlap)[:5])
        raise DataError([Problem(validation_file, None, f"ids also in {train_file}: {sample}")])
    return HospitalSplits(train=train, validation=validation)


def read_label_file(path: Path) -> dict[str, str]:
    """labels.json: a list of {"code", "name"} objects (or plain codes)."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise DataError([Problem(Path(path), None, f"cannot read label list: {error}")]) from None
    if not isinstance(raw, list) or not raw:
        raise DataError([Problem(Path(path), None, "label list must be a non-empty JSON list")])
    labels = {}
    for position, item in enumerate(raw, start=1):
        code = item.get("code") if isinstance(item, dict) else item
        if not isinstance(code, str) or not code.strip():
            raise DataError([Problem(Path(path), None, f"entry {position}: missing 'code'")])
        labels[code] = item.get("name", code) if isinstance(item, dict) else code
    return labels


def default_labels() -> dict[str, str]:
    """The 32 conditions of the built-in synthetic data set, code -> name."""
    from federimed.data.conditions import label_names

    return label_names()


def labels_from_config(value: str) -> list[str]:
    """Run-config ``labels``: comma-separated codes, or "" for the built-in conditions."""
    codes = [code.strip() for code in value.split(",") if code.strip()]
    return codes or list(default_labels())


@dataclass(frozen=True)
class Flashcard:
    """A MedAlpaca flashcard: a question and its answer (the generative track's unit)."""

    question: str
    answer: str
    instruction: str = ""


def load_flashcards(path: Path) -> list[Flashcard]:
    """MedAlpaca flashcards: a JSON list or JSONL of {"input", "output"[, "instruction"]}."""
    path = Path(path)
    if path.suffix == ".jsonl":
        rows = list(_jsonl_rows(path))
    else:
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise DataError([Problem(path, None, f"cannot read flashcards: {error}")]) from None
        if not isinstance(entries, list):
            raise DataError([Problem(path, None, "expected a JSON list of flashcards")])
        rows = [(index, entry, None) for index, entry in enumerate(entries, start=1)]
    cards, problems = [], []
    for where, row, parse_error in rows:
        if parse_error:
            problems.append(Problem(path, where, parse_error))
            continue
        if not isinstance(row, dict):
            problems.append(Problem(path, where, "expected a JSON object"))
            continue
        empty = [f for f in ("input", "output") if not str(row.get(f) or "").strip()]
        if empty:
            problems.extend(Problem(path, where, f"missing or empty '{f}'") for f in empty)
            continue
        cards.append(
            Flashcard(
                row["input"].strip(),
                row["output"].strip(),
                str(row.get("instruction") or "").strip(),
            )
        )
    if problems:
        raise DataError(problems)
    return cards

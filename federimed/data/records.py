"""Reading a hospital's data volume: JSONL, CSV or Parquet, checked row by row.

Training never drops a row silently: a file either loads whole or fails with every problem
listed as ``file:line: what is wrong``, which is also what ``federimed data validate`` prints.

JSONL is read the way the JSON Lines format defines it, and defensively, since an export can
be anything: UTF-8 (a byte-order mark at the start is accepted), lines ending in ``\n`` or
``\r\n``, strict JSON (no ``NaN``/``Infinity``), at most :data:`MAX_LINE_BYTES` per line.
Each line is read and decoded on its own, so a bad byte is reported with its line number, the
lines after it are still checked, and an unbounded file is never read into memory at once.
An empty file is an error ("no rows"), as is a blank line.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NoReturn

from federimed.tracks import track_for

SUFFIXES = (".jsonl", ".csv", ".parquet")
SPLITS = ("train", "validation", "test")
MAX_PROBLEMS_SHOWN = 50
MAX_LINE_BYTES = 1024 * 1024
"""The longest JSONL line accepted (1 MiB, without its line ending).  A clinical note is a few
KiB; a longer line is a broken export (a lost newline, a binary file renamed .jsonl).  The
limit is also what bounds memory: a line is read at most this many bytes at a time, and the
rest of a longer one is skipped in small chunks, never held."""
MAX_DOCUMENT_BYTES = 256 * 1024 * 1024
"""The largest file parsed as one JSON document (flashcards as a JSON list, ``labels.json``):
256 MiB, over ten times MedAlpaca's flashcards.  Larger data belongs in JSONL."""
_SKIP_CHUNK = 64 * 1024
_BOM = b"\xef\xbb\xbf"
_QUOTED_MAX = 60  # characters of a bad value quoted back in a message


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


def _lines(handle: IO[bytes]) -> Iterator[tuple[int, bytes | None]]:
    """(line number, the line without its ending), or None for a line over MAX_LINE_BYTES.

    Lines end at ``\n`` (JSON Lines), so ``\r\n`` works and a stray ``\r`` stays in its line."""
    number = 0
    while chunk := handle.readline(MAX_LINE_BYTES + 2):
        number += 1
        if not chunk.endswith(b"\n") and len(chunk) == MAX_LINE_BYTES + 2:
            while chunk and not chunk.endswith(b"\n"):  # skip the rest, without keeping it
                chunk = handle.readline(_SKIP_CHUNK)
            yield number, None
            continue
        line = chunk.removesuffix(b"\n").removesuffix(b"\r")
        yield number, None if len(line) > MAX_LINE_BYTES else line


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON (write null, or a number)")


def _parse_json_line(raw: bytes) -> tuple[Any, str | None]:
    """(value, problem) for one line's bytes."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        byte = raw[error.start]
        return None, f"not UTF-8 text (byte 0x{byte:02x} at byte {error.start + 1} of the line)"
    if not text.strip():
        return None, "empty line"
    try:
        return json.loads(text, parse_constant=_no_constant), None
    except json.JSONDecodeError as error:
        return None, f"invalid JSON: {error.msg} (column {error.colno})"
    except RecursionError:
        return None, "invalid JSON: nested too deeply"
    except ValueError as error:  # NaN/Infinity, or an integer over Python's digit limit
        return None, f"invalid JSON: {str(error).split(';')[0]}"


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, parsed value, problem); blank lines are reported, not skipped."""
    try:
        handle = path.open("rb")
    except OSError as error:
        raise DataError([Problem(path, None, f"cannot read: {error.strerror or error}")]) from None
    with handle:
        if handle.peek(len(_BOM)).startswith(_BOM):  # a byte-order mark: not part of line 1
            handle.read(len(_BOM))
        for number, raw in _lines(handle):
            if raw is None:
                yield number, None, f"line longer than {MAX_LINE_BYTES} bytes (the limit per line)"
                continue
            yield number, *_parse_json_line(raw)


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


def _kind(value: Any) -> str:
    """A JSON value's type in the words a person editing the file would use."""
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return "text" if isinstance(value, str) else type(value).__name__


def _quote(value: str) -> str:
    """A bad value quoted back safely: escaped (no line breaks to forge a message), and short."""
    if len(value) > _QUOTED_MAX:
        return repr(value[:_QUOTED_MAX]) + f"... ({len(value)} characters)"
    return repr(value)


def _text_problem(field: str, value: Any) -> str | None:
    """Why ``value`` is not usable text for ``field``, or None."""
    if not isinstance(value, str):
        return f"field '{field}' is empty or not text (got {_kind(value)})"
    if not value.strip():
        return f"field '{field}' is empty or not text"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a JSON escape such as \ud800: no tokenizer can take it
        return f"field '{field}' is not valid Unicode (an unpaired surrogate escape)"
    return None


def _check_row(
    path: Path, line: int, row: Any, columns: Columns, labels: set[str] | None, typed: bool
) -> tuple[Example | None, list[Problem]]:
    """One row as an Example, or every problem it has.  ``typed`` (JSONL): the label and id
    must already be text (an id may be a whole number); a CSV or Parquet column's type is the
    reader's guess, so there a number is taken as its text, as before."""
    if not isinstance(row, dict):
        return None, [Problem(path, line, f"expected a JSON object, got {_kind(row)}")]
    found: list[str] = []
    fields: dict[str, Any] = row
    text: Any = fields.get(columns.text)
    label: Any = fields.get(columns.label)
    raw_id: Any = fields.get(columns.id)
    for field, value in ((columns.text, text), (columns.label, label)):
        if _missing(value):
            found.append(f"missing field '{field}'")
    if not _missing(text) and (problem := _text_problem(columns.text, text)):
        found.append(problem)
    if not _missing(label):
        if typed or isinstance(label, bool | list | dict):
            problem = _text_problem(columns.label, label)
        else:
            label = str(label)
            problem = None if label.strip() else f"field '{columns.label}' is empty"
        if problem:
            found.append(problem)
        elif labels is not None and label.strip() not in labels:
            where = "" if columns.label == "label" else f" (field '{columns.label}')"
            found.append(f"unknown label {_quote(label.strip())}{where}")
    example_id = f"{path.stem}-{line}" if _missing(raw_id) else str(raw_id)
    whole_number = isinstance(raw_id, int) and not isinstance(raw_id, bool)
    if not (_missing(raw_id) or whole_number) and (typed or not isinstance(raw_id, str | float)):
        if not isinstance(raw_id, str):
            kind = _kind(raw_id)
            found.append(f"field '{columns.id}' must be text or a whole number, not {kind}")
        elif problem := _text_problem(columns.id, raw_id):
            found.append(problem)
    if found:
        return None, [Problem(path, line, message) for message in found]
    return Example(id=example_id, text=text.strip(), label=label.strip()), []


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
    """(the valid rows, every problem); never raises for bad content, so ``data validate``
    lists all of a file's problems at once."""
    path = Path(path)
    known = set(labels) if labels is not None else None
    typed = path.suffix == ".jsonl"
    examples: list[Example] = []
    problems: list[Problem] = []
    first_line: dict[str, int] = {}
    lines = 0
    try:
        for line, row, parse_error in read_rows(path):
            lines += 1
            if parse_error:
                problems.append(Problem(path, line, parse_error))
                continue
            example, row_problems = _check_row(path, line, row, columns, known, typed)
            problems.extend(row_problems)
            if example is None:
                continue
            if example.id in first_line:
                first = first_line[example.id]
                message = f"duplicate id {_quote(example.id)} (first on line {first})"
                problems.append(Problem(path, line, message))
                continue
            first_line[example.id] = line
            examples.append(example)
    except DataError as error:
        return examples, problems + error.problems
    except OSError as error:  # the disk, not the data: stop, naming the file
        problems.append(Problem(path, None, f"cannot read: {error.strerror or error}"))
        return examples, problems
    if not lines:
        problems.append(Problem(path, None, "no rows (the file is empty)"))
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
    if overlap and validation_file is not None:
        sample = ", ".join(_quote(example_id) for example_id in sorted(overlap)[:5])
        raise DataError([Problem(validation_file, None, f"ids also in {train_file}: {sample}")])
    return HospitalSplits(train=train, validation=validation)


def _read_document(path: Path, what: str) -> tuple[Any, str]:
    """(the parsed document, its text) for a whole-file JSON document of at most
    MAX_DOCUMENT_BYTES; errors name the file and, where there is one, the line."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_DOCUMENT_BYTES + 1)
    except OSError as error:
        message = f"cannot read {what}: {error.strerror or error}"
        raise DataError([Problem(path, None, message)]) from None
    if len(data) > MAX_DOCUMENT_BYTES:
        message = f"{what}: larger than {MAX_DOCUMENT_BYTES} bytes (the limit for one JSON file)"
        raise DataError([Problem(path, None, message + "; write it as JSONL")]) from None
    data = data.removeprefix(_BOM)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        message = f"{what}: not UTF-8 text (byte 0x{data[error.start]:02x})"
        raise DataError([Problem(path, line, message)]) from None
    try:
        return json.loads(text, parse_constant=_no_constant), text
    except json.JSONDecodeError as error:
        message = f"{what}: invalid JSON: {error.msg} (column {error.colno})"
        raise DataError([Problem(path, error.lineno, message)]) from None
    except RecursionError:
        raise DataError([Problem(path, None, f"{what}: JSON nested too deeply")]) from None
    except ValueError as error:
        message = f"{what}: invalid JSON: {str(error).split(';')[0]}"
        raise DataError([Problem(path, None, message)]) from None


def read_label_file(path: Path) -> dict[str, str]:
    """labels.json: a list of {"code", "name"} objects (or plain codes)."""
    raw, _ = _read_document(Path(path), "label list")
    if not isinstance(raw, list) or not raw:
        raise DataError([Problem(Path(path), None, "label list must be a non-empty JSON list")])
    labels = {}
    for position, item in enumerate(raw, start=1):
        code = item.get("code") if isinstance(item, dict) else item
        if not isinstance(code, str) or not code.strip():
            raise DataError([Problem(Path(path), None, f"entry {position}: missing 'code'")])
        name = item.get("name", code) if isinstance(item, dict) else code
        labels[code] = name if isinstance(name, str) else code
    return labels


def default_labels() -> dict[str, str]:
    """The 32 conditions of the built-in synthetic data set, code -> name."""
    from federimed.data.conditions import label_names

    return label_names()


def labels_from_config(value: str) -> list[str]:
    """Run-config ``labels``: comma-separated codes, or "" for the built-in conditions."""
    codes = [code.strip() for code in value.split(",") if code.strip()]
    return codes or list(default_labels())


# A flashcard's ``kind`` for case -> diagnosis cards, scored by exact match (the others: token-F1).
DIAGNOSIS_KIND = "diagnosis"
# MedAlpaca's flashcards carry this instruction; FederiMed's synthetic cards and `ask` use it too.
INSTRUCTION = "Answer this question truthfully"


@dataclass(frozen=True)
class Flashcard:
    """A MedAlpaca flashcard: a question and its answer (the generative track's unit)."""

    question: str
    answer: str
    instruction: str = ""
    # Optional, for scoring: "diagnosis" (case -> diagnosis, scored by exact match) or any other
    # kind (free text, token-F1); ``code`` the condition it is about (unseen-condition scores).
    kind: str = ""
    code: str = ""


_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def _after_space(text: str, index: int = 0) -> int:
    """Where the JSON whitespace from ``index`` on ends (the pattern matches nothing too)."""
    found = _JSON_SPACE.match(text, index)
    return found.end() if found else index


def _list_entries(text: str) -> Iterator[tuple[int, Any]]:
    """(line it starts on, entry) for each entry of ``text``, known to be a valid JSON list:
    problems in a pretty-printed list are named by line like JSONL ones."""
    decoder = json.JSONDecoder()
    index = _after_space(text) + 1  # past "["
    line, counted = 1, 0
    while True:
        start = _after_space(text, index)
        if text[start] == "]":
            return
        line += text.count("\n", counted, start)
        counted = start
        entry, end = decoder.raw_decode(text, start)
        yield line, entry
        index = _after_space(text, end)
        if text[index] == ",":
            index += 1


def _flashcard_rows(path: Path) -> Iterator[tuple[int | None, Any, str | None]]:
    """(line, entry, problem) from JSONL or from one JSON list."""
    if path.suffix == ".jsonl":
        yield from _jsonl_rows(path)
        return
    entries, text = _read_document(path, "flashcards")
    if not isinstance(entries, list):
        message = f"expected a JSON list of flashcards, got {_kind(entries)}"
        raise DataError([Problem(path, None, message)])
    for line, entry in _list_entries(text):
        yield line, entry, None


def load_flashcards(path: Path) -> list[Flashcard]:
    """MedAlpaca flashcards: a JSON list or JSONL of {"input", "output"[, "instruction"]}
    (and FederiMed's optional "kind" and "code", for scoring).  Every card loads, or a
    DataError names each bad one's line and field."""
    path = Path(path)
    cards: list[Flashcard] = []
    problems: list[Problem] = []
    rows = 0
    try:
        for where, row, parse_error in _flashcard_rows(path):
            rows += 1
            if parse_error:
                problems.append(Problem(path, where, parse_error))
                continue
            if not isinstance(row, dict):
                problems.append(Problem(path, where, f"expected a JSON object, got {_kind(row)}"))
                continue
            found = []
            for field in ("input", "output"):
                value = row.get(field)
                if isinstance(value, str) and value.strip():
                    problem = _text_problem(field, value)  # text, but not valid Unicode?
                else:
                    got = "" if value is None or isinstance(value, str) else _kind(value)
                    problem = f"missing or empty '{field}'" + (f" (got {got})" if got else "")
                if problem:
                    found.append(problem)
            optional = {}
            for field in ("instruction", "kind", "code"):
                value = row.get(field)
                if value is None:
                    value = ""
                elif not isinstance(value, str):
                    found.append(f"field '{field}' is not text (got {_kind(value)})")
                elif value.strip() and (problem := _text_problem(field, value)):
                    found.append(problem)
                optional[field] = value.strip() if isinstance(value, str) else ""
            if found:
                problems.extend(Problem(path, where, message) for message in found)
                continue
            question, answer = row["input"].strip(), row["output"].strip()
            cards.append(Flashcard(question, answer, **optional))
    except OSError as error:
        problems.append(Problem(path, None, f"cannot read: {error.strerror or error}"))
    if not rows and not problems:
        problems.append(Problem(path, None, "no flashcards in the file"))
    if problems:
        raise DataError(problems)
    return cards


# A hospital's flashcards for the generative track, beside its cases in the same folder; the
# common test cards beside the common test cases.
FLASHCARDS_TRAIN = "flashcards.jsonl"
FLASHCARDS_VALIDATION = "flashcards-validation.jsonl"
TEST_FLASHCARDS = "test-flashcards.jsonl"
UNSEEN_STYLE_TEST = "test-unseen-style.jsonl"  # the common test set's notes in a style no
# hospital writes (see docs/data.md)


FLASHCARD_STEMS = ("flashcards", "flashcards-validation", "test-flashcards")


def _cards_file(folder: Path, jsonl_name: str) -> Path | None:
    """``flashcards.jsonl``, or MedAlpaca's own JSON list saved as ``flashcards.json``."""
    for path in (folder / jsonl_name, (folder / jsonl_name).with_suffix(".json")):
        if path.is_file():
            return path
    return None


def load_hospital_cards(folder: Path) -> tuple[list[Flashcard], list[Flashcard]]:
    """(train, validation) flashcards of a hospital's data volume; validation is optional."""
    folder = Path(folder)
    train = _cards_file(folder, FLASHCARDS_TRAIN)
    if train is None:
        message = f"no {FLASHCARDS_TRAIN} or flashcards.json (the generative track)"
        raise DataError([Problem(folder, None, message)])
    validation = _cards_file(folder, FLASHCARDS_VALIDATION)
    return load_flashcards(train), load_flashcards(validation) if validation else []


@dataclass(frozen=True)
class Federation:
    """The data a comparison is about: each hospital's folder and the common test set."""

    hospitals: dict[str, Path]
    test_path: Path

    @staticmethod
    def hospital_folders(root: Path) -> list[Path]:
        folders = sorted(p for p in Path(root).glob("hospital-*") if p.is_dir())
        if not folders:
            raise FileNotFoundError(f"{root}: no hospital-* folders")
        return folders

    @classmethod
    def from_folder(cls, root: Path, track: str = "classify") -> Federation:
        """A `federimed data synth` layout: root/hospital-*/ and the common test set,
        root/test.jsonl (or, for the generative track, root/test-flashcards.jsonl)."""
        folders = cls.hospital_folders(root)
        test_path = Path(root) / track_for(track).test_file
        if not test_path.is_file():
            raise FileNotFoundError(f"{test_path}: the common test set is missing")
        return cls({p.name: p for p in folders}, test_path)

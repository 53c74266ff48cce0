"""Hostile input: whatever bytes a hospital's export holds and whatever numbers a deployment
sets, loading ends in a correct load or a clear error naming the file, the line and the field.
Never a traceback, never a silently dropped row.

Property-based (hypothesis) over the JSONL loaders and ``data validate``'s checker, the
flashcard loader, the run config, the component settings and the site policy, with a few
worked examples for the cases a property states less plainly (the 1 MiB line limit, a BOM,
CRLF, an empty file, a non-UTF-8 byte).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from federimed.cli import _settings_problems, main
from federimed.config import resolve
from federimed.data import records
from federimed.data.records import (
    MAX_LINE_BYTES,
    DataError,
    Example,
    Flashcard,
    check_file,
    load_examples,
    load_flashcards,
    load_hospital,
)
from federimed.hospital.policy import (
    POLICY_ENV,
    PolicyError,
    SitePolicy,
    load_policy,
    policy_from_env,
)
from federimed.runconfig import RunConfig, RunConfigError, field_key

LABELS = ["I21", "J18", "K35"]
FAST = settings(max_examples=80, deadline=None)
QUICK = settings(max_examples=40, deadline=None)
SMALL_LIMIT = 1000  # MAX_LINE_BYTES while a property runs, so long lines turn up in it


@contextmanager
def scratch() -> Iterator[Path]:
    """A fresh folder per hypothesis example (pytest's tmp_path is one per test)."""
    with tempfile.TemporaryDirectory() as folder:
        yield Path(folder)


def _bytes_lines(data: bytes) -> int:
    """How many lines the JSON Lines format sees in ``data`` (a final newline ends a line)."""
    data = data.removeprefix(b"\xef\xbb\xbf")
    if not data:
        return 0
    return data.count(b"\n") + (not data.endswith(b"\n"))


# --- JSONL rows: a model of what a hostile export can hold -------------------------------------

JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=False, allow_infinity=False),
)
NOT_TEXT = st.one_of(
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(JSON_SCALARS, max_size=3),
    st.dictionaries(st.text(max_size=5), JSON_SCALARS, max_size=3),
)
TEXT = st.text(min_size=1, max_size=40).filter(str.strip)
BLANK = st.text(alphabet=" \t\u00a0\u2003", max_size=4)
LABEL = st.sampled_from(LABELS).flatmap(lambda code: st.sampled_from([code, f" {code} "]))
UNKNOWN_LABEL = TEXT.filter(lambda t: t.strip() not in LABELS)


def _dumps(row: Any, ascii_only: bool) -> bytes:
    return json.dumps(row, ensure_ascii=ascii_only).encode("utf-8")


@st.composite
def valid_line(draw: st.DrawFn, line: int, stem: str) -> tuple[bytes, Example]:
    """A row that must load, and the Example it must load as."""
    text, label = draw(TEXT), draw(LABEL)
    row: dict[str, Any] = {"text": text, "label": label}
    id_style = draw(st.sampled_from(["text", "number", "none", "absent"]))
    expected_id = {
        "text": f"case-{line}",
        "number": str(100_000 + line),
        "none": f"{stem}-{line}",
        "absent": f"{stem}-{line}",
    }[id_style]
    if id_style != "absent":
        row["id"] = {"text": f"case-{line}", "number": 100_000 + line, "none": None}[id_style]
    if draw(st.booleans()):
        row["note"] = draw(JSON_SCALARS)  # extra fields are allowed and ignored
    keys = draw(st.permutations(list(row)))
    raw = _dumps({key: row[key] for key in keys}, draw(st.booleans()))
    return raw, Example(id=expected_id, text=text.strip(), label=label.strip())


@st.composite
def bad_line(draw: st.DrawFn) -> tuple[bytes, str]:
    """A line that must be refused, and a word its problem must contain (a field's name,
    quoted as the message quotes it, or what is wrong)."""
    kind = draw(
        st.sampled_from(
            [
                "text type",
                "text blank",
                "text missing",
                "label type",
                "label blank",
                "label unknown",
                "label missing",
                "id type",
                "id blank",
                "surrogate",
                "not an object",
                "nan",
                "not utf-8",
                "too long",
                "garbage",
            ]
        )
    )
    row: dict[str, Any] = {"text": draw(TEXT), "label": draw(LABEL)}
    expect = {"text": "'text'", "label": "'label'", "id": "'id'"}.get(kind.split()[0], "")
    if kind == "text type":
        row["text"] = draw(NOT_TEXT)
    elif kind == "text blank":
        row["text"] = draw(BLANK)
    elif kind == "text missing":
        del row["text"]
    elif kind == "label type":
        row["label"] = draw(NOT_TEXT)
    elif kind == "label blank":
        row["label"] = draw(BLANK)
    elif kind == "label unknown":
        row["label"] = draw(UNKNOWN_LABEL)
        expect = "unknown label"
    elif kind == "label missing":
        del row["label"]
    elif kind == "id type":
        row["id"] = draw(NOT_TEXT.filter(lambda v: isinstance(v, bool) or not isinstance(v, int)))
    elif kind == "id blank":
        row["id"] = draw(BLANK)
    elif kind == "surrogate":
        field = draw(st.sampled_from(["text", "label"]))
        raw = json.dumps({**row, field: "x"}).replace('"x"', '"a\\ud800b"').encode()
        return raw, f"'{field}'"
    elif kind == "not an object":
        return _dumps(draw(st.one_of(JSON_SCALARS, st.lists(JSON_SCALARS))), True), "object"
    elif kind == "nan":
        field = draw(st.sampled_from(["text", "label", "id"]))
        constant = draw(st.sampled_from(["NaN", "Infinity", "-Infinity"]))
        return json.dumps({**row, field: "x"}).replace('"x"', constant).encode(), "not JSON"
    elif kind == "not utf-8":
        raw = _dumps(row, draw(st.booleans()))
        at = draw(st.integers(0, len(raw)))
        bad = draw(st.sampled_from([b"\xff", b"\xc3(", b"\xe9", b"\xed\xa0\x80", b"\x80"]))
        return raw[:at] + bad + raw[at:], "UTF-8"
    elif kind == "too long":
        row["text"] = "x" * (SMALL_LIMIT + draw(st.integers(1, 2 * SMALL_LIMIT)))
        return _dumps(row, True), f"longer than {SMALL_LIMIT} bytes"
    elif kind == "garbage":
        junk = draw(st.binary(max_size=60).filter(lambda b: b"\n" not in b and b"label" not in b))
        return junk, ""
    return _dumps(row, draw(st.booleans())), expect


@st.composite
def jsonl_file(draw: st.DrawFn, stem: str) -> tuple[bytes, list[Example], dict[int, str]]:
    """(file bytes, the Examples it must load as, {bad line: word in its problem})."""
    good_or_bad = draw(st.lists(st.booleans(), max_size=12))
    lines, examples, bad = [], [], {}
    for number, good in enumerate(good_or_bad, start=1):
        if good:
            raw, example = draw(valid_line(number, stem))
            examples.append(example)
        else:
            raw, bad[number] = draw(bad_line())
        lines.append(raw)
    endings = [draw(st.sampled_from([b"\n", b"\r\n"])) for _ in lines]
    data = b"".join(line + end for line, end in zip(lines, endings, strict=True))
    if lines and lines[-1] and draw(st.booleans()):
        data = data.removesuffix(endings[-1])  # no newline after the last (non-empty) line
    if draw(st.booleans()):
        data = b"\xef\xbb\xbf" + data  # a byte-order mark, as Windows tools write
    return data, examples, bad


def _problems_name_file_and_line(path: Path, problems: list[records.Problem]) -> None:
    for problem in problems:
        assert problem.file == path
        where = f"{path}:{problem.line}: " if problem.line is not None else f"{path}: "
        assert str(problem).startswith(where)
        assert "\n" not in str(problem)  # one problem, one line: nothing can forge another


@FAST
@given(data=st.data(), split=st.sampled_from(["train", "validation", "test"]))
def test_every_jsonl_row_loads_or_is_named_with_file_line_and_field(data, split):
    content, expected, bad = data.draw(jsonl_file(split))
    with scratch() as folder, mock.patch.object(records, "MAX_LINE_BYTES", SMALL_LIMIT):
        path = folder / f"{split}.jsonl"
        path.write_bytes(content)
        examples, problems = check_file(path, LABELS)
        assert examples == expected  # every valid row, in order: none dropped
        _problems_name_file_and_line(path, problems)
        if not bad and not expected:
            assert [str(p) for p in problems] == [f"{path}: no rows (the file is empty)"]
            return
        assert {p.line for p in problems} == set(bad)  # each bad line, and only those
        for line, word in bad.items():
            assert any(word in p.message for p in problems if p.line == line), (line, problems)
        if bad:
            with pytest.raises(DataError) as error:
                load_examples(path, LABELS)
            assert str(error.value).startswith(str(problems[0]))
        else:
            assert load_examples(path, LABELS) == expected


@FAST
@given(
    train=st.binary(max_size=400),
    validation=st.none() | st.binary(max_size=200),
    labels=st.none() | st.just(LABELS),
)
def test_any_bytes_load_whole_or_fail_naming_the_file(train, validation, labels):
    with scratch() as folder, mock.patch.object(records, "MAX_LINE_BYTES", SMALL_LIMIT):
        files = {"train": folder / "train.jsonl", "validation": folder / "validation.jsonl"}
        files["train"].write_bytes(train)
        if validation is not None:
            files["validation"].write_bytes(validation)
        for split, content in (("train", train), ("validation", validation)):
            if content is None:
                continue
            examples, problems = check_file(files[split], labels)
            _problems_name_file_and_line(files[split], problems)
            with_problem = {p.line for p in problems if p.line is not None}
            # every line is either an example or a problem: nothing silently dropped
            assert len(examples) + len(with_problem) == _bytes_lines(content)
            for example in examples:
                example.text.encode("utf-8")  # usable by a tokenizer, printable in a log
                assert example.text.strip() and example.label.strip()
        try:
            loaded = load_hospital(folder, labels)
        except DataError as error:
            assert error.problems
            for problem in error.problems:
                assert problem.file in files.values()
            for line in str(error).splitlines():
                assert line.startswith(tuple(map(str, files.values()))) or line.startswith("...")
        else:
            assert len(loaded.train) == _bytes_lines(train)


def test_a_bom_and_crlf_load_like_plain_utf8(tmp_path):
    rows = [
        {"id": "a", "text": "douleur thoracique", "label": "I21"},
        {"text": "toux", "label": "J18"},
    ]
    plain = b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows)
    windows = b"\xef\xbb\xbf" + plain.replace(b"\n", b"\r\n")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "train.jsonl").write_bytes(plain)
    (tmp_path / "b" / "train.jsonl").write_bytes(windows)
    assert load_examples(tmp_path / "a" / "train.jsonl", LABELS) == load_examples(
        tmp_path / "b" / "train.jsonl", LABELS
    )
    assert [e.id for e in load_hospital(tmp_path / "b", LABELS).train] == ["a", "train-2"]


def test_a_bad_byte_is_named_by_line_and_the_other_lines_still_checked(tmp_path):
    path = tmp_path / "train.jsonl"
    good = json.dumps({"text": "chest pain", "label": "I21"}).encode()
    path.write_bytes(good + b"\n" + good.replace(b"chest", b"ch\xe9st") + b"\n" + b'{"text": 1}\n')
    examples, problems = check_file(path, LABELS)
    assert [e.id for e in examples] == ["train-1"]
    assert [str(p) for p in problems] == [
        f"{path}:2: not UTF-8 text (byte 0xe9 at byte 13 of the line)",
        f"{path}:3: missing field 'label'",
        f"{path}:3: field 'text' is empty or not text (got a number)",
    ]


def test_a_utf16_file_is_refused_at_line_one(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "pain", "label": "I21"}\n', encoding="utf-16")
    with pytest.raises(DataError, match=r"train\.jsonl:1: not UTF-8 text"):
        load_examples(path, LABELS)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "no rows (the file is empty)"),
        (b"\xef\xbb\xbf", "no rows (the file is empty)"),
        (b"\n", "1: empty line"),
        (b"\r\n", "1: empty line"),
    ],
)
def test_an_empty_file_is_an_error_not_an_empty_hospital(tmp_path, content, message):
    path = tmp_path / "validation.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError) as error:
        load_examples(path, LABELS)
    assert str(error.value) in (f"{path}: {message}", f"{path}:{message}")


def test_wrong_json_types_name_the_line_and_the_field(tmp_path):
    path = tmp_path / "test.jsonl"
    rows = [
        {"text": ["a", "list"], "label": "I21"},
        {"text": "pain", "label": 21},
        {"text": "pain", "label": "I21", "id": {"nested": 1}},
        ["text", "label"],
        {"text": "pain", "label": "Z99\nfake.jsonl:1: forged"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [str(p) for p in check_file(path, LABELS)[1]] == [
        f"{path}:1: field 'text' is empty or not text (got a list)",
        f"{path}:2: field 'label' is empty or not text (got a number)",
        f"{path}:3: field 'id' must be text or a whole number, not an object",
        f"{path}:4: expected a JSON object, got a list",
        f"{path}:5: unknown label 'Z99\\nfake.jsonl:1: forged'",
    ]


def test_a_line_over_the_limit_is_refused_naming_the_limit(tmp_path):
    assert MAX_LINE_BYTES == 1024 * 1024
    path = tmp_path / "train.jsonl"
    row = {"text": "pain", "label": "I21"}
    fits = json.dumps({**row, "text": "x"}).encode()
    fits = fits.replace(b'"x"', b'"' + b"x" * (MAX_LINE_BYTES - len(fits) + 1) + b'"')
    assert len(fits) == MAX_LINE_BYTES
    over = fits.replace(b'"x', b'"xx', 1)
    path.write_bytes(fits + b"\r\n" + over + b"\n" + json.dumps(row).encode())
    examples, problems = check_file(path, LABELS)
    assert [e.id for e in examples] == ["train-1", "train-3"]
    assert [str(p) for p in problems] == [
        f"{path}:2: line longer than 1048576 bytes (the limit per line)"
    ]


def test_a_huge_line_is_not_read_into_memory(tmp_path):
    """A 32 MiB line (a binary file, a lost newline) costs about the limit, not its size."""
    path = tmp_path / "train.jsonl"
    with path.open("wb") as handle:
        handle.write(b'{"text": "')
        for _ in range(32):
            handle.write(b"x" * (1024 * 1024))
        handle.write(b'", "label": "I21"}\n{"text": "pain", "label": "I21"}\n')
    tracemalloc.start()
    try:
        examples, problems = check_file(path, LABELS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [e.id for e in examples] == ["train-2"]
    assert [p.line for p in problems] == [1] and "limit" in problems[0].message
    assert peak < 4 * MAX_LINE_BYTES


def test_a_csv_that_is_not_utf8_is_named_not_a_traceback(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes("text,label\ndouleur thoracique,I21\nfi\xe8vre,J18\n".encode("latin-1"))
    examples, problems = check_file(path, LABELS)
    assert not examples and len(problems) == 1 and str(problems[0]).startswith(f"{path}: ")


def test_data_validate_prints_lines_and_exits_1_on_hostile_bytes(tmp_path, capsys):
    folder = tmp_path / "hospital-1"
    folder.mkdir()
    path = folder / "train.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a", "label": "I21"}\r\n\xff\xfe\x00garbage\n[1]\n')
    assert main(["data", "validate", str(folder), "--run-config", 'labels="I21"']) == 1
    captured = capsys.readouterr()
    assert f"{path}:2: not UTF-8 text" in captured.err
    assert f"{path}:3: expected a JSON object, got a list" in captured.err
    assert f"{path}: 1 valid rows, 2 problem(s)" in captured.out


# --- flashcards (the generative track) ---------------------------------------------------------


@st.composite
def flashcard(draw: st.DrawFn) -> tuple[Any, Flashcard | None, str]:
    """(entry, the card it must load as or None, a word its problem must contain)."""
    card: dict[str, Any] = {"input": draw(TEXT), "output": draw(TEXT)}
    if draw(st.booleans()):
        card["instruction"] = draw(st.none() | st.text(max_size=20))
    fault = draw(st.sampled_from([None, None, "input", "output", "instruction", "entry"]))
    if fault == "entry":
        return draw(st.one_of(JSON_SCALARS, st.lists(JSON_SCALARS, max_size=2))), None, "object"
    if fault in ("input", "output"):
        card[fault] = draw(st.none() | NOT_TEXT | BLANK)
        return card, None, f"'{fault}'"
    if fault == "instruction":
        card["instruction"] = draw(NOT_TEXT)
        return card, None, "'instruction'"
    instruction = (card.get("instruction") or "").strip()
    return card, Flashcard(card["input"].strip(), card["output"].strip(), instruction), ""


@FAST
@given(cards=st.lists(flashcard(), max_size=8), as_list=st.booleans(), crlf=st.booleans())
def test_every_flashcard_loads_or_is_named_with_line_and_field(cards, as_list, crlf):
    newline = "\r\n" if crlf else "\n"
    entries = [json.dumps(entry) for entry, _, _ in cards]
    if as_list:  # one entry per line after the "[" line: entry i is on line i + 2
        text = "[" + newline + ("," + newline).join(entries) + newline + "]" + newline
        first_line = 2
    else:
        text = "".join(entry + newline for entry in entries)
        first_line = 1
    bad = {i + first_line: word for i, (_, card, word) in enumerate(cards) if card is None}
    with scratch() as folder:
        path = folder / ("cards.json" if as_list else "cards.jsonl")
        path.write_bytes(b"\xef\xbb\xbf" + text.encode())
        try:
            loaded = load_flashcards(path)
        except DataError as error:
            _problems_name_file_and_line(path, error.problems)
            if not cards:
                assert str(error) == f"{path}: no flashcards in the file"
                return
            assert {p.line for p in error.problems} == set(bad)
            for line, word in bad.items():
                assert any(word in p.message for p in error.problems if p.line == line)
        else:
            assert not bad
            assert loaded == [card for _, card, _ in cards]


@FAST
@given(content=st.binary(max_size=300), suffix=st.sampled_from([".json", ".jsonl"]))
def test_any_bytes_as_flashcards_load_or_fail_naming_the_file(content, suffix):
    with scratch() as folder:
        path = folder / f"cards{suffix}"
        path.write_bytes(content)
        try:
            cards = load_flashcards(path)
        except DataError as error:
            _problems_name_file_and_line(path, error.problems)
        else:
            assert all(card.question and card.answer for card in cards)


def test_a_pretty_printed_flashcard_list_names_the_entry_line(tmp_path):
    path = tmp_path / "medical_meadow_flashcards.json"
    cards = [{"input": "What is gout?", "output": "Urate arthritis."}, {"input": "Q?", "output": 3}]
    path.write_text(json.dumps(cards, indent=2))  # the second card starts on line 6
    with pytest.raises(DataError) as error:
        load_flashcards(path)
    assert str(error.value) == f"{path}:6: missing or empty 'output' (got a number)"
    path.write_bytes(b'[{"input": "Q?",\n "output": "A\xff"}]')
    with pytest.raises(DataError, match=r"flashcards\.json:2: flashcards: not UTF-8"):
        load_flashcards(path)
    path.write_text('[{"input": "Q?",\n "output": NaN}]')
    with pytest.raises(DataError, match="NaN is not JSON"):
        load_flashcards(path)


# --- the run config ------------------------------------------------------------------------------

DEFAULTS = resolve(environ={}).run.to_flower()
NUMERIC = {
    field_key(name): field
    for name, field in RunConfig.model_fields.items()
    if field.annotation in (int, float)
}
HOSTILE = st.one_of(
    st.integers(-(10**30), 10**30),
    st.sampled_from([-1, 0, -0.0, 2**63, 2**64, 1e308, -1e308, 1e-320]),
    st.floats(),  # NaN and the infinities included
    st.text(max_size=12),
    st.sampled_from(["nan", "inf", "-inf", "1e999", "8", " 8 ", "0x10", "8.0"]),
    st.none(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def _bounds(field: Any) -> dict[str, float]:
    found = {}
    for rule in field.metadata:
        for name in ("ge", "gt", "le", "lt"):
            if getattr(rule, name, None) is not None:
                found[name] = getattr(rule, name)
    return found


def _within(value: float, bounds: dict[str, float]) -> bool:
    return (
        value >= bounds.get("ge", -math.inf)
        and value > bounds.get("gt", -math.inf)
        and value <= bounds.get("le", math.inf)
        and value < bounds.get("lt", math.inf)
    )


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(sorted(NUMERIC)), value=HOSTILE)
def test_a_numeric_run_config_key_is_in_bounds_or_refused_by_name(key, value):
    try:
        run = RunConfig.from_flower({**DEFAULTS, key: value})
    except RunConfigError as error:
        assert f"{key}:" in str(error)
        return
    got = run.to_flower()[key]
    assert isinstance(got, NUMERIC[key].annotation) and math.isfinite(got)
    assert _within(got, _bounds(NUMERIC[key]))
    if isinstance(value, int | float):
        assert got == NUMERIC[key].annotation(value)  # a huge int as a float: the nearest one
    else:  # text such as "8": pydantic's lax mode reads the number it spells
        assert isinstance(value, str) and got == float(value)


@st.composite
def numeric_value(draw: st.DrawFn, key: str) -> int | float:
    field, bounds = NUMERIC[key], _bounds(NUMERIC[key])
    low = bounds.get("ge", bounds.get("gt", -(10**9)))
    high = bounds.get("le", bounds.get("lt", 10**9))
    if field.annotation is int:
        return draw(st.integers(low + ("gt" in bounds), high - ("lt" in bounds)))
    return draw(
        st.floats(low, high, exclude_min="gt" in bounds, exclude_max="lt" in bounds, width=64)
    )


@settings(max_examples=100, deadline=None)
@given(data=st.data(), keys=st.sets(st.sampled_from(sorted(NUMERIC)), min_size=1))
def test_valid_run_config_values_round_trip(data, keys):
    values = {**DEFAULTS, **{key: data.draw(numeric_value(key)) for key in keys}}
    run = RunConfig.from_flower(values)
    assert run.to_flower() == values
    assert RunConfig.from_flower(run.to_flower()) == run


@QUICK
@given(key=st.sampled_from(sorted(set(DEFAULTS) - set(NUMERIC))), value=HOSTILE | st.booleans())
def test_any_run_config_key_takes_its_type_or_is_refused_by_name(key, value):
    try:
        run = RunConfig.from_flower({**DEFAULTS, key: value})
    except RunConfigError as error:
        assert f"{key}:" in str(error)
    else:
        assert type(run.to_flower()[key]) is type(DEFAULTS[key])


@QUICK
@given(
    extra=st.text(min_size=1, max_size=20).filter(lambda k: k not in DEFAULTS), drop=st.booleans()
)
def test_unknown_and_missing_run_config_keys_are_named(extra, drop):
    values = {**DEFAULTS, extra: 1}
    if drop:
        values = {k: v for k, v in DEFAULTS.items() if k != "batch-size"}
    with pytest.raises(RunConfigError) as error:
        RunConfig.from_flower(values)
    assert ("batch-size" if drop else extra) in str(error.value)


@pytest.mark.parametrize("key", ["batch-size", "learning-rate", "fraction-train"])
def test_true_is_not_a_number_in_the_run_config(key):
    with pytest.raises(RunConfigError, match=key):
        RunConfig.from_flower({**DEFAULTS, key: True})


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_a_seed_no_hospital_can_use_is_refused_at_start_up(seed):
    with pytest.raises(RunConfigError, match="seed"):
        RunConfig.from_flower({**DEFAULTS, "seed": seed})


# --- component settings (FEDERIMED_* environment) ------------------------------------------------

ENV_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=16
)
NUMBERS_AS_TEXT = st.one_of(
    st.integers(-(10**6), 10**6).map(str),
    st.sampled_from(["0", "-1", "65535", "65536", "nan", "inf", "1e3", "8000.0", " 80", "9" * 30]),
    ENV_TEXT,
)


def _settings(cls: type, env: dict[str, str]) -> Any:
    """``cls()`` as a component builds it, from exactly ``env`` (and no other FEDERIMED_*)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FEDERIMED_")}
    with mock.patch.dict(os.environ, clean | env, clear=True):
        return cls()


def _port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


NODE = {
    "FEDERIMED_NODE_NAME": "hospital-1",
    "FEDERIMED_NODE_PRIVATE_KEY": "/keys/node.key",
    "FEDERIMED_NODE_DATA_PATH": "/data",
}
SETTING_CASES = {
    # variable: (settings class, the variables it also needs, what an accepted value satisfies)
    "FEDERIMED_SUPERLINK_PORT": ("SuperLinkSettings", {}, lambda s: 1 <= s.port <= 65535),
    "FEDERIMED_GATEWAY_PORT": ("GatewaySettings", {}, lambda s: 1 <= s.port <= 65535),
    "FEDERIMED_NODE_RUNTIME_PORT": (
        "SuperNodeSettings",
        NODE,
        lambda s: 1 <= s.runtime_port <= 65535,
    ),
    "FEDERIMED_NODE_SUPERLINK": (
        "SuperNodeSettings",
        NODE,
        lambda s: 1 <= _port_of(s.superlink) <= 65535,
    ),
    "FEDERIMED_SUPEREXEC_RUNTIME_API": (
        "SuperExecSettings",
        {},
        lambda s: 1 <= _port_of(s.runtime_api) <= 65535,
    ),
    "FEDERIMED_GATEWAY_SUPERLINK": (
        "GatewaySettings",
        {},
        lambda s: 1 <= _port_of(s.superlink) <= 65535,
    ),
    "FEDERIMED_GATEWAY_SUPERLINK_NAME": (
        "GatewaySettings",
        {},
        lambda s: not set(s.superlink_name) & set(" {}\"'\n\t"),
    ),
    "FEDERIMED_SUPERLINK_HOST": (
        "SuperLinkSettings",
        {},
        lambda s: s.host.strip() == s.host and s.host,
    ),
    "FEDERIMED_TORCH_THREADS": ("RuntimeSettings", {}, lambda s: 0 <= s.torch_threads <= 4096),
}


@settings(max_examples=200, deadline=None)
@given(
    variable=st.sampled_from(sorted(SETTING_CASES)),
    value=NUMBERS_AS_TEXT | NUMBERS_AS_TEXT.map(lambda port: f"superlink:{port}"),
)
def test_a_setting_is_sane_or_refused_naming_the_variable(variable, value):
    from pydantic import ValidationError

    from federimed import settings as component_settings

    class_name, needs, sane = SETTING_CASES[variable]
    cls = getattr(component_settings, class_name)
    try:
        built = _settings(cls, {**needs, variable: value})
    except ValidationError as error:
        assert f"  {variable}: " in _settings_problems(error)  # what the CLI prints
    else:
        assert sane(built)


@pytest.mark.parametrize(
    ("variable", "value", "cls"),
    [
        ("FEDERIMED_SUPERLINK_PORT", "-1", "SuperLinkSettings"),
        ("FEDERIMED_SUPERLINK_PORT", "65536", "SuperLinkSettings"),
        ("FEDERIMED_SUPERLINK_PORT", "nan", "SuperLinkSettings"),
        ("FEDERIMED_NODE_SUPERLINK", "gateway:0", "SuperNodeSettings"),
        ("FEDERIMED_NODE_SUPERLINK", "gateway:70000", "SuperNodeSettings"),
        ("FEDERIMED_NODE_SUPERLINK", "gateway", "SuperNodeSettings"),
        ("FEDERIMED_NODE_DATA_PATH", '/data" evil="1', "SuperNodeSettings"),
        ("FEDERIMED_SUPEREXEC_RUNTIME_API", "supernode:-9094", "SuperExecSettings"),
        ("FEDERIMED_GATEWAY_SUPERLINK_NAME", "superlink }\n admin on", "GatewaySettings"),
        ("FEDERIMED_TORCH_THREADS", "-2", "RuntimeSettings"),
        ("FEDERIMED_TORCH_THREADS", "1e9", "RuntimeSettings"),
        ("FEDERIMED_TORCH_THREADS", "100000", "RuntimeSettings"),
    ],
)
def test_absurd_settings_are_refused_at_start_up(variable, value, cls):
    from pydantic import ValidationError

    from federimed import settings as component_settings

    with pytest.raises(ValidationError) as error:
        _settings(getattr(component_settings, cls), {**NODE, variable: value})
    assert f"  {variable}: " in _settings_problems(error.value)


def test_ipv6_and_service_names_are_still_addresses():
    from federimed.settings import SuperExecSettings, SuperNodeSettings

    for address in ("[::1]:9094", "supernode-hospital-1:9094", "10.0.0.7:9094"):
        assert _settings(SuperExecSettings, {"FEDERIMED_SUPEREXEC_RUNTIME_API": address})
    node = _settings(SuperNodeSettings, {**NODE, "FEDERIMED_NODE_SUPERLINK": "fleet-gateway:8443"})
    assert node.superlink == "fleet-gateway:8443"


def test_an_empty_runtime_variable_means_its_default():
    from federimed.settings import RuntimeSettings

    runtime = _settings(RuntimeSettings, {"FEDERIMED_TORCH_THREADS": "", "FEDERIMED_DEVICE": ""})
    assert runtime.torch_threads == 0 and runtime.device == "auto"


# --- the site policy -----------------------------------------------------------------------------


@FAST
@given(content=st.binary(max_size=300))
def test_any_bytes_as_a_policy_load_or_fail_naming_the_file(content):
    with scratch() as folder:
        path = folder / "policy.yaml"
        path.write_bytes(content)
        for load in (lambda: load_policy(path), lambda: policy_from_env({POLICY_ENV: str(path)})):
            try:
                policy = load()
            except PolicyError as error:
                assert str(path) in str(error)
            else:
                assert isinstance(policy, SitePolicy) and policy.ledger.is_absolute()


POLICY_NUMBERS = st.one_of(
    st.integers(-(10**12), 10**12),
    st.floats(),
    st.booleans(),
    st.none(),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=2),
)
FLOORS = {"batch_size": 8192, "local_steps": 1_000_000, "examples_per_update": 10_000_000}


@settings(max_examples=150, deadline=None)
@given(
    floor=st.sampled_from(sorted(FLOORS)),
    floor_value=POLICY_NUMBERS,
    norm=POLICY_NUMBERS,
    bom=st.booleans(),
    crlf=st.booleans(),
)
def test_policy_numbers_are_sane_or_refused_naming_the_field(floor, floor_value, norm, bom, crlf):
    text = yaml.safe_dump(
        {
            "site": "hospital-1",
            "ledger": "ledger.jsonl",
            "floors": {floor: floor_value},
            "max_update_norm": norm,
        }
    )
    data = text.replace("\n", "\r\n" if crlf else "\n").encode()
    with scratch() as folder:
        path = folder / "policy.yaml"
        path.write_bytes(b"\xef\xbb\xbf" + data if bom else data)
        try:
            policy = load_policy(path)
        except PolicyError as error:
            message = str(error)
            assert message.startswith(f"{path}: ")
            assert f"floors.{floor}" in message or "max_update_norm" in message
            return
    value = getattr(policy.floors, floor)
    assert type(value) is int and 1 <= value <= FLOORS[floor] and value == floor_value
    assert policy.max_update_norm is None or (
        type(norm) in (int, float) and math.isfinite(norm) and norm > 0
    )


@pytest.mark.parametrize(
    ("content", "named"),
    [
        (b"", "the file is empty"),
        (b"\xef\xbb\xbf  \r\n", "the file is empty"),
        (b"site: h\nledger: l\nnote: caf\xe9\n", "line 3: not UTF-8"),
        (b"site: h\nledger: l\nfloors:\n  batch_size: 64\nfloors:\n  batch_size: 1\n", "line 5"),
        (b"site: h\nledger: l\nfloors: {batch_size: 8, batch_size: 1}\n", "appears twice"),
        (b"site: h\nledger: l\nmax_update_norm: .nan\n", "max_update_norm"),
        (b"site: h\nledger: l\nmax_update_norm: .inf\n", "max_update_norm"),
        (b"site: h\nledger: l\nmax_update_norm: -1.0\n", "max_update_norm"),
        (b"site: h\nledger: l\nfloors:\n  batch_size: -4\n", "floors.batch_size"),
        (b"site: h\nledger: l\nfloors:\n  local_steps: true\n", "floors.local_steps"),
        (b"site: h\nledger: l\nfloors:\n  batch_size: 1.0e+30\n", "floors.batch_size"),
        (b'site: h\nledger: "a\\0b"\n', "ledger"),
        (b"site: h\nledger: l\nnote: \x07\n", "line 3"),
        (b"[" * 1500 + b"]" * 1500, "policy.yaml"),
        (b"site: h\nledger: !!python/object:os.system {}\n", "line 2"),
    ],
)
def test_a_hostile_policy_file_names_the_file_and_where(tmp_path, content, named):
    path = tmp_path / "policy.yaml"
    path.write_bytes(content)
    with pytest.raises(PolicyError) as error:
        load_policy(path)
    assert str(error.value).startswith(str(path)) and named in str(error.value)


def test_a_windows_policy_with_bom_and_crlf_loads(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_bytes(b"\xef\xbb\xbfsite: hospital-1\r\nledger: l.jsonl\r\nmax_update_norm: 5\r\n")
    policy = load_policy(path)
    assert policy.site == "hospital-1" and policy.max_update_norm == 5.0


def test_a_policy_file_too_big_to_be_one_is_not_read(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_bytes(b"site: h\nledger: l\n" + b"#" * (2 * 1024 * 1024))
    with pytest.raises(PolicyError, match="larger than 1048576 bytes"):
        load_policy(path)

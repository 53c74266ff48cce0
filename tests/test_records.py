"""Loaders and validation: every bad row is named with its file and line."""

from __future__ import annotations

import json

import pytest
from conftest import write_jsonl

from federimed.cli import main
from federimed.data.records import (
    Columns,
    DataError,
    check_file,
    load_examples,
    load_hospital,
    read_label_file,
)

LABELS = ["I21", "J18"]


def test_jsonl_loads_every_row(tmp_path):
    path = write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"id": "a", "text": "chest pain", "label": "I21"},
            {"id": "b", "text": "cough, fever", "label": "J18"},
        ],
    )
    examples = load_examples(path, LABELS)
    assert [(e.id, e.label) for e in examples] == [("a", "I21"), ("b", "J18")]


def test_each_problem_is_reported_with_file_and_line(tmp_path):
    path = write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"id": "a", "text": "chest pain", "label": "I21"},
            '{"id": "b", "text": "broken\n',
            {"id": "c", "label": "I21"},
            {"id": "d", "text": "   ", "label": "I21"},
            {"id": "e", "text": "rash", "label": "Z99"},
            {"id": "a", "text": "again", "label": "J18"},
            "\n",
        ],
    )
    examples, problems = check_file(path, LABELS)
    messages = [str(p) for p in problems]
    assert [e.id for e in examples] == ["a"]
    assert messages == [
        f"{path}:2: invalid JSON: Unterminated string starting at (column 21)",
        f"{path}:3: missing field 'text'",
        f"{path}:4: field 'text' is empty or not text",
        f"{path}:5: unknown label 'Z99'",
        f"{path}:6: duplicate id 'a' (first on line 1)",
        f"{path}:7: empty line",
    ]
    with pytest.raises(DataError) as error:
        load_examples(path, LABELS)
    assert f"{path}:5: unknown label 'Z99'" in str(error.value)


def test_csv_with_custom_columns_counts_lines_after_header(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("note,dx\nchest pain,I21\n,J18\nfever,J18\n")
    columns = Columns(text="note", label="dx")
    examples, problems = check_file(path, LABELS, columns)
    assert [e.text for e in examples] == ["chest pain", "fever"]
    assert [str(p) for p in problems] == [f"{path}:3: missing field 'note'"]


def test_parquet_is_read_through_datasets(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"text": ["a", "b"], "label": ["I21", "J18"]}), path)
    assert [e.label for e in load_examples(path, LABELS)] == ["I21", "J18"]


def test_unsupported_format_and_missing_folder_are_named(tmp_path):
    with pytest.raises(DataError, match=r"train\.txt: unsupported format"):
        load_examples(tmp_path / "train.txt")
    with pytest.raises(DataError, match="data folder not found"):
        load_hospital(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no training file"):
        load_hospital(tmp_path / "empty")


def test_validation_ids_may_not_repeat_training_ids(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"id": "x", "text": "a", "label": "I21"}])
    write_jsonl(tmp_path / "validation.jsonl", [{"id": "x", "text": "b", "label": "I21"}])
    with pytest.raises(DataError, match="ids also in"):
        load_hospital(tmp_path, LABELS)


def test_label_file_accepts_objects_and_rejects_garbage(tmp_path):
    good = tmp_path / "labels.json"
    good.write_text(json.dumps([{"code": "I21", "name": "MI"}, "J18"]))
    assert read_label_file(good) == {"I21": "MI", "J18": "J18"}
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(DataError, match="non-empty JSON list"):
        read_label_file(bad)


def test_cli_validate_exits_nonzero_and_names_the_line(tmp_path, capsys):
    folder = tmp_path / "hospital-1"
    write_jsonl(
        folder / "train.jsonl",
        [
            {"id": "1", "text": "pain", "label": "I21"},
            {"id": "2", "text": "cough", "label": "NOPE"},
        ],
    )
    (tmp_path / "labels.json").write_text(json.dumps(LABELS))
    assert main(["data", "validate", str(folder)]) == 1
    captured = capsys.readouterr()
    assert f"{folder / 'train.jsonl'}:2: unknown label 'NOPE'" in captured.err
    write_jsonl(folder / "train.jsonl", [{"id": "1", "text": "pain", "label": "I21"}])
    assert main(["data", "validate", str(folder)]) == 0


def test_cli_validate_missing_path_is_a_plain_error(tmp_path, capsys):
    assert main(["data", "validate", str(tmp_path / "missing")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_medalpaca_flashcards_json_and_jsonl(tmp_path):
    from federimed.data.records import load_flashcards

    cards = [
        {
            "instruction": "Answer this question truthfully",
            "input": "What is gout?",
            "output": "Inflammatory arthritis from urate crystals.",
        },
        {"input": "First-line for anaphylaxis?", "output": "IM adrenaline."},
    ]
    as_json = tmp_path / "medical_meadow_flashcards.json"
    as_json.write_text(json.dumps(cards))
    loaded = load_flashcards(as_json)
    assert [c.question for c in loaded] == ["What is gout?", "First-line for anaphylaxis?"]
    assert loaded[0].instruction.startswith("Answer")
    bad = write_jsonl(tmp_path / "cards.jsonl", [cards[1], {"input": "Q?", "output": " "}])
    with pytest.raises(DataError, match=r"cards\.jsonl:2: missing or empty 'output'"):
        load_flashcards(bad)

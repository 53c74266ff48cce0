"""A torn last line in a hospital's egress ledger (a crash in the middle of a write): the next
append sets it aside and goes on, the chain records it, and `ledger verify` says what happened
before and after (issue 29)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest

from federimed.cli import main
from federimed.hospital import ledger


def _ledger(folder: Path, lines: int = 3) -> Path:
    path = folder / "site" / "egress-ledger.jsonl"
    for round_ in range(1, lines + 1):
        ledger.append(path, {"round": round_, "kind": "train", "metrics": {"loss": 0.5}})
    return path


def _crash_mid_write(path: Path, fraction: float = 0.5) -> bytes:
    """What a crash during an append leaves: the start of the next line, no newline."""
    line = json.dumps({"round": 99, "kind": "train", "prev": "0" * 64, "hash": "f" * 64})
    torn = line.encode()[: int(len(line) * fraction)]
    with path.open("ab") as handle:
        handle.write(torn)
    return torn


def test_a_torn_last_line_is_set_aside_and_appends_go_on(tmp_path, caplog):
    path = _ledger(tmp_path)
    head = ledger.anchor(path)
    torn = _crash_mid_write(path)
    with caplog.at_level(logging.WARNING, logger="federimed.hospital.ledger"):
        written = ledger.append(path, {"round": 4, "kind": "train"})
        ledger.append(path, {"round": 5, "kind": "evaluate"})  # and the one after: plain
    (aside,) = tmp_path.glob("site/egress-ledger.jsonl.torn-*")
    assert aside.read_bytes() == torn  # every byte kept, nothing else
    assert aside.stat().st_mode & 0o777 == 0o600
    assert aside.parent.stat().st_mode & 0o777 == 0o700
    assert written["torn"] == {
        "file": aside.name,
        "bytes": len(torn),
        "sha256": hashlib.sha256(torn).hexdigest(),
        "line": 4,
    }
    assert written["prev"] == head.split(":")[1]  # chained to the last whole line
    assert "line 4: torn" in caplog.text and aside.name in caplog.text
    assert ledger.verify(path) == 5
    assert ledger.verify(path, head) == 5  # the anchor taken before the crash still holds
    assert [e["round"] for _, e in ledger.entries(path)] == [1, 2, 3, 4, 5]
    assert b'round": 99' not in path.read_bytes()


def test_ledger_verify_names_a_torn_line_before_the_next_append_and_reports_it_after(
    tmp_path, capsys, caplog
):
    path = _ledger(tmp_path)
    _crash_mid_write(path, 0.3)
    assert main(["ledger", "verify", str(path)]) == 1
    said = capsys.readouterr().err
    assert "line 4: not a ledger entry, and the last line: torn" in said
    assert "no end of line" in said and "lines 1-3 verify" in said
    ledger.append(path, {"round": 4})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="federimed.hospital.ledger"):
        assert main(["ledger", "verify", str(path)]) == 0
    assert "4 entries, hash chain intact" in capsys.readouterr().out
    (aside,) = tmp_path.glob("site/*.torn-*")
    assert f"line 4: a torn line 4 ({len(aside.read_bytes())} bytes" in caplog.text
    assert f"set aside to {aside.name}" in caplog.text and "gone" not in caplog.text
    aside.write_bytes(b"edited")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="federimed.hospital.ledger"):
        assert ledger.verify(path) == 4
    assert "that file was changed since" in caplog.text
    aside.unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="federimed.hospital.ledger"):
        assert ledger.verify(path) == 4
    assert "that file is gone" in caplog.text


@pytest.mark.parametrize(
    "tail",
    [
        b'{"round": 4, "ki',  # cut inside a line
        b"\x00" * 300,  # the file grew but its data never reached the disk
        '{"text": "caf\u00e9'.encode()[:-1],  # cut inside a multibyte character
        b"{not json}\n",  # a last line that ends but is no entry
        b'{"round": 4}\n',  # JSON, but no chain fields
    ],
    ids=["cut", "zeros", "utf8", "garbage-line", "no-hash"],
)
def test_every_kind_of_torn_tail_is_survived(tmp_path, tail):
    path = _ledger(tmp_path, lines=2)
    with path.open("ab") as handle:
        handle.write(tail)
    ledger.append(path, {"round": 3})
    (aside,) = tmp_path.glob("site/*.torn-*")
    assert aside.read_bytes() == tail
    assert ledger.verify(path) == 3


def test_a_line_written_whole_but_for_its_newline_stays_in_the_chain(tmp_path):
    path = _ledger(tmp_path, lines=2)
    text = path.read_bytes()
    path.write_bytes(text[:-1])  # the crash came between the line and its newline
    ledger.append(path, {"round": 3})
    assert not list(tmp_path.glob("site/*.torn-*"))
    assert [e["round"] for _, e in ledger.entries(path)] == [1, 2, 3]


def test_a_broken_middle_line_is_not_mistaken_for_a_torn_one(tmp_path):
    """Only the last line can be torn: an edited line further up still breaks the chain."""
    path = _ledger(tmp_path)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + "{not json\n" + lines[2])
    ledger.append(path, {"round": 4})
    assert not list(tmp_path.glob("site/*.torn-*"))
    with pytest.raises(ledger.LedgerError, match=r"line 2: not a ledger entry$"):
        ledger.verify(path)


def test_an_aside_file_no_line_records_is_reported(tmp_path, caplog):
    """A crash after the torn line was set aside but before the new line was written."""
    path = _ledger(tmp_path, lines=1)
    (path.parent / f"{path.name}.torn-20260101T000000Z").write_bytes(b'{"ro')
    with caplog.at_level(logging.WARNING, logger="federimed.hospital.ledger"):
        assert ledger.verify(path) == 1
    assert "which no ledger line records" in caplog.text

"""The egress ledger: every reply a hospital sends, written down before it is sent.

JSON lines on the hospital's own volume.  Each line carries ``prev`` (the previous line's
``hash``) and its own ``hash`` (SHA-256 of the line's canonical JSON without ``hash``), so
editing, dropping or reordering a line breaks the chain at that line, and ``verify`` names it.
Only the hospital's guard writes it (:mod:`federimed.hospital.guard`, in the SuperNode's
process; the consortium's app has no handle on it).  The file is 0600 in a 0700 folder, and
appends take an exclusive lock.  A chain proves order, not authorship: whoever can write the file
could rewrite it whole and chain it anew.  :func:`anchor` is the short value to keep elsewhere
(a ticket, a signed mail, the node key's signature): ``verify(path, anchor)`` then fails on any
rewrite of the lines the anchor covers.

A crash in the middle of an append leaves a torn last line (part of a JSON line, no newline).
The next append finds it, moves it aside to ``<ledger>.torn-<time>`` (0600, every byte kept),
cuts it from the ledger and chains its own line to the last whole one, recording the aside file
(name, size, SHA-256) in that line: the hospital goes on replying, and the chain itself says what
happened.  Until then ``verify`` names the torn line as such; afterwards it verifies and reports
each aside file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

GENESIS = "0" * 64
TORN = ".torn-"  # <ledger>.torn-<time>: a torn last line, moved aside by the next append
log = logging.getLogger("federimed.hospital.ledger")


class LedgerError(ValueError):
    """The ledger does not verify; the message names the line."""


def _digest(entry: dict[str, Any]) -> str:
    body = {key: value for key, value in entry.items() if key != "hash"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def arrays_digest(arrays: list[tuple[str, bytes]]) -> str:
    """SHA-256 over every array's name and bytes, in the order they are sent."""
    digest = hashlib.sha256()
    for name, data in arrays:
        digest.update(name.encode() + b"\0" + data)
    return digest.hexdigest()


def _entry(text: bytes | str) -> dict[str, Any] | None:
    """A line as a ledger entry (a JSON object with its hash and prev), else None."""
    try:
        entry = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("hash"), str) or "prev" not in entry:
        return None
    return entry


def _head(data: bytes) -> tuple[str, int, int, bytes]:
    """(the last whole line's hash, how many whole lines, where they end, what follows them).

    What follows is empty for an intact ledger; else the torn last line: bytes after the last
    newline (a write cut short), or a last line that is no ledger entry at all."""
    cut = data.rfind(b"\n") + 1
    whole, tail = data[:cut], data[cut:]
    lines = whole.splitlines(keepends=True)
    if not tail and lines and _entry(lines[-1]) is None and lines[-1].strip():
        cut -= len(lines[-1])
        tail, lines = lines[-1], lines[:-1]
    last = GENESIS
    for line in reversed(lines):
        if line.strip():
            entry = _entry(line)
            last = entry["hash"] if entry else json.loads(line)["hash"]  # raises: broken
            break
    return last, sum(1 for line in lines if line.strip()), cut, tail


def _open_private(path: Path):
    """The ledger for appending, created 0600 in a folder created 0700."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    return os.fdopen(descriptor, "a+b")


def _set_aside(path: Path, tail: bytes, line: int) -> dict[str, Any]:
    """Keep a torn line's bytes in a new 0600 file beside the ledger; what the next line
    records about it."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for attempt in range(1000):
        aside = path.with_name(f"{path.name}{TORN}{stamp}" + (f"-{attempt}" if attempt else ""))
        try:
            descriptor = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            break
        except FileExistsError:
            continue
    else:
        raise OSError(f"{path}: no free name to set its torn last line aside")
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(tail)
        handle.flush()
        os.fsync(handle.fileno())
    return {
        "file": aside.name,
        "bytes": len(tail),
        "sha256": hashlib.sha256(tail).hexdigest(),
        "line": line,
    }


def append(path: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """Chain ``entry`` to the last line and write it (fsynced) before the caller sends.  A torn
    last line (a crash mid-write) is first set aside (see the module's doc)."""
    path = Path(path)
    with _open_private(path) as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            handle.seek(0)
            previous, count, cut, tail = _head(handle.read())
            line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **entry}
            if tail:
                complete = _entry(tail)
                if (
                    complete is not None
                    and complete["prev"] == previous
                    and (_digest(complete) == complete["hash"])
                ):  # written whole but for its newline: it stays
                    handle.write(b"\n")
                    previous, count = complete["hash"], count + 1
                else:
                    torn = _set_aside(path, tail, count + 1)
                    os.ftruncate(handle.fileno(), cut)
                    line["torn"] = torn
                    log.warning(
                        "%s, line %d: torn (%d bytes, a write cut short); kept in %s, and the "
                        "chain goes on from line %d",
                        path, count + 1, len(tail), torn["file"], count,
                    )  # fmt: skip
            line["prev"] = previous
            line["hash"] = _digest(line)
            handle.seek(0, 2)
            handle.write((json.dumps(line, sort_keys=True) + "\n").encode())
            handle.flush()
            with contextlib.suppress(OSError):
                os.fsync(handle.fileno())
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
    return line


def entries(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, entry) for every line, checking the chain as it goes."""
    previous = GENESIS
    with Path(path).open("rb") as handle:
        texts = handle.readlines()
    for number, text in enumerate(texts, start=1):
        entry = _entry(text)
        if entry is None:
            if number == len(texts):
                raise LedgerError(_torn_message(Path(path), number, text))
            raise LedgerError(f"{path}, line {number}: not a ledger entry")
        if entry["prev"] != previous:
            raise LedgerError(
                f"{path}, line {number}: the chain is broken here (prev does not match "
                "the line before: a line was removed, inserted or reordered)"
            )
        if _digest(entry) != entry["hash"]:
            raise LedgerError(f"{path}, line {number}: its content does not match its hash")
        previous = entry["hash"]
        yield number, entry


def _torn_message(path: Path, number: int, text: bytes) -> str:
    ending = "" if text.endswith(b"\n") else ", no end of line"
    before = {1: "no line before it", 2: "line 1 verifies"}.get(
        number, f"lines 1-{number - 1} verify"
    )
    return (
        f"{path}, line {number}: not a ledger entry, and the last line: torn ({len(text)} bytes"
        f"{ending}), as a crash in the middle of a write leaves it; {before}. The next append "
        f"keeps it in {path.name}{TORN}<time> and chains on from line {number - 1}"
    )


def torn_reports(path: Path, lines: list[dict[str, Any]] | None = None) -> list[str]:
    """What happened to torn lines: each one set aside (as the line after it records) and
    whether its file is still there unchanged, and aside files no line records."""
    path = Path(path)
    lines = lines if lines is not None else [entry for _, entry in entries(path)]
    reports, named = [], set()
    for number, entry in enumerate(lines, start=1):
        torn = entry.get("torn")
        if not isinstance(torn, dict):
            continue
        named.add(torn.get("file"))
        aside = path.with_name(str(torn.get("file")))
        said = (
            f"{path}, line {number}: a torn line {torn.get('line')} ({torn.get('bytes')} bytes, "
            f"a write cut short) was set aside to {aside.name} before this line was written; "
            f"the chain goes on from line {number - 1}"
        )
        if not aside.is_file():
            said += ", but that file is gone"
        elif hashlib.sha256(aside.read_bytes()).hexdigest() != torn.get("sha256"):
            said += ", but that file was changed since"
        reports.append(said)
    for aside in sorted(path.parent.glob(f"{path.name}{TORN}*")):
        if aside.name not in named:
            reports.append(
                f"{aside}: a torn line set aside, which no ledger line records (the append "
                "that set it aside did not finish)"
            )
    return reports


ANCHOR_FORMAT = "{lines}:{hash}"


def anchor(path: Path) -> str:
    """``LINES:HASH``: how many lines the ledger has and the last one's hash (the chain's
    head), after checking the chain.  Kept outside the hospital's volume, it pins every line up
    to there: a rewritten chain ends in another hash."""
    lines, last = 0, GENESIS
    for lines, entry in entries(path):  # noqa: B007 - the last pair is the anchor
        last = entry["hash"]
    return ANCHOR_FORMAT.format(lines=lines, hash=last)


def parse_anchor(text: str) -> tuple[int, str]:
    lines, _, head = text.strip().partition(":")
    if not lines.isdigit() or len(head) != 64 or any(c not in "0123456789abcdef" for c in head):
        raise LedgerError(f"{text!r}: an anchor is LINES:HASH, as `federimed ledger anchor` prints")
    return int(lines), head


def verify(path: Path, anchor_text: str | None = None) -> int:
    """The number of lines, or :class:`LedgerError` naming the first line that breaks; with an
    anchor, also the line it names must still end the chain there as it did then.  Torn lines
    set aside (:func:`torn_reports`) are logged as warnings (the CLI prints them)."""
    anchored, head = parse_anchor(anchor_text) if anchor_text else (0, GENESIS)
    lines, found, seen = 0, GENESIS, []
    for lines, entry in entries(path):
        seen.append(entry)
        if lines == anchored:
            found = entry["hash"]
    if anchored > lines:
        raise LedgerError(
            f"{path}: the anchor covers {anchored} lines, the ledger has {lines}: "
            "lines were removed"
        )
    if found != head:
        raise LedgerError(
            f"{path}, line {anchored}: its hash is not the anchor's: the ledger was rewritten "
            "up to there"
        )
    for report in torn_reports(path, seen):  # the chain holds; say what it went through
        log.warning("%s", report)
    return lines


def count_replies(path: Path, run_id: int, kind: str) -> int:
    """Replies of ``kind`` that left for run ``run_id`` (refusals not counted), as written."""
    if not Path(path).exists():
        return 0
    count = 0
    with Path(path).open() as handle:
        for text in handle:
            try:
                entry = json.loads(text)
            except ValueError:
                continue  # a torn line is ledger verify's business, not a reason to run more
            if entry.get("run_id") == run_id and entry.get("kind") == kind:
                count += entry.get("error") is None
    return count

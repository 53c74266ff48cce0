"""The egress ledger: every reply a hospital sends, written down before it is sent.

JSON lines on the hospital's own volume.  Each line carries ``prev`` (the previous line's
``hash``) and its own ``hash`` (SHA-256 of the line's canonical JSON without ``hash``), so
editing, dropping or reordering a line breaks the chain at that line, and ``verify`` names it.
Only the hospital's guard writes it (:mod:`federimed.deploy.guard`, in the SuperNode's
process; the consortium's app has no handle on it).  The file is 0600 in a 0700 folder, and
appends take an exclusive lock.  A chain proves order, not authorship: whoever can write the file
could rewrite it whole and chain it anew.  :func:`anchor` is the short value to keep elsewhere
(a ticket, a signed mail, the node key's signature): ``verify(path, anchor)`` then fails on any
rewrite of the lines the anchor covers.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

GENESIS = "0" * 64


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


def _last_hash(handle) -> str:
    handle.seek(0)
    last = GENESIS
    for line in handle:
        if line.strip():
            last = json.loads(line)["hash"]
    return last


def _open_private(path: Path):
    """The ledger for appending, created 0600 in a folder created 0700."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    return os.fdopen(descriptor, "a+")


def append(path: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """Chain ``entry`` to the last line and write it (fsynced) before the caller sends."""
    path = Path(path)
    with _open_private(path) as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **entry}
            line["prev"] = _last_hash(handle)
            line["hash"] = _digest(line)
            handle.seek(0, 2)
            handle.write(json.dumps(line, sort_keys=True) + "\n")
            handle.flush()
            with contextlib.suppress(OSError):
                os.fsync(handle.fileno())
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
    return line


def entries(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, entry) for every line, checking the chain as it goes."""
    previous = GENESIS
    with Path(path).open() as handle:
        for number, text in enumerate(handle, start=1):
            try:
                entry = json.loads(text)
                claimed = entry["hash"]
                prev = entry["prev"]
            except (ValueError, KeyError, TypeError):
                raise LedgerError(f"{path}, line {number}: not a ledger entry") from None
            if prev != previous:
                raise LedgerError(
                    f"{path}, line {number}: the chain is broken here (prev does not match "
                    "the line before: a line was removed, inserted or reordered)"
                )
            if _digest(entry) != claimed:
                raise LedgerError(f"{path}, line {number}: its content does not match its hash")
            previous = claimed
            yield number, entry


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
    anchor, also the line it names must still end the chain there as it did then."""
    anchored, head = parse_anchor(anchor_text) if anchor_text else (0, GENESIS)
    lines, found = 0, GENESIS
    for lines, entry in entries(path):
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

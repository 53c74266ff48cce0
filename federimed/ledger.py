"""The egress ledger: every reply a hospital sends, written down before it is sent.

JSON lines on the hospital's own volume.  Each line carries ``prev`` (the previous line's
``hash``) and its own ``hash`` (SHA-256 of the line's canonical JSON without ``hash``), so
editing, dropping or reordering a line breaks the chain at that line, and ``verify`` names it.
Appends take an exclusive lock: several ClientApp processes of one hospital may reply at once.
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


def append(path: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """Chain ``entry`` to the last line and write it (fsynced) before the caller sends."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
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


def verify(path: Path) -> int:
    """The number of lines, or :class:`LedgerError` naming the first line that breaks."""
    return sum(1 for _ in entries(path))

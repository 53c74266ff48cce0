"""The model behind the web app: a FederiMed classifier or generative model, loaded once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from federimed.runrecord import SUMMARY_FILE, Provenance, read_provenance
from federimed.tracks import names as track_names
from federimed.tracks import track_for
from federimed.webapp.runs import RunIndex

log = logging.getLogger("federimed.serve")


class ModelFolderError(ValueError):
    """A folder the web app cannot serve, with what it expected there."""


def model_kind(folder: Path) -> str:
    """The track whose saved model ``folder`` holds, decided from its files alone (no weights
    are loaded; each track knows its own: :meth:`federimed.tracks.Track.holds_model`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"--model {folder}: no such folder")
    try:
        kinds = [name for name in track_names() if track_for(name).holds_model(folder)]
    except ValueError as error:  # a file that should say what the folder holds does not read
        raise ModelFolderError(str(error)) from None
    if not kinds:
        expected = "; ".join(track_for(name).model_folder for name in track_names())
        raise ModelFolderError(
            f"--model {folder}: not a FederiMed model folder (expected {expected})"
        )
    return kinds[0]


class Stopped(Exception):
    """Raised from the streamer's callback: the client left, so the generation ends there."""


@dataclass
class Prediction:
    code: str
    name: str
    probability: float


@dataclass
class ServedModel:
    """Loaded once at start-up; requests take turns (one CPU-bound forward pass at a time)."""

    kind: str  # its track
    folder: Path
    provenance: Provenance | None
    model: Any
    tokenizer: Any
    names: dict[str, str]
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def load(cls, folder: Path) -> ServedModel:
        from federimed.data.records import default_labels
        from federimed.learning.model import quiet_libraries

        kind = model_kind(folder)
        quiet_libraries()
        try:
            model, tokenizer = track_for(kind).load_model(Path(folder))
        except RuntimeError as error:  # GeneratorError: the base model is not here
            raise ModelFolderError(str(error)) from None
        return cls(
            kind, Path(folder), read_provenance(Path(folder)), model, tokenizer, default_labels()
        )

    def predict(self, text: str, k: int = 5) -> list[Prediction]:
        from federimed.learning.model import top_diagnoses

        with self.lock:
            top = top_diagnoses(self.model, self.tokenizer, text, k)
        return [Prediction(code, self.names.get(code, ""), p) for code, p in top]

    def answer(
        self,
        question: str,
        max_new_tokens: int,
        on_text: Callable[[str], None],
        stop: threading.Event,
    ) -> bool:
        """The greedy answer, handed to ``on_text`` piece by piece as the model writes it, in
        the caller's thread; True when it was written to its end, False when ``stop`` was set
        (checked while waiting for the model and at every piece: the generation ends there)."""
        while not self.lock.acquire(timeout=0.05):
            if stop.is_set():
                return False
        try:

            def piece(text: str) -> None:
                if stop.is_set():
                    raise Stopped
                on_text(text)

            self._generate(question, max_new_tokens, piece)
            return not stop.is_set()
        except Stopped:
            return False
        finally:
            self.lock.release()

    def _generate(self, question: str, max_new_tokens: int, on_text: Callable[[str], None]):
        from federimed.tracks.generative.decoder import ask

        ask(
            self.model, self.tokenizer, question, max_new_tokens, on_text, list(self.names.values())
        )

    def describe(self) -> dict[str, Any]:
        """The model's identity and provenance, as the API and the pages show it."""
        about: dict[str, Any] = {"kind": self.kind, "folder": self.folder.name}
        if self.provenance is not None:
            about |= self.provenance.model_dump(mode="json")
        return about


class Answer:
    """One answer being written: its own thread (none of anyio's shared pool: streams must not
    starve the synchronous routes), the event that stops it, and the admission place it holds
    until the thread has ended."""

    def __init__(
        self,
        served: ServedModel,
        question: str,
        max_new_tokens: int,
        release: Callable[[], None] = lambda: None,
    ):
        self.served = served
        self.question = question
        self.max_new_tokens = max_new_tokens
        self.release = release
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.completed: bool | None = None  # True: to its end; False: stopped; None: not yet

    async def pieces(self) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | BaseException | None] = asyncio.Queue()

        def put(item: str | BaseException | None) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is reading
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def run() -> None:
            try:
                self.completed = self.served.answer(
                    self.question, self.max_new_tokens, put, self.stop
                )
            except BaseException as error:  # handed to the reader, which raises it
                put(error)
            finally:
                put(None)
                self.release()

        self.thread = threading.Thread(target=run, name="federimed-answer", daemon=True)
        self.thread.start()
        try:
            while (piece := await queue.get()) is not None:
                if isinstance(piece, BaseException):
                    raise piece
                if piece:
                    yield piece
        finally:
            self.stop.set()

    def close(self) -> None:
        """The response ended (or never started): stop the generation; a place never used by
        a thread is given back here, else by the thread as it ends."""
        self.stop.set()
        if self.thread is None:
            self.release()


LATEST = "latest"  # --model latest: the newest completed run's model under --runs


class ModelSource:
    """The model requests are answered with: one folder loaded at start, or (``latest``) the
    newest completed run's ``final/`` under the runs folder, loaded when it appears, so that
    a deployment's web app serves each new global model without a restart."""

    def __init__(self, folder: Path | None, runs: RunIndex):
        self.runs = runs
        self.follow = folder is not None and str(folder) == LATEST
        self.served = ServedModel.load(folder) if folder and not self.follow else None
        self.refused: dict[Path, str] = {}  # newest models that would not load, and why
        self._loading = threading.Lock()

    def current(self) -> ServedModel | None:
        if not self.follow:
            return self.served
        # On every request: the folders and two stat calls each, no run record read.
        newest = next(
            (
                folder / "final"
                for folder in reversed(self.runs.folders().values())
                if (folder / SUMMARY_FILE).is_file() and (folder / "final").is_dir()
            ),
            None,
        )
        if newest is None or newest in self.refused:
            return self.served
        if self.served is None or self.served.folder != newest:
            with self._loading:
                if self.served is None or self.served.folder != newest:
                    self._load(newest)
        return self.served

    def _load(self, folder: Path) -> None:
        """A model that does not load is refused once, with the reason in the log; the
        previous one (if any) goes on answering."""
        try:
            self.served = ServedModel.load(folder)
            log.info("serving %s", folder)
        except Exception as error:  # corrupt weights raise library-specific errors
            self.refused[folder] = str(error)
            log.error("not serving %s: %s", folder, error)

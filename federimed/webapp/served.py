"""The model behind the web app: a FederiMed classifier or generative model, loaded once."""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from federimed.runrecord import SUMMARY_FILE, Provenance, read_provenance
from federimed.webapp.runs import RunIndex

Kind = Literal["classify", "generative"]
log = logging.getLogger("federimed.serve")


class ModelFolderError(ValueError):
    """A folder the web app cannot serve, with what it expected there."""


def model_kind(folder: Path) -> Kind:
    """What a saved FederiMed model folder holds, decided from its files alone (no weights
    are loaded): a classifier has ``federimed.json``; a generative model is a causal LM's
    LoRA adapter (a run's ``final/`` with ``adapter/``, or the adapter folder itself)."""
    from federimed.model import FEDERIMED_META

    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"--model {folder}: no such folder")
    if (folder / FEDERIMED_META).is_file():
        return "classify"
    adapter = folder / "adapter" if (folder / "adapter").is_dir() else folder
    config_file = adapter / "adapter_config.json"
    if config_file.is_file():
        try:
            task = json.loads(config_file.read_text(encoding="utf-8")).get("task_type")
        except (ValueError, AttributeError) as error:
            raise ModelFolderError(
                f"{config_file}: not a readable adapter config: {error}"
            ) from None
        if task == "CAUSAL_LM":
            return "generative"
    raise ModelFolderError(
        f"--model {folder}: not a FederiMed model folder (expected {FEDERIMED_META} of a "
        "classifier, or a causal LM's adapter: a run's final/ folder or the demo's model/)"
    )


@dataclass
class Prediction:
    code: str
    name: str
    probability: float


@dataclass
class ServedModel:
    """Loaded once at start-up; requests take turns (one CPU-bound forward pass at a time)."""

    kind: Kind
    folder: Path
    provenance: Provenance | None
    model: Any
    tokenizer: Any
    names: dict[str, str]
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def load(cls, folder: Path) -> ServedModel:
        from federimed.data.records import default_labels
        from federimed.model import quiet_libraries

        kind = model_kind(folder)
        quiet_libraries()
        if kind == "classify":
            from federimed.model import load_for_inference

            model, tokenizer = load_for_inference(Path(folder))
        else:
            from federimed.decoder import GeneratorError, load_answerer

            try:
                model, tokenizer = load_answerer(Path(folder))
            except GeneratorError as error:
                raise ModelFolderError(str(error)) from None
        return cls(
            kind, Path(folder), read_provenance(Path(folder)), model, tokenizer, default_labels()
        )

    def predict(self, text: str, k: int = 5) -> list[Prediction]:
        from federimed.model import top_diagnoses

        with self.lock:
            top = top_diagnoses(self.model, self.tokenizer, text, k)
        return [Prediction(code, self.names.get(code, ""), p) for code, p in top]

    def answer_stream(self, question: str, max_new_tokens: int) -> Iterator[str]:
        """The greedy answer, piece by piece as the model generates it."""
        from federimed.decoder import ask

        pieces: queue.Queue[str | BaseException | None] = queue.Queue()

        def generate() -> None:
            try:
                with self.lock:
                    ask(self.model, self.tokenizer, question, max_new_tokens, on_text=pieces.put)
            except BaseException as error:  # handed to the reader, which raises it
                pieces.put(error)
            finally:
                pieces.put(None)

        threading.Thread(target=generate, name="federimed-answer", daemon=True).start()
        while (piece := pieces.get()) is not None:
            if isinstance(piece, BaseException):
                raise piece
            if piece:
                yield piece

    def describe(self) -> dict[str, Any]:
        """The model's identity and provenance, as the API and the pages show it."""
        about: dict[str, Any] = {"kind": self.kind, "folder": self.folder.name}
        if self.provenance is not None:
            about |= self.provenance.model_dump(mode="json")
        return about


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

"""What a federation trains: one module per track, one small protocol, one registry.

A track is everything that differs between training a diagnosis classifier and a question
answering language model: the hospital's round, the server's copy of the model, the baselines
a report compares against, its measures, its data files and base model, and how the web app
serves it.  Everything else (the ClientApp, the ServerApp, the hospital's guard, the demo, the
CLI, the web app) asks :func:`track_for` once and calls through :class:`Track`.

A new track is one module with a ``TRACK`` object and one line in ``BUILT_IN`` (or, in one
process, :func:`register`); its files join the app bundle's ``fab-include``, and a hospital
runs it once its own FederiMed knows the name (its guard counts the cases with the hospital's
code, and refuses a track it does not know).  The track modules import their machinery lazily:
the ClientApp, the hospital's guard and the web app load only the parts they call.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from federimed.consortium.global_model import GlobalModel
    from federimed.data.records import Federation
    from federimed.data.synth.config import SynthDataset
    from federimed.runconfig import RunConfig
    from federimed.tracks.hospital_round import NodeIdentity

State = dict[str, "torch.Tensor"]

# name -> the module holding its TRACK; a module is imported the first time its track is asked for
BUILT_IN = {
    "classify": "federimed.tracks.classify",
    "generative": "federimed.tracks.generative",
}
_registered: dict[str, Track] = {}


@dataclass(frozen=True)
class Measures:
    """Which scores a track's report shows (metric keys and how to name them)."""

    headline: str  # per model on the common test set
    headline_name: str
    second: str
    second_name: str
    unseen: str  # the headline on the conditions a hospital never saw
    validation: str  # what each hospital reports of the incoming model, per round
    validation_name: str
    fractions: bool  # the validation measure is a fraction (0-1)
    # every score the report's per-method table shows: (key, column name)
    columns: tuple[tuple[str, str], ...] = ()
    unseen_style: str | None = None  # the headline on notes in a style no hospital writes


class Track(Protocol):
    """What the rest of FederiMed needs from a track."""

    name: str  # the run config's ``track``
    model_key: str  # the run-config key naming its pretrained model (``--model`` sets it)
    test_file: str  # the common test set's file name in a data folder
    api: str  # the web app's endpoint for its models
    sent: str  # what of the model crosses the network, in words (the report says it)
    measures: Measures
    unseen_style_test: bool  # whether the unseen-style test set applies

    # at a hospital: the round, in the ClientApp's process
    def train_round(
        self,
        run: RunConfig,
        node: NodeIdentity,
        global_wire: Mapping[str, torch.Tensor],
        server_round: int,
        proximal_mu: float,
    ) -> tuple[State, dict[str, float]]: ...

    def evaluate_round(
        self, run: RunConfig, node: NodeIdentity, global_wire: Mapping[str, torch.Tensor]
    ) -> dict[str, float]: ...

    # at a hospital: in the guard's process (never sent)
    def count_cases(self, folder: Path) -> tuple[int, int]:
        """(training, validation) cases in a hospital's data folder."""
        ...

    # at the consortium
    def global_model(self, run: RunConfig, out: Path) -> GlobalModel: ...

    # for researchers and operators
    def resolve_base_model(self, name: str) -> str:
        """The pretrained model's name or folder, fetched or converted where it must be."""
        ...

    def write_data(self, dataset: SynthDataset, out: Path) -> list[str]:
        """Write the track's files for a synthetic dataset beside its cases; what was written."""
        ...

    def comparison(
        self,
        federation: Federation,
        run: RunConfig,
        progress: Callable[[str], None],
        feature_caches: Mapping[str, Path] | None,
    ) -> Any:
        """The baselines a report compares the federation with (research.compare)."""
        ...

    # in the web app and the CLI
    model_folder: str  # what a saved model folder of the track holds, in words

    def holds_model(self, folder: Path) -> bool:
        """Whether ``folder`` holds a saved model of this track, from its files alone
        (ValueError: a file that should say so does not read)."""
        ...

    def load_model(self, folder: Path) -> tuple[Any, Any]:
        """A saved model of this track and its tokenizer, ready to answer."""
        ...


class RoundInTaskModule:
    """A track's round at a hospital as plain functions in its ``task_module`` (Flower's
    ``task.py``), imported when the first round starts: the ClientApp loads no other track's
    machinery, and the track's module stays light."""

    task_module: str

    def train_round(
        self,
        run: RunConfig,
        node: NodeIdentity,
        global_wire: Mapping[str, torch.Tensor],
        server_round: int,
        proximal_mu: float,
    ) -> tuple[State, dict[str, float]]:
        task = importlib.import_module(self.task_module)
        return task.train_round(run, node, global_wire, server_round, proximal_mu)

    def evaluate_round(
        self, run: RunConfig, node: NodeIdentity, global_wire: Mapping[str, torch.Tensor]
    ) -> dict[str, float]:
        return importlib.import_module(self.task_module).evaluate_round(run, node, global_wire)


class UnknownTrack(ValueError):
    """A track name no module registers; names the ones that exist."""


def register(track: Track) -> None:
    """Make ``track`` known in this process (a plug-in, a test)."""
    _registered[track.name] = track


def names() -> tuple[str, ...]:
    return tuple(dict.fromkeys([*BUILT_IN, *_registered]))


def track_for(name: str) -> Track:
    """The track called ``name``, its module imported on first use."""
    if name not in _registered:
        if name not in BUILT_IN:
            raise UnknownTrack(f"unknown track {name!r} (known: {', '.join(names())})")
        _registered[name] = importlib.import_module(BUILT_IN[name]).TRACK
    return _registered[name]

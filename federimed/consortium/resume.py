"""Continuing a dead run: its checkpoints, and what may change when it resumes."""

from __future__ import annotations

from pathlib import Path

from flwr.app import ArrayRecord

from federimed.learning.model import (
    to_wire,
)
from federimed.runconfig import RunConfig
from federimed.runrecord import (
    RUN_CONFIG_FILE,
    RoundRecord,
    read_rounds,
    read_run_config,
)


class ResumeError(ValueError):
    """``resume-from`` names a run that cannot be continued; says which and why."""


# What may change when a run is resumed: how long it goes and waits, not what it computes.
RESUMABLE_CHANGES = {
    "resume-from",
    "num-server-rounds",
    "round-timeout",
    "run-deadline",
    "min-nodes",
    "audit-messages",
}


def checkpoint_dir(run_dir: Path, server_round: int) -> Path:
    return run_dir / "checkpoints" / f"round-{server_round}"


def checkpoint_file(run_dir: Path, server_round: int) -> Path:
    """The global model's exchanged weights after ``server_round`` (peft's adapter file)."""
    return checkpoint_dir(run_dir, server_round) / "adapter_model.safetensors"


def resume_point(run: RunConfig) -> tuple[list[RoundRecord], ArrayRecord]:
    """The rounds a dead run completed and its global model after the last of them.

    A round's line in ``rounds.jsonl`` is written after its checkpoint, so the last recorded
    round always has one. The dead run's configuration must match this one's, except for
    what only bounds the run (:data:`RESUMABLE_CHANGES`).
    """
    from safetensors.torch import load_file

    run_id = run.resume_from
    old = Path(run.output_dir) / run_id
    try:
        started = read_run_config(old)
    except ValueError as error:
        raise ResumeError(f"resume-from={run_id}: {error}") from None
    if started is None:
        missing = old / RUN_CONFIG_FILE
        raise ResumeError(f"resume-from={run_id}: {missing} not found (no such run here?)")
    before, now = started.to_flower(), run.to_flower()
    changed = sorted(k for k in now.keys() - RESUMABLE_CHANGES if before[k] != now[k])
    if changed:
        differences = ", ".join(f"{k}: {before[k]!r} -> {now[k]!r}" for k in changed)
        raise ResumeError(f"resume-from={run_id}: the run config differs ({differences})")
    rounds = read_rounds(old)
    if not rounds:
        raise ResumeError(f"resume-from={run_id}: {old} has no completed round to resume from")
    checkpoint = checkpoint_file(old, rounds[-1].round)
    if not checkpoint.is_file():
        raise ResumeError(f"resume-from={run_id}: checkpoint {checkpoint} is missing")
    return rounds, ArrayRecord(to_wire(load_file(checkpoint)))

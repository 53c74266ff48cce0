"""The run's record: one line per round in ``rounds.jsonl``, then ``summary.json``.

The ServerApp writes it as the run goes (a crash at round 3 keeps rounds 1 and 2); the demo's
progress lines, the report and anything else that follows a run read it through these models,
never the logs.  One key style throughout: snake_case.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
)

if TYPE_CHECKING:
    from federimed.runconfig import RunConfig

ROUNDS_FILE = "rounds.jsonl"
SUMMARY_FILE = "summary.json"
FAILURE_FILE = "failure.json"  # instead of the summary, when the ServerApp gave the run up
PROVENANCE_FILE = "provenance.json"


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_R = TypeVar("_R", bound=_Record)


class Scores(_Record):
    """The global model on the consortium's common test set: the classify track's accuracy,
    macro-F1 and loss, or the generative track's multiple-choice accuracy and exact match
    (diagnosis cards), token-F1 (the other cards) and perplexity of the reference answers."""

    accuracy: float | None = None
    macro_f1: float | None = None
    top3_accuracy: float | None = None
    ece: float | None = None  # expected calibration error of the top prediction
    loss: float | None = None
    # the same model on notes in a style no hospital writes in (leave-one-style-out)
    unseen_style_accuracy: float | None = None
    unseen_style_top3_accuracy: float | None = None
    choice_accuracy: float | None = None  # the likeliest of the condition names is right
    exact_match: float | None = None
    token_f1: float | None = None
    perplexity: float | None = None
    num_examples: int

    @model_serializer(mode="wrap")
    def _own_track_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        """A record names only its own track's scores (no nulls for the other track's)."""
        return {key: value for key, value in handler(self).items() if value is not None}

    def describe(self) -> str:
        """The scores in one phrase, for progress lines."""
        if self.accuracy is not None:
            text = f"test accuracy {100 * self.accuracy:.1f}% (macro-F1 {self.macro_f1:.3f})"
            if self.unseen_style_accuracy is not None:
                text += f", {100 * self.unseen_style_accuracy:.1f}% in a style no hospital writes"
            return text
        parts = []
        if self.choice_accuracy is not None:
            parts.append(f"multiple-choice accuracy {100 * self.choice_accuracy:.1f}%")
        if self.exact_match is not None:
            parts.append(f"exact match {100 * self.exact_match:.1f}%")
        if self.token_f1 is not None:
            parts.append(f"token-F1 {self.token_f1:.3f}")
        if self.perplexity is not None:
            parts.append(f"perplexity {self.perplexity:.2f}")
        return "test " + ", ".join(parts)


class Traffic(_Record):
    """Serialized array bytes of one hospital in one round, as sent and as received."""

    bytes_down: int = 0
    bytes_up: int = 0


class RoundRecord(_Record):
    round: int
    # Hospitals by the name their node was enrolled under (node authentication), not by what
    # a reply says.
    participants: list[str]  # hospitals whose training update was aggregated
    dropped: list[str]  # sampled for training, no update in time (silent, gone, or an error)
    # node -> the reason a hospital gave for refusing or failing (no record content: the
    # hospital's runner sends a reason and a code; details stay in its own log)
    errors: dict[str, str] = {}
    # hospital -> why its update arrived but was not aggregated (non-finite, shape, norm bound)
    rejected: dict[str, str] = {}
    train: dict[str, dict[str, float]]  # hospital -> its training metrics (train_loss, ...)
    evaluate: dict[str, dict[str, float]]  # hospital -> metrics of a federated evaluate round
    test: Scores | None  # None when the run has no test set
    traffic: dict[str, Traffic]
    # hospital -> ε (record-level DP, at its policy's δ) the run has spent there after this
    # round, as that hospital's guard reports it; empty for a run without DP-SGD
    epsilon: dict[str, float] = {}
    seconds: float


class RunSummary(_Record):
    run_id: int
    # "completed", or "deadline" when run-deadline ended it early (a run that died has no
    # summary: `federimed submit --resume RUN_ID` continues it)
    status: Literal["completed", "deadline"]
    run_config: dict[str, object]
    rounds_completed: int
    resumed_from: str | None = None  # the dead run this one continued
    updates_rejected: int = 0  # updates that arrived and were dropped by the server's checks
    initial_test: Scores | None
    final_test: Scores | None
    update_bytes: int  # one hospital's update (adapter + head), each way, per round
    trainable_parameters: int
    total_parameters: int
    final_model: str
    wall_seconds: float


def append_round(out: Path, record: RoundRecord) -> None:
    """One line, flushed at once: readers follow the file while the run goes."""
    with (out / ROUNDS_FILE).open("a", encoding="utf-8") as handle:
        handle.write(record.model_dump_json() + "\n")
        handle.flush()


def read_rounds(out: Path) -> list[RoundRecord]:
    """Every complete line of ``rounds.jsonl`` (a line still being written is left for later)."""
    path = out / ROUNDS_FILE
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(True), start=1):
        if not line.endswith("\n"):
            break
        try:
            records.append(RoundRecord.model_validate_json(line))
        except ValidationError as error:
            raise ValueError(f"{path}:{number}: not a round record: {error}") from None
    return records


def _write_whole(path: Path, record: _Record) -> Path:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(record.model_dump_json(indent=2), encoding="utf-8")
    temporary.replace(path)  # readers see a whole record or none
    return path


def _read_whole(path: Path, kind: type[_R], what: str) -> _R | None:
    if not path.is_file():
        return None
    try:
        return kind.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, ValidationError) as error:
        raise ValueError(f"{path}: not a {what}: {error}") from None


def write_summary(out: Path, summary: RunSummary) -> Path:
    return _write_whole(out / SUMMARY_FILE, summary)


def read_summary(out: Path) -> RunSummary | None:
    return _read_whole(out / SUMMARY_FILE, RunSummary, "run summary")


class RunFailure(_Record):
    """Why the ServerApp gave a run up (every hospital refused, a round failed): what the
    dashboard shows instead of leaving the run "in progress".  The reasons carry no record
    content (hospitals send codes and rules, never data)."""

    run_id: int
    reason: str
    rounds_completed: int


def write_failure(out: Path, failure: RunFailure) -> Path:
    return _write_whole(out / FAILURE_FILE, failure)


def read_failure(out: Path) -> RunFailure | None:
    return _read_whole(out / FAILURE_FILE, RunFailure, "run failure record")


class Provenance(_Record):
    """Where a saved model comes from, kept in its folder (a copied model keeps it): what the
    web app shows beside the model's answers."""

    run_id: int
    finished: str  # UTC, ISO 8601
    status: Literal["completed", "deadline"]
    track: str
    base_model: str
    rounds_completed: int
    hospitals: dict[str, int]  # hospital -> examples in its last aggregated update
    final_test: Scores | None


def write_provenance(
    folder: Path, run: RunConfig, summary: RunSummary, rounds: list[RoundRecord]
) -> Path:
    hospitals: dict[str, int] = {}
    for record in rounds:
        for name in record.participants:
            hospitals[name] = int(record.train.get(name, {}).get("num_examples", 0))
    provenance = Provenance(
        run_id=summary.run_id,
        finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        status=summary.status,
        track=run.track,
        base_model=run.base_model,
        rounds_completed=summary.rounds_completed,
        hospitals=dict(sorted(hospitals.items())),
        final_test=summary.final_test,
    )
    return _write_whole(folder / PROVENANCE_FILE, provenance)


def read_provenance(folder: Path) -> Provenance | None:
    return _read_whole(folder / PROVENANCE_FILE, Provenance, "model provenance record")


RUN_CONFIG_FILE = "run_config.json"  # written by the ServerApp when a run starts
REPORT_FILE = "report.json"  # the demo's comparison, beside or above the run's folder


def write_run_config(out: Path, run: RunConfig) -> Path:
    """The run's configuration as Flower gave it (run-config keys), when the run starts."""
    path = out / RUN_CONFIG_FILE
    path.write_text(json.dumps(run.to_flower(), indent=2), encoding="utf-8")
    return path


def read_run_config(out: Path) -> RunConfig | None:
    """The configuration a run started with (None before it started)."""
    from federimed.runconfig import RunConfig

    path = out / RUN_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        return RunConfig.from_flower(json.loads(path.read_text(encoding="utf-8")))
    except ValueError as error:  # not JSON, or a key unknown, missing or ill-typed
        raise ValueError(f"{path}: not a run configuration: {error}") from None


class Setup(_Record):
    """The run a report is about, in the report's words."""

    hospitals: int
    rounds: int
    local_steps: int
    batch_size: int
    learning_rate: float
    track: str
    model: str
    strategy: str
    seed: int
    test_cases: int


class Network(_Record):
    mode: str  # "loopback" or "network namespaces"
    superlink: str  # HOST:PORT
    hospitals: dict[str, str]  # hospital -> its address


Method = dict[str, float]  # one method's scores for one hospital (keys: the track's measures)


class HospitalResult(_Record):
    """One hospital in a report: its data, its traffic, and each method's scores (a method
    the report does not compare is absent)."""

    train_cases: int
    unseen_conditions: list[str]
    bytes_per_round: dict[str, Traffic]  # round -> traffic
    federated: Method | None = None
    local: Method | None = None
    centralized: Method | None = None
    federated_tuned: Method | None = None
    local_tuned: Method | None = None
    centralized_tuned: Method | None = None

    @model_serializer(mode="wrap")
    def _compared_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        return {key: value for key, value in handler(self).items() if value is not None}

    def method(self, name: str) -> Method | None:
        """The scores of method ``name`` (research.measures.METHODS), None when not compared."""
        scores: Method | None = getattr(self, name)
        return scores


class Found(_Record):
    """How one tuned checkpoint was found (research.tuning.Tuned)."""

    learning_rate: float
    best_at: int  # steps, or rounds for the federation
    ran: int
    capped: bool
    validation_accuracy: float
    trials: dict[str, float] = {}  # "equal budget" or a learning rate -> best validation
    seconds: float = 0.0
    equal_budget_seconds: float = 0.0


class TunedMethods(_Record):
    federated: Found
    local: dict[str, Found]  # hospital -> its own search
    centralized: Found


class TuningRecord(_Record):
    """The tuned baselines' search (research.tuning) and what it found per method."""

    continue_factors: list[float]
    patience: int
    cap_factor: float
    methods: TunedMethods


class Report(_Record):
    """``report.json``: the federation against what each hospital could learn alone and
    what pooling every record would give, with the run's record and its costs."""

    # a score that could not be computed (no such case in a test set) is NaN, as written before
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")

    setup: Setup
    tls: bool  # as the SuperLink was started (its command line), not as intended
    supernode_auth: bool
    network: Network
    flower_run_id: int
    flower_run: dict[str, object]  # `flwr ls` of the run, as Flower reports it
    hospitals: dict[str, HospitalResult]
    rounds: dict[str, RoundRecord]  # round -> its record (rounds.jsonl)
    server_evaluation: dict[str, Scores]  # round -> the global model on the common test set
    update_bytes: int
    trainable_parameters: int
    total_parameters: int
    wall_seconds: dict[str, float]  # phase -> seconds
    tuning: TuningRecord | None = None


def write_report(out: Path, report: Report) -> Path:
    return _write_whole(out / REPORT_FILE, report)


def read_report(path: Path) -> Report | None:
    """A demo's report (``path``: the file, or the folder holding it)."""
    path = path / REPORT_FILE if path.is_dir() else path
    return _read_whole(path, Report, "FederiMed report")

"""`federimed demo`: data, certificates, a secured federation, baselines and the report.

The main job of the project, end to end, with every process real and every process stopped
at the end, whatever happens.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from federimed.config import EffectiveConfig, find_app_dir, resolve
from federimed.data.records import Federation
from federimed.data.synth import SynthConfig, generate, write_dataset
from federimed.deploy.flower import COMPLETED
from federimed.deploy.local import FederationState, LocalFederation, deployment_overrides
from federimed.runconfig import RunConfig
from federimed.runrecord import (
    SUMMARY_FILE,
    HospitalResult,
    Network,
    Report,
    RoundRecord,
    RunSummary,
    Setup,
    TunedMethods,
    TuningRecord,
    read_rounds,
    read_summary,
)
from federimed.tracks import track_for

if TYPE_CHECKING:
    from federimed.research.compare import Comparison

# What the demo itself needs only after the federation: torch, transformers, peft (through
# these) and matplotlib, seconds of one core to import.
AFTER_THE_FEDERATION = (
    "federimed.research.compare",
    "federimed.learning.model",
    "federimed.research.report",
)


@dataclass(frozen=True)
class DemoOptions:
    """Where and how the demo runs; the training itself is the run config's business
    (``run_flags``: key -> value overrides from flags, ``run_config``: ``k=v ...`` text)."""

    out: Path
    hospitals: int = 3
    data: Path | None = None
    certs: Path = Path("certs")
    cases_per_hospital: int = 300
    baselines: bool = True
    tuned: bool = True  # the baselines again, each tuned on its own validation data
    timeout: float = 1800
    app_dir: Path | None = None
    netns: str = "auto"  # "auto": own network namespace per hospital where the machine allows
    run_flags: dict[str, Any] = field(default_factory=dict)
    run_config: str = ""


def _synthesize(options: DemoOptions, data: Path, run: RunConfig, say) -> Federation:
    config = SynthConfig(
        hospitals=options.hospitals, seed=run.seed, cases_per_hospital=options.cases_per_hospital
    )
    dataset = generate(config)
    write_dataset(dataset, data)
    track_for(run.track).write_data(dataset, data)
    say(f"synthetic data for {options.hospitals} hospitals in {data}")
    return Federation.from_folder(data, run.track)


def _effective(options: DemoOptions, hospitals: int, data: Path) -> EffectiveConfig:
    """The run configuration, with the local federation's choices, the test set among them
    (which file depends on the track, which the configuration decides)."""

    def resolved(test_path: Path | None) -> EffectiveConfig:
        deployment = deployment_overrides(options.out, hospitals, test_path)
        return resolve(
            app_dir=options.app_dir,
            run_config=options.run_config,
            flags=options.run_flags,
            deployment=deployment,
        )

    return resolved(data / track_for(resolved(None).run.track).test_file)


def round_line(record: RoundRecord, total: int) -> str:
    """One progress line per finished round, from the run's record (not from log lines)."""
    test = record.test.describe() if record.test else "no test set"
    dropped = ", ".join(record.dropped) or "none"
    return (
        f"round {record.round}/{total}: {test}; {len(record.participants)} hospital(s) "
        f"took part, dropped: {dropped}; {record.seconds:.0f} s"
    )


class RoundFollower:
    """Prints each round as its line appears in ``rounds.jsonl``."""

    def __init__(self, run_out: Path, total: int, say):
        self.run_out, self.total, self.say = run_out, total, say
        self.seen = 0

    def __call__(self) -> None:
        records = read_rounds(self.run_out)
        for record in records[self.seen :]:
            self.say(round_line(record, self.total))
        self.seen = len(records)


@dataclass(frozen=True)
class FederatedResult:
    run_id: int
    status: dict[str, Any]
    state: FederationState
    rounds: list[RoundRecord]
    summary: RunSummary
    feature_caches: dict[str, Path]  # each hospital's copy of its frozen layers' output


def run_federation(
    options: DemoOptions, federation: Federation, run: RunConfig, overrides: dict, say
) -> FederatedResult:
    """Start SuperLink + SuperNodes, submit the run with `flwr`, wait, stop everything."""
    local = LocalFederation(
        workdir=options.out,
        certs=options.certs,
        hospitals=federation.hospitals,
        test_path=federation.test_path,
        netns_mode=options.netns,
        say=say,
    )
    with local as running:
        run_id = running.submit(overrides, find_app_dir(options.app_dir))
        say(f"submitted Flower run {run_id}; training...")
        run_out = Path(run.output_dir) / str(run_id)
        status = running.wait_for_run(
            run_id,
            options.timeout,
            done=lambda: (run_out / SUMMARY_FILE).exists(),
            on_tick=RoundFollower(run_out, run.num_server_rounds, say),
        )
    if status.get("status") != COMPLETED:
        raise RuntimeError(
            f"Flower run {run_id} ended as {status.get('status')}; see {options.out / 'logs'}"
        )
    caches = {name: local.feature_cache(name) for name in federation.hospitals}
    summary = read_summary(run_out)
    if summary is None:
        raise RuntimeError(f"Flower run {run_id} completed without a summary in {run_out}")
    return FederatedResult(run_id, status, running.state, read_rounds(run_out), summary, caches)


def clock_printer(started: float):
    """Prints progress with the time since start, so a slow phase shows where it is slow."""

    def say(text: str) -> None:
        minutes, seconds = divmod(int(time.monotonic() - started), 60)
        print(f"[{minutes:02d}:{seconds:02d}] {text}", flush=True)

    return say


def _import_in_background(modules: tuple[str, ...]) -> threading.Thread:
    """Import ``modules`` beside the federation's start, which keeps a core idle much of the
    time (processes starting, waiting for each other), instead of before it.  A failure shows
    again where the module is imported for use."""

    def load() -> None:
        for name in modules:
            importlib.import_module(name)

    thread = threading.Thread(target=load, name="federimed-imports", daemon=True)
    thread.start()
    return thread


def check_pretrained(run: RunConfig) -> None:
    """The track's pretrained model is here, before anything starts: a wrong ``--model``
    would otherwise fail in every hospital's first round, a minute or more later."""
    name = track_for(run.track).resolve_base_model(run.base_model)
    folder = Path(name).expanduser()
    if folder.exists() or name.startswith((".", "/", "~")):
        if not (folder / "config.json").is_file():
            raise ValueError(f"--model {run.base_model}: {folder} is not a model folder (no "
                             "config.json)")  # fmt: skip
    elif os.environ.get("HF_HUB_OFFLINE") == "1":
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            raise ValueError(
                f"--model {run.base_model}: no such folder, and not in the Hugging Face cache "
                "(offline, as hospitals are; HF_HUB_OFFLINE=0 lets it download)"
            )


def run_demo(options: DemoOptions, say=None) -> Report:
    started = time.monotonic()
    say = say or clock_printer(started)
    out = options.out.resolve()
    options = dataclasses.replace(options, out=out)
    # The user's data, or synthetic data in a known layout, made below with the run's seed.
    data = (options.data or out / "data").resolve()
    hospitals = len(Federation.hospital_folders(data)) if options.data else options.hospitals
    effective = _effective(options, hospitals, data)
    run = effective.run
    # Before the imports start in the background: converting SmolLM2 imports torch here, and
    # two threads importing transformers at once can each see it half-imported.
    check_pretrained(run)
    imports = _import_in_background(AFTER_THE_FEDERATION)
    out.mkdir(parents=True, exist_ok=True)
    if options.data:
        federation = Federation.from_folder(data, run.track)
    else:
        federation = _synthesize(options, data, run, say)
    t0 = time.monotonic()
    result = run_federation(options, federation, run, effective.overrides, say)
    seconds = {"federated": time.monotonic() - t0}
    model_dir = out / "model"
    shutil.rmtree(model_dir, ignore_errors=True)
    shutil.copytree(result.summary.final_model, model_dir)

    say("scoring the global model and training the baselines (same code, same budget)")
    imports.join()
    from federimed.learning.model import quiet_libraries
    from federimed.research.report import write_report

    quiet_libraries()
    comparison, model = _comparison(federation, run, result, model_dir, say)
    results = {"federated": comparison.federated(model, model_dir)}
    tuning = None
    if options.baselines:
        if options.tuned:
            checkpoints = round_checkpoints(run, result)
            tuning = tune_baselines(comparison, checkpoints, results, seconds, say)
        if tuning is None:
            results["local"], seconds["local"] = comparison.local_only()
            results["centralized"], seconds["centralized"] = comparison.centralized()
    seconds["total"] = time.monotonic() - started
    report = build_report(run, result, comparison, results, seconds, tuning)
    paths = write_report(report, out)
    say(summary_table(report))
    say(f"report: {paths[-1]}  model: {model_dir}")
    say(f"web app: federimed serve --model {model_dir} --runs {out}  (then http://127.0.0.1:8080/)")
    return report


def _comparison(federation: Federation, run: RunConfig, result: FederatedResult, model_dir, say):
    """The track's baselines, and the federated model as a user loads it from ``model_dir``."""
    track = track_for(run.track)
    comparison = track.comparison(federation, run, say, result.feature_caches)
    return comparison, track.load_model(model_dir)[0]


def round_checkpoints(run: RunConfig, result: FederatedResult) -> list[Path] | None:
    """The real run's global model after each round (the ServerApp's checkpoints), or None
    when the run did not complete all its rounds."""
    from federimed.consortium.resume import checkpoint_file

    if result.summary.rounds_completed != run.num_server_rounds:
        return None
    run_out = Path(run.output_dir) / str(result.run_id)
    return [checkpoint_file(run_out, r) for r in range(1, run.num_server_rounds + 1)]


def tune_baselines(
    comparison, checkpoints: list[Path] | None, results: dict, seconds: dict, say
) -> TuningRecord | None:
    """Each method's equal-budget run, stopped early or continued at a rate its own validation
    data picks (:mod:`federimed.research.tuning`; the federation's from the real run's
    ``checkpoints``): the scores go into ``results``, the local-only and centralized
    equal-budget figures among them; how they were found is returned for the report.  Only the
    classify track; hospitals without validation data skip it (None: the caller trains the
    equal-budget baselines)."""
    from federimed.research.compare import Comparison, checkpoint_states
    from federimed.research.tuning import CAP_FACTOR, CONTINUE_FACTORS, PATIENCE

    if not isinstance(comparison, Comparison):
        say("tuned baselines: the classify track's only; skipped")
        return None
    if comparison.untunable:
        say(f"tuned baselines skipped: no validation data at {', '.join(comparison.untunable)}")
        return None
    say("each method's equal budget, then tuned on its own validation data (length, rate)")
    federation = checkpoints and checkpoint_states(comparison, checkpoints)
    tuning = comparison.tuned(federation or None)
    results |= tuning.scores
    seconds |= tuning.seconds
    return TuningRecord(
        continue_factors=list(CONTINUE_FACTORS),
        patience=PATIENCE,
        cap_factor=CAP_FACTOR,
        methods=TunedMethods.model_validate(tuning.found),
    )


def build_report(
    run: RunConfig,
    result: FederatedResult,
    comparison: Comparison,
    results: dict[str, dict[str, dict[str, float]]],
    seconds: dict[str, float],
    tuning: TuningRecord | None = None,
) -> Report:
    summary, state = result.summary, result.state
    hospitals = {
        name: HospitalResult(
            train_cases=len(cases),
            unseen_conditions=comparison.unseen[name],
            bytes_per_round={
                str(r.round): r.traffic[name] for r in result.rounds if name in r.traffic
            },
            **{method: results[method][name] for method in results},
        )
        for name, cases in comparison.train_sets.items()
    }
    server_evaluation = {"0": summary.initial_test} | {str(r.round): r.test for r in result.rounds}
    setup = Setup(
        hospitals=len(hospitals),
        rounds=run.num_server_rounds,
        local_steps=run.local_steps,
        batch_size=run.batch_size,
        learning_rate=run.learning_rate,
        track=run.track,
        model=run.base_model,
        strategy=run.strategy,
        seed=run.seed,
        test_cases=len(comparison.test),
    )
    return Report(
        setup=setup,
        tls=state.tls,
        supernode_auth=state.node_auth,
        network=Network(mode=state.network, superlink=state.superlink, hospitals=state.hospitals),
        flower_run_id=result.run_id,
        flower_run=result.status,
        hospitals=hospitals,
        rounds={str(r.round): r for r in result.rounds},
        server_evaluation={k: v for k, v in server_evaluation.items() if v is not None},
        update_bytes=summary.update_bytes,
        trainable_parameters=summary.trainable_parameters,
        total_parameters=summary.total_parameters,
        wall_seconds=seconds,
        tuning=tuning,
    )


def summary_table(report: Report) -> str:
    from federimed.research.measures import measures, method_name, methods_in

    shown = measures(report)
    first, second = shown.headline.replace("_", " "), shown.second_name
    rows = ["", f"{'hospital':<12} {'method':<20} {first:>11} {second:>9} {'unseen':>8}"]
    for name, hospital in report.hospitals.items():
        for method in methods_in(report):
            m, label = hospital.method(method) or {}, method_name(method)
            rows.append(
                f"{name:<12} {label:<20} {m.get(shown.headline, float('nan')):>11.3f} "
                f"{m.get(shown.second, float('nan')):>9.3f} "
                f"{m.get(shown.unseen, float('nan')):>8.3f}"
            )
    return "\n".join(rows)

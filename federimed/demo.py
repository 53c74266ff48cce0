"""`federimed demo`: data, certificates, a secured federation, baselines and the report.

The main job of the project, end to end, with every process real and every process stopped
at the end, whatever happens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from federimed.compare import Comparison, Federation
from federimed.data.synth import SynthConfig, generate, write_dataset
from federimed.deploy import netns
from federimed.deploy.certs import ensure_certs
from federimed.deploy.flower import COMPLETED
from federimed.deploy.local import LocalFederation, free_port
from federimed.deploy.processes import ProcessGroup
from federimed.model import load_for_inference
from federimed.report import write_report
from federimed.runconfig import RunConfig

PROGRESS_PATTERNS = (
    re.compile(r"\[ROUND \d+\]"),
    re.compile(r"round \d+: test accuracy"),
    re.compile(r"aggregate_(train|evaluate): Received"),
    re.compile(r"hospital-\S+ (round \d+:|step \d+/\d+ loss)"),
    re.compile(r"(ERROR|Traceback|Exception)"),
)


@dataclass(frozen=True)
class DemoOptions:
    out: Path
    hospitals: int = 3
    rounds: int = 4
    local_steps: int = 15
    model: str = "minilm"
    data: Path | None = None
    certs: Path = Path("certs")
    seed: int = 0
    cases_per_hospital: int = 300
    strategy: str = "fedavg"
    baselines: bool = True
    timeout: float = 1800
    app_dir: Path | None = None
    netns: str = "auto"  # "auto": own network namespace per hospital where the machine allows


def find_app_dir(explicit: Path | None) -> Path:
    """The folder with the Flower app's pyproject.toml (the repo root, or /app in images)."""
    candidates = [explicit] if explicit else [Path(__file__).resolve().parents[1], Path.cwd()]
    for candidate in candidates:
        pyproject = candidate / "pyproject.toml"
        if pyproject.is_file() and "[tool.flwr.app]" in pyproject.read_text():
            return candidate
    raise FileNotFoundError(
        f"no Flower app (pyproject.toml with [tool.flwr.app]) in {candidates}; pass --app DIR"
    )


class LogFollower:
    """Prints the lines of the process logs that tell a person how training goes."""

    def __init__(self, log_dir: Path, say):
        self.log_dir = log_dir
        self.say = say
        self.offsets: dict[Path, int] = {}

    def __call__(self) -> None:
        for log in sorted(self.log_dir.glob("*.log")):
            with log.open("rb") as handle:
                handle.seek(self.offsets.get(log, 0))
                chunk = handle.read()
                self.offsets[log] = handle.tell()
            for line in chunk.decode(errors="replace").splitlines():
                if any(p.search(line) for p in PROGRESS_PATTERNS):
                    self.say(f"  [{log.stem}] {_plain(line)[:160]}")


def _plain(line: str) -> str:
    """Without colour codes and Flower's ``INFO :`` prefix (warnings and errors keep theirs)."""
    line = re.sub(r"\x1b\[[0-9;]*m", "", line).strip()
    return re.sub(r"^INFO\s*:\s*", "", line)


def _prepare_data(options: DemoOptions, say) -> Path:
    if options.data is not None:
        return options.data
    data = options.out / "data"
    config = SynthConfig(
        hospitals=options.hospitals,
        seed=options.seed,
        cases_per_hospital=options.cases_per_hospital,
    )
    write_dataset(generate(config), data)
    say(f"synthetic data for {options.hospitals} hospitals in {data}")
    return data


def use_namespaces(choice: str) -> bool:
    if choice == "off":
        return False
    if netns.available():
        return True
    if choice == "on":
        raise RuntimeError("--netns on needs root and iproute2 (`ip netns add` must work)")
    return False


def run_federation(
    options: DemoOptions, federation: Federation, run_config: dict[str, Any], say
) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """Start SuperLink + SuperNodes, submit the run with `flwr`, wait, stop everything."""
    with contextlib.ExitStack() as stack:
        local = LocalFederation(
            workdir=options.out,
            certs=options.certs,
            hospitals=federation.hospitals,
            port=free_port(),
            client_threads=1,
        )
        network: dict[str, Any] = {"mode": "loopback", "superlink": local.host}
        if use_namespaces(options.netns):
            hosts = stack.enter_context(netns.HospitalHosts())
            for hospital in federation.hospitals:
                hosts.add(hospital)
            local.host, local.hosts = hosts.superlink_address, hosts
            network = {
                "mode": "network namespaces",
                "superlink": local.host,
                "hospitals": dict(hosts.addresses),
            }
        certs = ensure_certs(options.certs, list(federation.hospitals), (local.host,))
        say(
            f"certificates in {options.certs} ({len(certs.created)} created, "
            f"{len(certs.kept)} kept)"
        )
        local.env = {**os.environ, "FLWR_HOME": str(local.flwr_home)}
        group = stack.enter_context(ProcessGroup(options.out / "logs"))
        say(
            f"starting SuperLink on https://{local.address} (TLS, node authentication; "
            f"hospitals on {network['mode']})"
        )
        local.start_superlink(group)
        added = local.enroll_nodes()
        say(
            f"enrolled {len(added)} new SuperNode key(s); starting {len(federation.hospitals)} "
            "SuperNodes"
        )
        local.start_supernodes(group)
        local.wait_for_nodes(group)
        run_id = local.submit(find_app_dir(options.app_dir), run_config)
        say(f"submitted Flower run {run_id}; training...")
        stream = local.follow_logs(run_id, group)
        metrics_file = Path(run_config["output-dir"]) / str(run_id) / "metrics.json"
        status = local.wait_for_run(
            run_id,
            group,
            options.timeout,
            done=lambda: metrics_file.exists() or stream.process.poll() is not None,
            on_tick=LogFollower(options.out / "logs", say),
        )
    if status.get("status") != COMPLETED:
        raise RuntimeError(
            f"Flower run {run_id} ended as {status.get('status')}; see {options.out / 'logs'}"
        )
    return run_id, status, network


def clock_printer(started: float):
    """Prints progress with the time since start, so a slow phase shows where it is slow."""

    def say(text: str) -> None:
        minutes, seconds = divmod(int(time.monotonic() - started), 60)
        print(f"[{minutes:02d}:{seconds:02d}] {text}", flush=True)

    return say


def run_demo(options: DemoOptions, say=None) -> dict[str, Any]:
    started = time.monotonic()
    say = say or clock_printer(started)
    out = options.out.resolve()
    options = dataclasses.replace(options, out=out)
    out.mkdir(parents=True, exist_ok=True)
    data = _prepare_data(options, say)
    federation = Federation.from_folder(data)
    run_config = {
        "model": options.model,
        "num-server-rounds": options.rounds,
        "local-steps": options.local_steps,
        "min-nodes": len(federation.hospitals),
        "strategy": options.strategy,
        "seed": options.seed,
        "test-path": str(federation.test_path.resolve()),
        # Hospitals score each global model inside their training round (see task.py),
        # so a separate evaluate round, one more process start per hospital, is not needed.
        "fraction-evaluate": 0.0,
        "output-dir": str(out / "flower"),
    }
    run = RunConfig.from_flower(run_config)
    t0 = time.monotonic()
    run_id, status, network = run_federation(options, federation, run_config, say)
    seconds = {"federated": time.monotonic() - t0}
    flower_out = out / "flower" / str(run_id)
    metrics = json.loads((flower_out / "metrics.json").read_text())
    model_dir = out / "model"
    shutil.rmtree(model_dir, ignore_errors=True)
    shutil.copytree(flower_out / "final", model_dir)

    say("scoring the global model and training the baselines (same code, same budget)")
    comparison = Comparison(federation, run, progress=say)
    model, _ = load_for_inference(model_dir)
    results = {"federated": comparison.federated(model)}
    if options.baselines:
        results["local"], seconds["local"] = comparison.local_only()
        results["centralized"], seconds["centralized"] = comparison.centralized()
    seconds["total"] = time.monotonic() - started
    report = build_report(run, run_id, status, metrics, comparison, results, seconds)
    report["network"] = network
    paths = write_report(report, out)
    say(summary_table(report))
    say(f"report: {paths[-1]}  model: {model_dir}")
    return report


def build_report(run, run_id, status, metrics, comparison, results, seconds) -> dict:
    hospitals = {}
    for name, cases in comparison.train_sets.items():
        per_round_bytes = {
            r: entry["bytes"].get(name)
            for r, entry in metrics["rounds"].items()
            if entry.get("bytes", {}).get(name)
        }
        hospitals[name] = {
            "train_cases": len(cases),
            "unseen_conditions": comparison.unseen[name],
            "bytes_per_round": per_round_bytes,
            **{method: _rename(results[method][name]) for method in results},
        }
    trainable, total = metrics["trainable_parameters"], metrics["total_parameters"]
    return {
        "setup": {
            "hospitals": len(hospitals),
            "rounds": run.num_server_rounds,
            "local_steps": run.local_steps,
            "batch_size": run.batch_size,
            "model": run.model,
            "strategy": run.strategy,
            "seed": run.seed,
            "test_cases": len(comparison.test),
        },
        "tls": True,
        "supernode_auth": True,
        "flower_run_id": run_id,
        "flower_run": status,
        "hospitals": hospitals,
        "rounds": metrics["rounds"],
        "server_evaluation": metrics["server_evaluation"],
        "update_bytes": metrics["update_bytes"],
        "trainable_parameters": trainable,
        "total_parameters": total,
        "wall_seconds": seconds,
    }


def _rename(metrics: dict[str, float]) -> dict[str, float]:
    return {key.replace("-", "_"): value for key, value in metrics.items()}


def summary_table(report: dict[str, Any]) -> str:
    rows = ["", f"{'hospital':<12} {'method':<12} {'accuracy':>9} {'macro-F1':>9} {'unseen':>8}"]
    for name, hospital in report["hospitals"].items():
        for method in ("federated", "local", "centralized"):
            if method not in hospital:
                continue
            m = hospital[method]
            rows.append(
                f"{name:<12} {method:<12} {m['accuracy']:>9.3f} {m['macro_f1']:>9.3f} "
                f"{m.get('unseen_accuracy', float('nan')):>8.3f}"
            )
    return "\n".join(rows)

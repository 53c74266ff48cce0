"""The headline numbers over several seeds: federated vs local-only vs centralized, at the
equal budget and tuned, on the common test set and on notes in a style no hospital writes.

    .venv/bin/python bench/results.py [--seeds 0 1 2] [--out runs/bench-results]
        [--table docs/results.md]

Per seed: the demo's synthetic consortium drawn with that seed (so the held-out style, the
label skew and the unseen conditions change too), the demo's run configuration with that seed,
and every method of `federimed demo`'s report computed in one process.  The federation's
equal-budget model is FedAvg with the ClientApps' code, batches and seeds (what the real
federation computes, without starting one per seed).  One JSON line per seed goes to
``--out``/results.jsonl; the table of means and spreads is written to ``--table``
(``--table-only``: from the lines already recorded).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from federimed.config import resolve
from federimed.data.records import Federation
from federimed.data.synth import SynthConfig, generate, write_dataset
from federimed.learning.model import quiet_libraries
from federimed.research.compare import Comparison
from federimed.research.measures import METHODS, method_name

SCORES = (
    ("accuracy", "top-1"),
    ("top3_accuracy", "top-3"),
    ("ece", "ECE"),
    ("unseen_accuracy", "top-1, unseen conditions"),
    ("unseen_style_accuracy", "top-1, unseen style"),
    ("unseen_style_top3_accuracy", "top-3, unseen style"),
)


def mean_over_hospitals(per_hospital: dict[str, dict[str, float]]) -> dict[str, float]:
    """Each score averaged over hospitals (the common test set's scores are the same at every
    hospital for a shared model; a hospital's unseen conditions and local model are its own)."""
    keys = {key for scores in per_hospital.values() for key in scores}
    return {
        key: statistics.fmean(s[key] for s in per_hospital.values() if key in s) for key in keys
    }


def run_seed(seed: int, out: Path, say) -> dict:
    data = out / f"seed-{seed}" / "data"
    dataset = generate(SynthConfig(hospitals=3, seed=seed))
    write_dataset(dataset, data)
    run = resolve(flags={"seed": seed}, environ={}).run
    started = time.monotonic()
    comparison = Comparison(Federation.from_folder(data), run, progress=say)
    tuning = comparison.tuned()  # the equal-budget figures are the first part of each search
    return {
        "seed": seed,
        "held_out_style": dataset.held_out_style,
        "scores": {method: mean_over_hospitals(tuning.scores[method]) for method in METHODS},
        "tuning": tuning.found,
        "seconds": round(time.monotonic() - started),
    }


def _cell(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    spread = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {spread:.1f}"


def table(lines: list[dict]) -> str:
    run = resolve(environ={}).run  # the seeds' runs differ from it only in their seed
    budget = f"{run.num_server_rounds} rounds x {run.local_steps} steps per hospital"
    seeds = ", ".join(str(line["seed"]) for line in lines)
    styles = ", ".join(f"{line['seed']}: {line['held_out_style']}" for line in lines)
    rows = [
        "# Results over seeds",
        "",
        f"Written by `bench/results.py` (seeds {seeds}; held-out style per seed: {styles}). "
        "Mean ± standard deviation over seeds, in percent; each seed draws its own consortium "
        "(label skew, unseen conditions, held-out style) and its own model initialisation and "
        "batches. Scores of a hospital's own model (local-only) and on a hospital's unseen "
        "conditions are averaged over its hospitals first. ECE: expected calibration error "
        "(lower is better).",
        "",
        "| method | " + " | ".join(name for _, name in SCORES) + " |",
        "|---|" + "---|" * len(SCORES),
    ]
    for method in METHODS:
        cells = [_cell([line["scores"][method][key] for line in lines]) for key, _ in SCORES]
        rows.append(f"| {method_name(method)} | " + " | ".join(cells) + " |")
    rows += [
        "",
        "Where each tuned checkpoint was (steps per hospital for local-only, total steps for "
        f"centralized, rounds for federated; the equal budget is {budget}) and the learning "
        "rate it was last trained at: the run's within the equal budget, then the rate of the "
        "continuation it came from (`federimed/research/tuning.py`):",
        "",
        "| seed | federated: rate, best round | centralized: rate, best step | local-only: "
        "rate, best step per hospital |",
        "|---|---|---|---|",
    ]
    for line in lines:
        tuning = line["tuning"]
        local = "; ".join(f"{f['learning_rate']}, {f['best_at']}" for f in tuning["local"].values())
        rows.append(
            f"| {line['seed']} | {tuning['federated']['learning_rate']}, "
            f"{tuning['federated']['best_at']} | {tuning['centralized']['learning_rate']}, "
            f"{tuning['centralized']['best_at']} | {local} |"
        )
    return "\n".join(rows) + "\n"


# What follows this line in the table's file is written by hand (the levers' measurements,
# each with its own command) and kept when the table is written again.
KEPT = "<!-- written by hand below: kept by bench/results.py -->"


def write_table(path: Path, text: str) -> None:
    old = path.read_text() if path.is_file() else ""
    kept = old[old.index(KEPT) :] if KEPT in old else ""
    path.write_text(text + ("\n" + kept if kept else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-results"))
    parser.add_argument("--table", type=Path, default=Path("docs/results.md"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--table-only",
        action="store_true",
        help="only write the table again from the lines already in --out/results.jsonl",
    )
    args = parser.parse_args()
    if args.table_only:
        recorded = (args.out / "results.jsonl").read_text().splitlines()
        write_table(args.table, table([json.loads(line) for line in recorded]))
        return
    quiet_libraries()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    def say(text: str) -> None:
        print(f"[{time.monotonic() - started:7.0f} s] {text}", flush=True)

    lines = []
    for seed in args.seeds:
        line = run_seed(seed, args.out, say)
        say(json.dumps(line["scores"]["federated"]))
        with (args.out / "results.jsonl").open("a") as handle:
            handle.write(json.dumps(line) + "\n")
        lines.append(line)
    write_table(args.table, table(lines))
    say(f"table: {args.table}")


if __name__ == "__main__":
    main()

"""What record-level DP-SGD costs and buys: the privacy-utility curve, a membership-inference
check, and the step time and memory against training without it.

    .venv/bin/python bench/privacy.py [--seeds 0 1 2] [--epsilons 1 3 8 inf]
        [--out runs/bench-privacy]

Per seed: the demo's synthetic consortium drawn with that seed and the demo's run config.  For
each target ε (δ = 1e-5, below 1/N at every hospital) the run's ``dp-noise-multiplier`` is the
smallest σ that keeps *every* hospital at or under the target after the whole run (the
smallest hospital samples each case most often, so it spends most): what a consortium would
put in the run config for every hospital's guard to admit it.  Then, in one process with the
ClientApps' code (bench/results.py does the same without DP):

- the federated model (FedAvg, equal budget) and each hospital's local-only model, scored on
  the common test set (top-1, top-3) and on notes in a style no hospital writes;
- a loss-threshold membership-inference attack (Yeom et al. 2018): AUC of "lower loss means
  member" on a hospital's training cases against its validation cases (same distribution,
  never trained on), for the federated model and for hospital-1's local-only model (the one
  that sees its cases most: the strongest case for the attacker);
- the cost: seconds per step and the peak resident memory of one hospital's 15 local steps.

One JSON line per (seed, ε) goes to ``--out``/privacy.jsonl; ``--table`` prints the means.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from federimed.config import resolve
from federimed.data.records import Federation, load_hospital
from federimed.data.synth import SynthConfig, generate, write_dataset
from federimed.hospital.privacy import Mechanism, noise_for_epsilon
from federimed.learning.batching import Encoded, pick_device
from federimed.learning.model import quiet_libraries
from federimed.learning.training import predict_proba, train
from federimed.research.compare import Comparison

DELTA = 1e-5


def auc(members: np.ndarray, others: np.ndarray) -> float:
    """P(a member's score > a non-member's), ties half: the Mann-Whitney form of ROC AUC."""
    scores = np.concatenate([members, others])
    ranks = scores.argsort().argsort().astype(float) + 1
    for value in np.unique(scores):  # average the ranks of ties
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    wins = ranks[: len(members)].sum() - len(members) * (len(members) + 1) / 2
    return float(wins / (len(members) * len(others)))


def case_losses(model: torch.nn.Module, data: Encoded) -> np.ndarray:
    proba = predict_proba(model, data, pick_device())
    return -np.log(proba[np.arange(len(data)), data.labels.numpy()] + 1e-12)


def membership_auc(model: torch.nn.Module, members: Encoded, others: Encoded) -> float:
    """The attack scores a case by its negative loss: members are fitted better."""
    return auc(-case_losses(model, members), -case_losses(model, others))


def noise_for_every_hospital(target: float, cases: list[int], run) -> float:
    """The σ for which the hospital that spends most (fewest cases) stays within ``target``."""
    rate = min(1.0, run.batch_size / min(cases))
    return noise_for_epsilon(target, rate, run.local_steps * run.num_server_rounds, DELTA)


class PeakMemory:
    """The largest resident set size seen while the block runs (sampled every 10 ms)."""

    def __enter__(self) -> PeakMemory:
        self.process, self.peak, self._done = psutil.Process(), 0, threading.Event()
        self.base = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.01):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    @property
    def added_mb(self) -> float:
        return max(0, self.peak - self.base) / 2**20


def cost(comparison: Comparison, run, hospital: str) -> dict[str, float]:
    """Seconds per step and the memory the steps add, for one hospital's round."""
    model = comparison._fresh_model()
    settings = run.train_settings(seed=run.seed)
    started = time.perf_counter()
    with PeakMemory() as memory:
        train(model, comparison.encoded[hospital], settings, pick_device())
    return {
        "seconds_per_step": (time.perf_counter() - started) / settings.steps,
        "added_memory_mb": memory.added_mb,
    }


def mean(per_hospital: dict[str, dict[str, float]], key: str) -> float:
    return statistics.fmean(scores[key] for scores in per_hospital.values() if key in scores)


def run_target(comparison: Comparison, base, target: float, cases: dict[str, int], say) -> dict:
    sigma = (
        0.0 if math.isinf(target) else noise_for_every_hospital(target, list(cases.values()), base)
    )
    run = base.model_copy(update={"dp_noise_multiplier": sigma})
    comparison.run = run
    epsilons = {
        name: Mechanism.for_hospital(sigma, run.batch_size, n, run.local_steps).epsilon(
            run.num_server_rounds, DELTA
        )
        for name, n in cases.items()
    }
    say(f"target ε={target}: σ={sigma:.3f}, ε per hospital {epsilons}")
    federated = comparison.federated_model()
    federated_scores = comparison._score(federated)
    local_scores, _ = comparison.local_only()
    first = next(iter(comparison.encoded))
    alone = comparison._fresh_model()
    train(
        alone,
        comparison.encoded[first],
        run.train_settings(steps=comparison.steps_per_hospital, seed=run.seed),
        pick_device(),
    )
    attack = {
        "federated": statistics.fmean(
            membership_auc(federated, comparison.encoded[name], comparison.validation[name])
            for name in comparison.validation
        ),
        "local_hospital_1": membership_auc(
            alone, comparison.encoded[first], comparison.validation[first]
        ),
    }
    return {
        "target_epsilon": None if math.isinf(target) else target,
        "noise_multiplier": sigma,
        "epsilon": {k: (None if math.isinf(v) else v) for k, v in epsilons.items()},
        "federated": {
            key: mean(federated_scores, key)
            for key in ("accuracy", "top3_accuracy", "unseen_style_accuracy")
        },
        "local": {
            key: mean(local_scores, key)
            for key in ("accuracy", "top3_accuracy", "unseen_style_accuracy")
        },
        "membership_auc": attack,
        "cost": cost(comparison, run, first),
    }


def run_seed(seed: int, targets: list[float], out: Path, say) -> list[dict]:
    data = out / f"seed-{seed}" / "data"
    write_dataset(generate(SynthConfig(hospitals=3, seed=seed)), data)
    federation = Federation.from_folder(data)
    base = resolve(flags={"seed": seed}, environ={}).run
    cases = {name: len(load_hospital(path).train) for name, path in federation.hospitals.items()}
    comparison = Comparison(federation, base, progress=lambda text: None)
    lines = []
    for target in targets:
        started = time.monotonic()
        line = {"seed": seed} | run_target(comparison, base, target, cases, say)
        line["seconds"] = round(time.monotonic() - started)
        say(json.dumps(line))
        lines.append(line)
    return lines


def table(lines: list[dict]) -> str:
    """Markdown: per target ε, the means (± standard deviation) over seeds."""
    rows = [
        "| target ε | σ | federated top-1 | top-3 | unseen style | local-only top-1 | "
        "MIA AUC federated | MIA AUC local | s/step | +MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    targets = sorted({line["target_epsilon"] or math.inf for line in lines})
    for target in targets:
        picked = [line for line in lines if (line["target_epsilon"] or math.inf) == target]

        def cell(get, digits: int = 3, picked: list[dict] = picked) -> str:
            values = [get(line) for line in picked]
            spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
            return f"{statistics.fmean(values):.{digits}f}{spread}"

        rows.append(
            f"| {'∞' if math.isinf(target) else f'{target:g}'} "
            f"| {cell(lambda x: x['noise_multiplier'], 2)} "
            f"| {cell(lambda x: x['federated']['accuracy'])} "
            f"| {cell(lambda x: x['federated']['top3_accuracy'])} "
            f"| {cell(lambda x: x['federated']['unseen_style_accuracy'])} "
            f"| {cell(lambda x: x['local']['accuracy'])} "
            f"| {cell(lambda x: x['membership_auc']['federated'])} "
            f"| {cell(lambda x: x['membership_auc']['local_hospital_1'])} "
            f"| {cell(lambda x: x['cost']['seconds_per_step'], 2)} "
            f"| {cell(lambda x: x['cost']['added_memory_mb'], 0)} |"
        )
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1, 3, 8, math.inf])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-privacy"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--table", action="store_true", help="print the table of recorded lines")
    args = parser.parse_args()
    recorded = args.out / "privacy.jsonl"
    if args.table:
        print(table([json.loads(line) for line in recorded.read_text().splitlines()]))
        return
    quiet_libraries()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    def say(text: str) -> None:
        print(f"[{time.monotonic() - started:7.0f} s] {text}", flush=True)

    for seed in args.seeds:
        for line in run_seed(seed, args.epsilons, args.out, say):
            with recorded.open("a") as handle:
                handle.write(json.dumps(line) + "\n")
    print(table([json.loads(line) for line in recorded.read_text().splitlines()]))


if __name__ == "__main__":
    main()

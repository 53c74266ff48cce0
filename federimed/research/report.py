"""report.json, a Markdown report and its plots: what each hospital gained by federating."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from federimed import runrecord
from federimed.research.measures import Measures, measures, method_name, methods_in
from federimed.runrecord import HospitalResult, Report, RoundRecord, Scores
from federimed.tracks import track_for

# Scores that are not fractions: shown as numbers, not percentages.
NOT_FRACTIONS = {"perplexity", "unseen_perplexity"}


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.1f}%"


def _cell(metrics: dict[str, float], key: str) -> str:
    value = metrics.get(key)
    if key in NOT_FRACTIONS and value is not None and not math.isnan(value):
        return f"{value:.1f}"
    return _fmt(value)


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_rounds(report: Report, out: Path) -> Path:
    """The global model per round: on each hospital's validation data and the test set.

    Hospitals score the global model they receive at the start of each round, so round r
    shows the model after r - 1 rounds of aggregation.
    """
    shown = measures(report)
    fig, ax = plt.subplots(figsize=(6, 4))
    rounds = sorted(report.rounds.values(), key=lambda r: r.round)
    for hospital in report.hospitals:
        points = [
            (r.round - 1, r.train[hospital][shown.validation])
            for r in rounds
            if shown.validation in r.train.get(hospital, {})
        ]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=f"{hospital} (validation)")
    server = {int(number): scores for number, scores in report.server_evaluation.items()}
    if server and shown.fractions:  # the test set's headline is on the validation's scale
        for key, line, marker, label in (
            (shown.headline, "k--", "s", "common test set"),
            (shown.unseen_style, "k:", "^", "test notes in a style no hospital writes"),
        ):
            found = {n: _test_score(scores, key) for n, scores in server.items()}
            scored = sorted((n, v) for n, v in found.items() if v is not None)
            if scored:
                ax.plot(*zip(*scored, strict=True), line, marker=marker, label=label)
    ax.set(
        xlabel="rounds of aggregation",
        ylabel=shown.validation_name,
        ylim=(0, 1) if shown.fractions else None,
        title="Global model per round",
    )
    ax.legend(fontsize=8)
    return _save(fig, out / "accuracy_per_round.png")


def _test_score(scores: Scores | None, key: str | None) -> float | None:
    """The test score ``key`` names, None where the track has no such score or none was made."""
    return getattr(scores, key, None) if scores is not None and key else None


def plot_comparison(report: Report, out: Path) -> Path:
    """Federated vs local vs centralized, per hospital: all conditions and unseen ones."""
    shown = measures(report)
    hospitals = list(report.hospitals)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    methods = methods_in(report)
    width = 0.8 / len(methods)
    for ax, key, title in (
        (axes[0], shown.headline, f"All conditions ({shown.headline_name})"),
        (axes[1], shown.unseen, "Conditions the hospital never saw"),
    ):
        for i, method in enumerate(methods):
            values = [_score(report.hospitals[h], method, key) for h in hospitals]
            xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(hospitals))]
            ax.bar(
                xs, [0 if math.isnan(v) else v for v in values], width, label=method_name(method)
            )
        ax.set_xticks(range(len(hospitals)), hospitals)
        ax.set(title=title, ylim=(0, 1))
    axes[0].set_ylabel(shown.headline_name)
    axes[0].legend(fontsize=7)
    return _save(fig, out / "comparison.png")


def _score(hospital: HospitalResult, method: str, key: str) -> float:
    return (hospital.method(method) or {}).get(key, math.nan)


def round_overhead(record: RoundRecord) -> float | None:
    """Round wall time / the slowest hospital's compute seconds (None when not reported)."""
    compute = [m["compute_seconds"] for m in record.train.values() if "compute_seconds" in m]
    return record.seconds / max(compute) if compute and max(compute) > 0 else None


def _round_rows(rounds: dict[str, RoundRecord], shown: Measures) -> list[str]:
    """One line per round from the run record: a hospital that was away shows here."""
    rows = []
    for r in sorted(rounds.values(), key=lambda r: r.round):
        rejected = ", ".join(f"{h} ({why})" for h, why in r.rejected.items())
        styled = f" | {_fmt(_test_score(r.test, shown.unseen_style))}" if shown.unseen_style else ""
        overhead = round_overhead(r)
        rows.append(
            f"| {r.round} | {', '.join(r.participants) or 'none'} "
            f"| {', '.join(r.dropped) or '-'} | {rejected or '-'} "
            f"| {_fmt(_test_score(r.test, shown.headline))}{styled} "
            f"| {r.seconds:.0f} | {'n/a' if overhead is None else f'{overhead:.2f}'} |"
        )
    return rows


def _tuning_lines(report: Report) -> list[str]:
    """How each tuned figure was found (learning rate, steps, whether the cap stopped it), and
    whether the pooled model is the upper bound it is meant to be."""
    tuning = report.tuning
    if not tuning:
        return []
    unit = {"federated": "rounds", "local": "steps", "centralized": "steps"}
    lines = [
        "## Tuned baselines",
        "",
        "Each method's equal-budget run, validated after each round's worth of training, then "
        "continued from its end at "
        f"{' and '.join(map(str, tuning.continue_factors))} x the run's learning rate, "
        f"each until {tuning.patience} validation checks bring no improvement, at most "
        f"{tuning.cap_factor} x the equal budget in all; the checkpoint with the best "
        "validation accuracy is scored (one within the equal budget when stopping early is "
        "best). Local-only: each hospital's own validation data; centralized: the pooled "
        "validation data; federated: the real run's rounds, continued as FedAvg computed in one "
        "process with the ClientApps' code, batches and seeds, on the hospitals' validation "
        "scores averaged as the federation sees them. Equal budget: "
        f"{report.setup.rounds} rounds x {report.setup.local_steps} steps per "
        "hospital; local-only gets its hospital's steps, centralized the federation's total. "
        "The learning rate is the one the chosen checkpoint was last trained at.",
        "",
        "| method | who | learning rate | best at | ran | stopped by | validation accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    searched = tuning.methods
    entries = [
        ("federated", "all hospitals", searched.federated),
        *[("local", name, found) for name, found in searched.local.items()],
        ("centralized", "all hospitals", searched.centralized),
    ]
    for method, who, f in entries:
        lines.append(
            f"| {method} | {who} | {f.learning_rate} | {f.best_at} {unit[method]} "
            f"| {f.ran} | {'the cap' if f.capped else 'no improvement'} "
            f"| {_fmt(f.validation_accuracy)} |"
        )
    lines += ["", upper_bound_sentence(report), ""]
    return lines


def upper_bound_sentence(report: Report) -> str:
    """Whether centralized, tuned, beats federated, tuned, on the common test set (the same
    figure for every hospital), and by how much."""
    first = next(iter(report.hospitals.values()))
    central = (first.centralized_tuned or {}).get("accuracy")
    federated = (first.federated_tuned or {}).get("accuracy")
    if central is None or federated is None:
        return ""
    gap = 100 * (central - federated)
    if gap >= 0:
        return (
            f"Tuned, the pooled model is the upper bound: top-1 {_fmt(central)} against the "
            f"federation's {_fmt(federated)} ({gap:.1f} points)."
        )
    return (
        f"Tuned, the federation beats the pooled model by {-gap:.1f} points of top-1 "
        f"({_fmt(federated)} against {_fmt(central)}). One seed moves these figures by several "
        "points (docs/results.md has the spread over seeds); where the gap is larger than that, "
        "averaging hospitals' updates acts as a regulariser on small, skewed data sets."
    )


def _privacy_lines(rounds: dict[str, RoundRecord]) -> list[str]:
    """Each hospital's ε for the run (record-level DP-SGD), as its guard reported it in the
    last round it trained; nothing for a run without DP."""
    spent: dict[str, float] = {}
    for record in sorted(rounds.values(), key=lambda r: r.round):
        spent |= record.epsilon
    if not spent:
        return []
    return [
        "## Differential privacy",
        "",
        "ε each hospital's guard accounted for this run (DP-SGD at the δ of its own site "
        "policy; docs/privacy.md):",
        "",
        "| hospital | ε |",
        "|---|---|",
        *[f"| {name} | {epsilon:.2f} |" for name, epsilon in sorted(spent.items())],
        "",
    ]


def write_markdown(report: Report, out: Path) -> Path:
    setup = report.setup
    shown = measures(report)
    sent = track_for(setup.track).sent
    lines = [
        f"# FederiMed run `{out.name}`",
        "",
        f"{len(report.hospitals)} hospitals, {setup.rounds} rounds x "
        f"{setup.local_steps} local steps, model `{setup.model}`, strategy "
        f"`{setup.strategy}`. TLS: {report.tls}, SuperNode authentication: "
        f"{report.supernode_auth}, Flower run id: {report.flower_run_id}.",
        "",
        "## What each hospital gains",
        "",
        "| hospital | train examples | unseen conditions | method | "
        + " | ".join(name for _, name in shown.columns)
        + " |",
        "|---|---|---|---|" + "---|" * len(shown.columns),
    ]
    for name, hospital in report.hospitals.items():
        for method in methods_in(report):
            m = hospital.method(method) or {}
            lines.append(
                f"| {name} | {hospital.train_cases} | {len(hospital.unseen_conditions)} "
                f"| {method_name(method)} | "
                + " | ".join(_cell(m, key) for key, _ in shown.columns)
                + " |"
            )
    lines += [
        "",
        *_tuning_lines(report),
        "",
        "![comparison](comparison.png)",
        "",
        "![accuracy per round](accuracy_per_round.png)",
        "",
        "## Who took part in each round",
        "",
        "Overhead is the round's wall time over the slowest hospital's compute (scoring and "
        "training): what process starts, loading and the network add.",
        "",
        f"| round | took part | dropped | update rejected | {shown.headline_name} "
        + ("| in the unseen style " if shown.unseen_style else "")
        + "| seconds | overhead |",
        "|---|---|---|---|---|---|---|" + ("---|" if shown.unseen_style else ""),
        *_round_rows(report.rounds, shown),
        "",
        *_privacy_lines(report.rounds),
        "## Traffic and time",
        "",
        f"Each round a hospital downloads and uploads {report.update_bytes:,} bytes of "
        f"weights ({sent}, {report.trainable_parameters:,} of "
        f"{report.total_parameters:,} parameters; the whole model in float32 would be "
        f"{4 * report.total_parameters:,} bytes); no text leaves a hospital.",
        "",
        "| phase | seconds |",
        "|---|---|",
        *[f"| {k} | {v:.0f} |" for k, v in report.wall_seconds.items()],
        "",
        "Logs of every process are in `logs/`; the final global model is in `model/`.",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_report(report: Report, out: Path) -> list[Path]:
    return [
        runrecord.write_report(out, report),
        plot_rounds(report, out),
        plot_comparison(report, out),
        write_markdown(report, out),
    ]

"""report.json, a Markdown report and its plots: what each hospital gained by federating."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

METHODS = ("federated", "local", "centralized")


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


MEASURES = {
    "classify": Measures(
        "accuracy", "test accuracy", "macro_f1", "macro-F1", "unseen_accuracy",
        "val_accuracy", "accuracy", fractions=True,
    ),
    "generative": Measures(
        "exact_match", "diagnosis exact match", "token_f1", "token-F1", "unseen_exact_match",
        "val_loss", "loss per answer token", fractions=False,
    ),
}  # fmt: skip


def measures(report: dict[str, Any]) -> Measures:
    return MEASURES[report["setup"].get("track", "classify")]


def methods_in(report: dict[str, Any]) -> list[str]:
    """The methods this report has results for (``--no-baselines``: federated only)."""
    first = next(iter(report["hospitals"].values()), {})
    return [method for method in METHODS if method in first]


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.1f}%"


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_json(report: dict[str, Any], out: Path) -> Path:
    path = out / "report.json"
    path.write_text(json.dumps(report, indent=2, allow_nan=True))
    return path


def plot_rounds(report: dict[str, Any], out: Path) -> Path:
    """The global model per round: on each hospital's validation data and the test set.

    Hospitals score the global model they receive at the start of each round, so round r
    shows the model after r - 1 rounds of aggregation.
    """
    shown = measures(report)
    fig, ax = plt.subplots(figsize=(6, 4))
    rounds = report.get("rounds", {})
    numbers = sorted(int(r) for r in rounds)
    for hospital in report["hospitals"]:
        points = [
            (r - 1, rounds[str(r)]["train"][hospital][shown.validation])
            for r in numbers
            if shown.validation in rounds[str(r)].get("train", {}).get(hospital, {})
        ]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=f"{hospital} (validation)")
    server = report.get("server_evaluation", {})
    if server and shown.fractions:  # the test set's headline is on the validation's scale
        keys = sorted(int(r) for r in server)
        ax.plot(
            keys,
            [server[str(r)][shown.headline] for r in keys],
            "k--",
            marker="s",
            label="common test set",
        )
    ax.set(
        xlabel="rounds of aggregation",
        ylabel=shown.validation_name,
        ylim=(0, 1) if shown.fractions else None,
        title="Global model per round",
    )
    ax.legend(fontsize=8)
    return _save(fig, out / "accuracy_per_round.png")


def plot_comparison(report: dict[str, Any], out: Path) -> Path:
    """Federated vs local vs centralized, per hospital: all conditions and unseen ones."""
    shown = measures(report)
    hospitals = list(report["hospitals"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    methods = methods_in(report)
    width = 0.8 / len(methods)
    for ax, key, title in (
        (axes[0], shown.headline, f"All conditions ({shown.headline_name})"),
        (axes[1], shown.unseen, "Conditions the hospital never saw"),
    ):
        for i, method in enumerate(methods):
            values = [report["hospitals"][h][method].get(key, float("nan")) for h in hospitals]
            xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(hospitals))]
            ax.bar(xs, [0 if math.isnan(v) else v for v in values], width, label=method)
        ax.set_xticks(range(len(hospitals)), hospitals)
        ax.set(title=title, ylim=(0, 1))
    axes[0].set_ylabel(shown.headline_name)
    axes[0].legend()
    return _save(fig, out / "comparison.png")


def round_overhead(record: dict[str, Any]) -> float | None:
    """Round wall time / the slowest hospital's compute seconds (None when not reported)."""
    compute = [m["compute_seconds"] for m in record["train"].values() if "compute_seconds" in m]
    return record["seconds"] / max(compute) if compute and max(compute) > 0 else None


def _round_rows(rounds: dict[str, dict[str, Any]], headline: str) -> list[str]:
    """One line per round from the run record: a hospital that was away shows here."""
    rows = []
    for number in sorted(rounds, key=int):
        r = rounds[number]
        rejected = ", ".join(f"{h} ({why})" for h, why in r.get("rejected", {}).items())
        test = (r.get("test") or {}).get(headline)
        overhead = round_overhead(r)
        rows.append(
            f"| {number} | {', '.join(r['participants']) or 'none'} "
            f"| {', '.join(r['dropped']) or '-'} | {rejected or '-'} | {_fmt(test)} "
            f"| {r['seconds']:.0f} | {'n/a' if overhead is None else f'{overhead:.2f}'} |"
        )
    return rows


def write_markdown(report: dict[str, Any], out: Path) -> Path:
    setup = report["setup"]
    shown = measures(report)
    sent = "LoRA adapter + head" if shown is MEASURES["classify"] else "LoRA adapter"
    lines = [
        f"# FederiMed run `{out.name}`",
        "",
        f"{len(report['hospitals'])} hospitals, {setup['rounds']} rounds x "
        f"{setup['local_steps']} local steps, model `{setup['model']}`, strategy "
        f"`{setup['strategy']}`. TLS: {report.get('tls')}, SuperNode authentication: "
        f"{report.get('supernode_auth')}, Flower run id: {report.get('flower_run_id')}.",
        "",
        "## What each hospital gains",
        "",
        f"| hospital | train examples | unseen conditions | method | {shown.headline_name} "
        f"| {shown.second_name} | {shown.headline_name} on unseen |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, hospital in report["hospitals"].items():
        for method in methods_in(report):
            m = hospital[method]
            lines.append(
                f"| {name} | {hospital['train_cases']} | {len(hospital['unseen_conditions'])} "
                f"| {method} | {_fmt(m.get(shown.headline))} | {_fmt(m.get(shown.second))} "
                f"| {_fmt(m.get(shown.unseen))} |"
            )
    lines += [
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
        f"| round | took part | dropped | update rejected | {shown.headline_name} | seconds "
        "| overhead |",
        "|---|---|---|---|---|---|---|",
        *_round_rows(report.get("rounds", {}), shown.headline),
        "",
        "## Traffic and time",
        "",
        f"Each round a hospital downloads and uploads {report['update_bytes']:,} bytes of "
        f"weights ({sent}, {report['trainable_parameters']:,} of "
        f"{report['total_parameters']:,} parameters); no text leaves a hospital.",
        "",
        "| phase | seconds |",
        "|---|---|",
        *[f"| {k} | {v:.0f} |" for k, v in report["wall_seconds"].items()],
        "",
        "Logs of every process are in `logs/`; the final global model is in `model/`.",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_report(report: dict[str, Any], out: Path) -> list[Path]:
    return [
        write_json(report, out),
        plot_rounds(report, out),
        plot_comparison(report, out),
        write_markdown(report, out),
    ]

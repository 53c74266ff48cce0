"""Plot bench/scale.py's JSON lines: seconds per round and memory against the number of
hospitals on one machine (the figure in docs/scale.md), and print them as a Markdown table.

    .venv/bin/python bench/scale_plot.py [docs/scale.jsonl] [--out docs/scale.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def load(path: Path) -> list[dict]:
    """One entry per N: the last line measured for it."""
    rows = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["nodes"]] = row
    return [rows[n] for n in sorted(rows)]


def plot(rows: list[dict], out: Path) -> None:
    nodes = [row["nodes"] for row in rows]
    fig, (time_ax, mem_ax, machine_ax) = plt.subplots(1, 3, figsize=(15, 4.4))

    for row in rows:
        seconds = row["seconds_per_round"]
        time_ax.scatter([row["nodes"]] * len(seconds), seconds, color="tab:blue", s=18)
    time_ax.plot(
        nodes,
        [sorted(row["seconds_per_round"])[len(row["seconds_per_round"]) // 2] for row in rows],
        color="tab:blue",
        label="median round",
    )
    time_ax.plot(
        nodes,
        [row["superlink_cpu_s"] / max(row["rounds_completed"], 1) for row in rows],
        color="tab:red",
        linestyle="--",
        label="SuperLink CPU s per round (run / rounds)",
    )
    time_ax.set_xlabel("hospitals on one 2-core machine")
    time_ax.set_ylabel("seconds")
    time_ax.set_title("Seconds per round (each dot a round)")
    time_ax.legend(fontsize=8)

    def series(key: str) -> list[float]:
        return [row.get(key, 0.0) for row in rows]

    idle = [
        row["rss_mib_idle_supernode"]
        + row["rss_mib_idle_runner"]
        + row.get("rss_mib_idle_warm_parent", 0.0)
        for row in rows
    ]
    mem_ax.plot(nodes, idle, marker="o", label="idle hospital: SuperNode + runner + warm parent")
    mem_ax.plot(
        nodes,
        series("rss_mib_clientapp_process_peak"),
        marker="o",
        label="ClientApp task, peak RSS",
    )
    mem_ax.plot(
        nodes,
        series("uss_mib_clientapp_process_peak"),
        marker="o",
        label="ClientApp task, peak USS (own pages)",
    )
    mem_ax.plot(
        nodes, series("rss_mib_superlink_after_run"), marker="o", label="SuperLink after the run"
    )
    mem_ax.set_xlabel("hospitals on one 2-core machine")
    mem_ax.set_ylabel("MiB per process (group)")
    mem_ax.set_title("Resident memory")
    mem_ax.set_ylim(0, 1000)
    mem_ax.legend(fontsize=8, loc="upper left")

    measured = [row for row in rows if "machine_mib_used_peak" in row]
    machine_ax.plot(
        [row["nodes"] for row in measured],
        [(r["machine_mib_used_peak"] - r["machine_mib_used_before"]) / 1024 for r in measured],
        marker="o",
        label="peak in use during the run, minus before it",
    )
    machine_ax.axhline(24, color="grey", linestyle=":", label="the machine (24 GiB)")
    machine_ax.set_xlabel("hospitals on one 2-core machine")
    machine_ax.set_ylabel("GiB")
    machine_ax.set_title("The whole machine's memory")
    machine_ax.set_ylim(bottom=0)
    machine_ax.legend(fontsize=8)

    for ax in (time_ax, mem_ax, machine_ax):
        ax.set_xticks(nodes)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def table(rows: list[dict]) -> str:
    head = (
        "| N | s per round (1, 2, 3) | hospitals per round | SuperLink CPU s per round | "
        "idle hospital MiB (SuperNode + runner + warm parent) | ClientApp task peak MiB "
        "RSS / USS | SuperLink MiB | bytes per round | `database is locked` / HTTP 500 | "
        "load avg before -> after |\n|" + "---|" * 10
    )
    lines = [head]
    for row in rows:
        rounds = max(row["rounds_completed"], 1)
        lines.append(
            f"| {row['nodes']} | {', '.join(f'{s:.0f}' for s in row['seconds_per_round'])} "
            f"| {', '.join(map(str, row['participants_per_round']))} "
            f"| {row['superlink_cpu_s'] / rounds:.0f} "
            f"| {row['rss_mib_idle_supernode']:.0f} + {row['rss_mib_idle_runner']:.0f} + "
            f"{row.get('rss_mib_idle_warm_parent', 0):.0f} "
            f"| {row['rss_mib_clientapp_process_peak']:.0f} / "
            f"{row.get('uss_mib_clientapp_process_peak', 0):.0f} "
            f"| {row['rss_mib_superlink_after_run']:.0f} | {row['bytes_per_round']:,} "
            f"| {row['superlink_db_locked']} / {row['superlink_http_500']} "
            f"| {row['loadavg_before'][0]:.1f} -> {row['loadavg_after'][0]:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("jsonl", type=Path, nargs="?", default=Path("docs/scale.jsonl"))
    parser.add_argument("--out", type=Path, default=Path("docs/scale.png"))
    args = parser.parse_args()
    rows = load(args.jsonl)
    plot(rows, args.out)
    print(table(rows))


if __name__ == "__main__":
    main()

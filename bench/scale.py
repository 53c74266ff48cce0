"""N hospitals on one machine: a real federation (TLS, node authentication, a network
namespace per hospital when run as root) with a tiny model, 3 rounds; prints one JSON object.

    .venv/bin/python bench/scale.py N [--rounds 3] [--out runs/bench-scale]
    bash bench/scale.sh 2 5 10 20      # the table and plot in docs/scale.md

Measures what grows with N: seconds per round, the resident memory of each idle SuperNode
(and its ClientApp runner), the peak resident memory of the ClientApp processes Flower starts
for every message, the SuperLink's, and the bytes a round moves.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import psutil
import torch
from transformers import BertConfig, BertModel

from federimed.config import find_app_dir, resolve
from federimed.data.synth import SynthConfig, generate, write_dataset
from federimed.deploy.local import LocalFederation, deployment_overrides
from federimed.model import load_tokenizer, quiet_libraries
from federimed.runrecord import SUMMARY_FILE, read_rounds, read_summary

MIB = 2**20


def tiny_model(folder: Path) -> str:
    """A 2-layer BERT with the real MiniLM vocabulary: the federation's cost, not the model's."""
    tokenizer = load_tokenizer("minilm")
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=128, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def rss(pid: int) -> int:
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0


class ClientAppPeaks(threading.Thread):
    """Samples every ClientApp process (`federimed-clientapp`) while the run goes."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peaks: dict[int, int] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.5):
            for process in psutil.process_iter(["pid", "cmdline"]):
                if any("federimed-clientapp" in arg for arg in (process.info["cmdline"] or [])[:2]):
                    pid = process.info["pid"]
                    self.peaks[pid] = max(self.peaks.get(pid, 0), rss(pid))


def measure(nodes: int, rounds: int, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    write_dataset(generate(SynthConfig(hospitals=nodes, seed=1, cases_per_hospital=120)), data)
    model = tiny_model(out / "tiny-model")
    hospitals = {f"hospital-{i}": data / f"hospital-{i}" for i in range(1, nodes + 1)}
    local = LocalFederation(out, out / "certs", hospitals, data / "test.jsonl")
    flags = {"model": model, "max-length": 32, "local-steps": 2, "num-server-rounds": rounds}
    overrides = deployment_overrides(out, nodes, data / "test.jsonl")
    effective = resolve(flags=flags, deployment=overrides, environ={})
    started = time.monotonic()
    with local as running:
        up_seconds = time.monotonic() - started
        idle: dict[str, list[int]] = {}
        for record in running.state.processes:
            idle.setdefault(record.role, []).append(rss(record.pid))
        peaks = ClientAppPeaks()
        peaks.start()
        run_id = running.submit(effective.overrides, find_app_dir())
        run_out = out / "flower" / str(run_id)
        running.wait_for_run(run_id, 3600, done=(run_out / SUMMARY_FILE).exists)
        peaks.stop.set()
        link_peak = rss(running.state.processes[0].pid)
    records, summary = read_rounds(run_out), read_summary(run_out)
    supernodes, runners = idle["supernode"], idle["clientapp"]
    return {
        "nodes": nodes,
        "rounds_completed": summary.rounds_completed if summary else len(records),
        "seconds_per_round": [round(r.seconds, 1) for r in records],
        "participants_per_round": [len(r.participants) for r in records],
        "up_seconds": round(up_seconds, 1),
        "rss_mib_idle_supernode": round(max(supernodes) / MIB, 1),
        "rss_mib_idle_clientapp_runner": round(max(runners) / MIB, 1),
        "rss_mib_clientapp_process_peak": round(max(peaks.peaks.values(), default=0) / MIB, 1),
        "clientapp_processes_seen": len(peaks.peaks),
        "rss_mib_superlink_after_run": round(link_peak / MIB, 1),
        "bytes_per_round": sum(t.bytes_down + t.bytes_up for t in records[-1].traffic.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("nodes", type=int)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-scale"))
    args = parser.parse_args()
    quiet_libraries()
    print(json.dumps(measure(args.nodes, args.rounds, args.out.resolve() / str(args.nodes))))


if __name__ == "__main__":
    main()

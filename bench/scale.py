"""N hospitals on one machine: a real federation (TLS, node authentication, a network
namespace per hospital when run as root) with a tiny model, 3 rounds; prints one JSON object.

    .venv/bin/python bench/scale.py N [--rounds 3] [--out runs/bench-scale]
    bash bench/scale.sh 2 5 10 20      # the table and plot in docs/scale.md

Measures what grows with N: seconds per round, the resident memory of each idle SuperNode
(and its ClientApp runner and the runner's warm parent), the peak memory of the ClientApp
processes started for every message, the SuperLink's, and the bytes a round moves; and, as
evidence of what breaks first, the SuperLink's CPU time and run-queue wait, the machine's CPU
pressure and load, and the SuperLink's "database is locked" errors and HTTP 500 answers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import threading
import time
from collections import defaultdict
from pathlib import Path

import psutil
import torch
from transformers import BertConfig, BertModel

from federimed.config import find_app_dir, resolve
from federimed.data.synth import SynthConfig, generate, write_dataset
from federimed.deploy.local import (
    HOSPITAL_NICE,
    LocalFederation,
    RunningFederation,
    deployment_overrides,
)
from federimed.learning.model import load_tokenizer, quiet_libraries
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


def uss(pid: int) -> int:
    """Memory only this process holds (a forked ClientApp shares its warm parent's pages)."""
    try:
        return psutil.Process(pid).memory_full_info().uss
    except psutil.Error:
        return 0


def run_queue_wait(pid: int) -> float:
    """Seconds the process's live threads have spent runnable but not running (schedstat),
    summed over threads (two threads waiting one second count two)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += int((task / "schedstat").read_text().split()[1])
    return total / 1e9


def cpu_pressure() -> float:
    """Microseconds (since boot) in which some runnable task waited for a CPU (Linux PSI)."""
    try:
        return float(Path("/proc/pressure/cpu").read_text().split()[4].split("=")[1])
    except (OSError, IndexError, ValueError):
        return 0.0


WARM_PARENT = "federimed.hospital.warm"  # a runner's warm parent forks the ClientApp tasks


class Sampler(threading.Thread):
    """While the run goes: the peak memory of every ClientApp task process (started cold as
    ``federimed-clientapp``, or forked by a runner's warm parent), and how long the SuperLink
    waited for a CPU."""

    def __init__(self, superlink: int, runners: list[int]) -> None:
        super().__init__(daemon=True)
        self.superlink = superlink
        self.runners = runners  # this federation's ClientApp runners (not another's on the machine)
        self.rss: dict[int, int] = {}
        self.uss: dict[int, int] = {}
        self.stop = threading.Event()
        self.started = time.monotonic()
        self.link_cpu = sum(psutil.Process(superlink).cpu_times()[:2])
        self.link_wait = self.link_wait_max = run_queue_wait(superlink)
        self.pressure = cpu_pressure()
        self.memory_peak = psutil.virtual_memory().used  # the whole machine's, shared pages once

    def tasks(self) -> list[int]:
        cmdlines, children = {}, defaultdict(list)
        for process in psutil.process_iter(["pid", "ppid", "cmdline"]):
            cmdlines[process.info["pid"]] = process.info["cmdline"] or []
            children[process.info["ppid"]].append(process.info["pid"])
        found = []
        for runner in self.runners:
            for child in children[runner]:
                if WARM_PARENT in cmdlines[child]:
                    found += children[child]
                elif any("federimed-clientapp" in arg for arg in cmdlines[child][:2]):
                    found.append(child)
        return found

    def run(self) -> None:
        sample = 0
        while not self.stop.wait(0.5):
            sample += 1
            for pid in self.tasks():
                self.rss[pid] = max(self.rss.get(pid, 0), rss(pid))
                if sample % 4 == 0:  # reading smaps costs CPU: every 2 s
                    self.uss[pid] = max(self.uss.get(pid, 0), uss(pid))
            self.link_wait_max = max(self.link_wait_max, run_queue_wait(self.superlink))
            self.memory_peak = max(self.memory_peak, psutil.virtual_memory().used)

    def figures(self) -> dict:
        wall = time.monotonic() - self.started
        link_cpu = sum(psutil.Process(self.superlink).cpu_times()[:2]) - self.link_cpu
        return {
            "rss_mib_clientapp_process_peak": mib(max(self.rss.values(), default=0)),
            "uss_mib_clientapp_process_peak": mib(max(self.uss.values(), default=0)),
            "clientapp_processes_seen": len(self.rss),
            "superlink_cpu_s": round(link_cpu, 1),
            "superlink_runqueue_wait_s": round(self.link_wait_max - self.link_wait, 1),
            "cpu_pressure_pct": round((cpu_pressure() - self.pressure) / 1e4 / wall, 1),
            "machine_mib_used_peak": mib(self.memory_peak),
        }


def mib(size: int) -> float:
    return round(size / MIB, 1)


def idle_memory(running: RunningFederation) -> dict:
    """Per hospital, between rounds: its SuperNode, its ClientApp runner, the runner's warm
    parent (if any); the largest of each."""
    largest = {"supernode": 0, "runner": 0, "warm_parent": 0}
    for record in running.state.processes:
        if record.role == "supernode":
            largest["supernode"] = max(largest["supernode"], rss(record.pid))
        if record.role == "clientapp":
            largest["runner"] = max(largest["runner"], rss(record.pid))
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(record.pid).children(recursive=True):
                    if WARM_PARENT in child.cmdline():
                        largest["warm_parent"] = max(largest["warm_parent"], rss(child.pid))
    return {f"rss_mib_idle_{role}": mib(size) for role, size in largest.items()}


def measure(nodes: int, rounds: int, out: Path, nice: int, round_timeout: float) -> dict:
    load_before = [round(x, 2) for x in os.getloadavg()]  # was the machine busy already?
    memory_before = psutil.virtual_memory().used
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    write_dataset(generate(SynthConfig(hospitals=nodes, seed=1, cases_per_hospital=120)), data)
    model = tiny_model(out / "tiny-model")
    hospitals = {f"hospital-{i}": data / f"hospital-{i}" for i in range(1, nodes + 1)}
    local = LocalFederation(out, out / "certs", hospitals, data / "test.jsonl", hospital_nice=nice)
    flags = {
        "model": model, "max-length": 32, "local-steps": 2, "num-server-rounds": rounds,
        "round-timeout": round_timeout,
    }  # fmt: skip
    overrides = deployment_overrides(out, nodes, data / "test.jsonl")
    effective = resolve(flags=flags, deployment=overrides, environ={})
    started = time.monotonic()
    with local as running:
        up_seconds = time.monotonic() - started
        link = running.state.processes[0].pid
        runners = [r.pid for r in running.state.processes if r.role == "clientapp"]
        sampler = Sampler(link, runners)
        sampler.start()
        run_id = running.submit(effective.overrides, find_app_dir())
        run_out = out / "flower" / str(run_id)
        running.wait_for_run(run_id, 3600, done=(run_out / SUMMARY_FILE).exists)
        sampler.stop.set()
        figures = sampler.figures()
        idle = idle_memory(running)
        link_rss = rss(link)
    records, summary = read_rounds(run_out), read_summary(run_out)
    link_log = (out / "logs" / "superlink.log").read_text(errors="replace")
    last_traffic = records[-1].traffic.values() if records else []
    return {
        "nodes": nodes,
        "hospital_nice": nice,
        "round_timeout_s": round_timeout,
        "rounds_completed": summary.rounds_completed if summary else len(records),
        "seconds_per_round": [round(r.seconds, 1) for r in records],
        "participants_per_round": [len(r.participants) for r in records],
        "up_seconds": round(up_seconds, 1),
        **idle,
        "rss_mib_superlink_after_run": mib(link_rss),
        "bytes_per_round": sum(t.bytes_down + t.bytes_up for t in last_traffic),
        **figures,
        "superlink_db_locked": link_log.count("database is locked"),
        "superlink_http_500": link_log.count('HTTP/1.1" 500'),
        "machine_mib_used_before": mib(memory_before),
        "loadavg_before": load_before,
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("nodes", type=int)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-scale"))
    parser.add_argument(
        "--nice", type=int, default=HOSPITAL_NICE,
        help="CPU priority of the hospitals' processes (0: as high as the SuperLink's)",
    )  # fmt: skip
    parser.add_argument(
        "--round-timeout", type=float, default=600,
        help="seconds a round waits for replies (the app's default); a lost reply costs this "
        "much, and a shorter one would drop slow hospitals instead",
    )  # fmt: skip
    args = parser.parse_args()
    quiet_libraries()
    out = args.out.resolve() / str(args.nodes)
    print(json.dumps(measure(args.nodes, args.rounds, out, args.nice, args.round_timeout)))


if __name__ == "__main__":
    main()

"""Chaos soak: back-to-back runs on a real local federation while its processes are SIGKILLed.

    .venv/bin/python bench/soak.py [--runs 10] [--kills 10] [--minutes 45] [--seed 0]
    bash bench/soak.sh                 # the same, the table in docs/failures.md

A federation (`federimed up`: TLS, node authentication, three hospitals, a tiny model so that
rounds are short) runs ``--runs`` runs of four rounds one after another.  At random moments
(after a random number of a run's rounds, plus a random delay) one process is SIGKILLed: a
random hospital's SuperNode, the ServerApp, or the SuperLink, each in turn.  The operator's
answer is what docs/failures.md says it is:

- a SuperNode: ``federimed restart supernode H`` and ``restart clientapp H`` after a while (the
  host coming back); the run goes on without that hospital for the round in flight;
- the ServerApp: ``federimed submit --resume RUN`` (a fresh submission when the dead run had
  not completed a round: there is nothing to resume);
- the SuperLink: ``federimed restart superlink``, then ``submit --resume RUN``.

Afterwards it checks what the issue asks: every run ended completed (itself or through its
resumptions), the resumed run's record starts with every round the dead run recorded (no
round lost beyond the one in flight), no round number twice in a run's record and no hospital
twice in a round (no update aggregated twice), every hospital's ledger verifies, and once the
federation is down no process of it is left.  It prints one JSON line per kill and a summary
line, appends them to ``--out``/soak.jsonl, and exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
# bench/ is a folder of scripts, not a package
from scale import tiny_model

from federimed.cli import main as federimed
from federimed.data.synth import SynthConfig, generate, write_dataset
from federimed.deploy.certs import ensure_certs
from federimed.deploy.local import STATE_FILE, RunningFederation, tagged_processes
from federimed.hospital.ledger import LedgerError, verify
from federimed.runrecord import RoundRecord, read_rounds

HOSPITALS = ["hospital-1", "hospital-2", "hospital-3"]
TARGETS = ["supernode", "serverapp", "superlink"]
ROUNDS = 4
RUN_TIMEOUT = 900  # one logical run, kills and resumptions included


@dataclass
class Kill:
    """One SIGKILL and what it cost."""

    run: int  # the logical run (1..K)
    target: str
    run_id: str  # the Flower run it hit
    rounds_recorded: int  # of that Flower run, at the kill
    recovered_by: str = ""
    recovery_s: float = 0.0  # kill -> the run (or its resumption) recording its next round
    rounds_lost: int = 0  # recorded rounds the resumption did not carry over
    dropped: list[str] = field(default_factory=list)  # hospitals a later round went without


@dataclass
class Soak:
    running: RunningFederation
    config: str
    rng: random.Random
    kills: list[Kill] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    final_runs: list[str] = field(default_factory=list)

    def run_dir(self, run_id: str) -> Path:
        return self.running.workdir / "flower" / run_id

    def submit(self, *extra: str) -> str:
        before = {r["run-id"] for r in self.running.runs()}
        code = federimed(
            ["submit", "--out", str(self.running.workdir), "--run-config", self.config, *extra]
        )
        if code != 0:
            raise RuntimeError(f"submit {' '.join(extra)} failed ({code})")
        (run_id,) = {r["run-id"] for r in self.running.runs()} - before
        return run_id

    def rounds(self, run_id: str) -> list[RoundRecord]:
        return read_rounds(self.run_dir(run_id))

    def completed(self, run_id: str) -> bool:
        return (self.run_dir(run_id) / "summary.json").is_file()

    def one_run(self, number: int, kills_wanted: int) -> int:
        """Submit, kill up to ``kills_wanted`` times at random moments, recover, until it
        completes; the kills made (a run may complete before its moment comes)."""
        run_id = self.submit()
        deadline = time.monotonic() + RUN_TIMEOUT
        made = 0
        for _ in range(kills_wanted):
            # within the run: after 0 to ROUNDS-2 rounds, a moment into the next (a round
            # of the tiny model takes 5-10 s here)
            after_rounds = self.rng.randrange(ROUNDS - 1)
            delay = self.rng.uniform(0, 4)
            while len(self.rounds(run_id)) < after_rounds and not self.completed(run_id):
                self._wait(deadline, run_id)
            time.sleep(delay)
            if self.completed(run_id):
                break
            run_id = self._kill_and_recover(number, run_id, deadline)
            made += 1
        while not self.completed(run_id):
            self._wait(deadline, run_id)
        self.final_runs.append(run_id)
        for kill in self.kills:
            if kill.run == number:  # what the rounds after the kill went without
                later = [r for r in self.rounds(run_id) if r.round > kill.rounds_recorded]
                kill.dropped = sorted({h for r in later for h in r.dropped})
        return made

    def _wait(self, deadline: float, run_id: str) -> None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"run {run_id} did not complete within {RUN_TIMEOUT} s")
        time.sleep(0.5)

    def _kill_and_recover(self, number: int, run_id: str, deadline: float) -> str:
        target = TARGETS[len(self.kills) % len(TARGETS)]  # each as often, in a random order
        recorded = len(self.rounds(run_id))
        kill = Kill(number, target, run_id, recorded)
        killed_at = time.monotonic()
        if target == "supernode":
            hospital = self.rng.choice(HOSPITALS)
            kill.target = f"supernode {hospital}"
            psutil.Process(self._pid("supernode", hospital)).kill()
            time.sleep(self.rng.uniform(5, 20))  # the host reboots
            self.running.restart("supernode", hospital)
            self.running.restart("clientapp", hospital)
            kill.recovered_by = f"restart supernode/clientapp {hospital}"
            new_run = run_id
        else:
            if target == "serverapp":
                self._serverapp(run_id, deadline).kill()
            else:
                psutil.Process(self._pid("superlink")).kill()
                self.running.restart("superlink")
                self.running.wait_for_nodes()
            if recorded:
                new_run = self.submit("--resume", run_id)
                kill.recovered_by = f"submit --resume {run_id}"
            else:
                new_run = self.submit()
                kill.recovered_by = "submit (no round to resume)"
        while len(self.rounds(new_run)) <= recorded and not self.completed(new_run):
            self._wait(deadline, new_run)
        kill.recovery_s = round(time.monotonic() - killed_at, 1)
        kill.rounds_lost = self._lost(run_id, new_run) if new_run != run_id else 0
        self.kills.append(kill)
        print(json.dumps(asdict(kill)), flush=True)  # before `dropped` is known: a progress line
        return new_run

    def _lost(self, dead: str, resumed: str) -> int:
        """The dead run's recorded rounds that its resumption does not start with."""
        before, after = self.rounds(dead), self.rounds(resumed)
        kept = 0
        for old, new in zip(before, after, strict=False):
            if old != new:
                break
            kept += 1
        return len(before) - kept

    def _pid(self, role: str, hospital: str | None = None) -> int:
        (record,) = [
            r for r in self.running.state.processes if (r.role, r.hospital) == (role, hospital)
        ]
        return record.pid

    def _serverapp(self, run_id: str, deadline: float) -> psutil.Process:
        """The run's ServerApp process (started by the SuperLink's SuperExec)."""
        while True:
            for process in tagged_processes(str(self.running.workdir)):
                try:
                    if any("flwr-serverapp" in part for part in process.cmdline()):
                        return process
                except psutil.Error:
                    continue
            self._wait(deadline, run_id)

    def check(self) -> None:
        """What the soak promises, on what it left."""
        for run_id in self.final_runs:
            rounds = self.rounds(run_id)
            numbers = [r.round for r in rounds]
            if numbers != list(range(1, ROUNDS + 1)):
                self.problems.append(f"run {run_id}: rounds recorded {numbers}")
            for record in rounds:
                if len(set(record.participants)) != len(record.participants):
                    self.problems.append(f"run {run_id} round {record.round}: a hospital twice")
        for kill in self.kills:
            if kill.rounds_lost:
                self.problems.append(f"{kill.target} in run {kill.run}: {kill.rounds_lost} lost")
        for hospital in HOSPITALS:
            ledger = self.running.workdir / "sites" / hospital / "egress-ledger.jsonl"
            try:
                verify(ledger)
            except LedgerError as error:
                self.problems.append(f"{hospital}'s ledger: {error}")


def prepare(out: Path) -> tuple[Path, Path, str]:
    if out.exists():
        shutil.rmtree(out)
    data = out / "data"
    write_dataset(
        generate(SynthConfig(hospitals=len(HOSPITALS), seed=1, cases_per_hospital=200)), data
    )
    certs = out / "certs"
    ensure_certs(certs, HOSPITALS)
    return data, certs, tiny_model(out / "tiny-model")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument(
        "--kills", type=int, default=10, help="at least this many, spread over the runs"
    )
    parser.add_argument("--minutes", type=float, default=45, help="stop starting runs after this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-soak"))
    args = parser.parse_args()
    out = args.out.resolve()
    data, certs, model = prepare(out)
    rng = random.Random(args.seed)
    rng.shuffle(TARGETS)
    # every run gets one kill at least, the rest at random
    plan = [1] * args.runs
    for _ in range(max(0, args.kills - args.runs)):
        plan[rng.randrange(args.runs)] += 1
    workdir = out / "federation"
    if federimed(["up", "--out", str(workdir), "--data", str(data), "--certs", str(certs)]) != 0:
        return 1
    started = time.monotonic()
    config = (
        f'model="{model}" max-length=32 local-steps=2 num-server-rounds={ROUNDS} '
        f'round-timeout=120 test-path="{data / "test.jsonl"}"'
    )
    soak = Soak(RunningFederation.attach(workdir), config, rng)
    try:
        owed = 0  # kills a run completed too early for go to the next
        for number, kills in enumerate(plan, 1):
            if time.monotonic() - started > args.minutes * 60:
                soak.problems.append(f"time limit: {number - 1} of {args.runs} runs done")
                break
            soak.running.wait_for_nodes()
            owed += kills
            owed -= soak.one_run(number, owed)
        soak.check()
    except Exception as error:
        soak.problems.append(f"{type(error).__name__}: {error}")
        raise
    finally:
        if (workdir / STATE_FILE).exists():
            federimed(["down", "--out", str(workdir)])
        time.sleep(2)
        left = [
            p.pid
            for p in tagged_processes(str(workdir))
            if p.is_running() and p.status() != "zombie"
        ]
        if left:
            soak.problems.append(f"processes left after down: {left}")
        summary = {
            "runs": len(soak.final_runs),
            "kills": len(soak.kills),
            "by_target": {t: sum(k.target.startswith(t) for k in soak.kills) for t in TARGETS},
            "rounds_lost": sum(k.rounds_lost for k in soak.kills),
            "minutes": round((time.monotonic() - started) / 60, 1),
            "problems": soak.problems,
        }
        print(json.dumps(summary), flush=True)
        with (out / "soak.jsonl").open("a") as record:
            for kill in soak.kills:
                record.write(json.dumps(asdict(kill)) + "\n")
            record.write(json.dumps(summary) + "\n")
    return 1 if soak.problems else 0


if __name__ == "__main__":
    sys.exit(main())

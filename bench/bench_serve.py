"""Load test of `memvq serve`: the same requests against a server with dynamic batching on, then off.

Each mode starts `memvq serve` as a subprocess on 127.0.0.1 (a free port), waits for /readyz, warms up, then sends
`--requests` POST /v1/answer from `--concurrency` concurrent clients. Every `--malformed-every`-th request is
malformed (empty, over-long, wrongly typed question, top_k out of range, broken JSON): it must get a 4xx while the
valid ones get 200 with an answer. Prints a table (errors, lost requests, p50/p95/p99 latency of the valid
requests, answers/s, mean model batch size from /metrics) and the on/off throughput ratio. `--max-seconds` bounds
the whole run; when it is reached the run stops with a message and what was measured so far.

With `--replicas 1,2` the modes are `memvq serve --replicas N` instead (Ray Serve replicas on a local Ray, Ray
Serve's batching on), one per N (0: the single-process server, batching on), and the throughput of each is
compared with the first's. The mean batch size is then summed over the replicas' own /metrics. With
`--kill-after K`, each mode of 2 or more replicas runs again with one of its replicas SIGKILLed once K requests
are answered (Serve replaces it; the router retries what it was answering): no request may be lost or fail.

    python -m bench.bench_serve --store runs/minilm-mini [--model DIR] [--requests 2000] [--concurrency 16]
    python -m bench.bench_serve --store runs/minilm-mini --replicas 1,2 [--kill-after 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
from prometheus_client.parser import text_string_to_metric_families

from memvq.pipelines.logs import configure_logging

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ROOT.parent / "shared" / "data" / "nq_open_oracle" / "nq-oracle-dev-kilt.jsonl"
FALLBACK_QUESTIONS = [
    "who got the first nobel prize in physics",
    "what is the capital of france",
    "when was the eiffel tower built",
    "who wrote the origin of species",
]
logger = logging.getLogger("bench_serve")


class OutOfTime(Exception):
    """--max-seconds reached."""


@dataclass(frozen=True)
class Planned:
    """One request to send: its JSON body (or raw bytes) and whether it is a valid one."""

    body: bytes
    valid: bool
    kind: str


@dataclass
class Outcome:
    planned: Planned
    status: int | None = None  # None: no response (connection error or timeout)
    seconds: float = 0.0
    ok: bool = False


@dataclass
class ModeResult:
    mode: str
    max_batch_size: int
    planned: int
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0
    mean_batch: float | None = None
    stopped: str | None = None
    killed: str | None = None  # the replica process killed during the load, if any

    @property
    def errors(self) -> int:
        return sum(1 for o in self.outcomes if o.status is not None and not o.ok)

    @property
    def lost(self) -> int:
        return self.planned - sum(1 for o in self.outcomes if o.status is not None)

    @property
    def answers_per_second(self) -> float:
        answered = sum(1 for o in self.outcomes if o.planned.valid and o.ok)
        return answered / self.seconds if self.seconds else 0.0

    def latency_ms(self, q: float) -> float:
        valid = [o.seconds for o in self.outcomes if o.planned.valid and o.ok]
        return float(np.percentile(valid, q)) * 1e3 if valid else float("nan")


def load_questions(path: Path) -> list[str]:
    if not path.is_file():
        logger.warning("%s not found: using %d built-in questions", path, len(FALLBACK_QUESTIONS))
        return FALLBACK_QUESTIONS
    with open(path) as lines:
        return [json.loads(line)["input"] for line in lines if line.strip()]


def malformed(kind: int, question: str) -> Planned:
    bodies: list[tuple[str, Any]] = [
        ("empty question", {"question": ""}),
        ("over-long question", {"question": "x" * 5000}),
        ("question not a string", {"question": 42}),
        ("top_k out of range", {"question": question, "top_k": 0}),
        ("top_k too large", {"question": question, "top_k": 100_000}),
        ("broken JSON", b'{"question": "unterminated'),
        ("unknown field", {"question": question, "topk": 5}),
    ]
    name, body = bodies[kind % len(bodies)]
    return Planned(body if isinstance(body, bytes) else json.dumps(body).encode(), False, name)


def plan(questions: list[str], requests: int, malformed_every: int, top_k: int) -> list[Planned]:
    out = []
    for i in range(requests):
        question = questions[i % len(questions)]
        if malformed_every and (i + 1) % malformed_every == 0:
            out.append(malformed(i // malformed_every, question))
        else:
            out.append(Planned(json.dumps({"question": question, "top_k": top_k}).encode(), True, "valid"))
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`memvq serve` in a subprocess, its output in a log file; stopped with SIGINT (then killed)."""

    def __init__(self, args: argparse.Namespace, max_batch_size: int, log_dir: Path, replicas: int = 0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.replicas = replicas
        self.log_path = log_dir / f"serve-batch{max_batch_size}-replicas{replicas}.log"
        command = [
            sys.executable,
            "-m",
            "memvq.cli",
            "serve",
            "--store",
            str(args.store),
            "--port",
            str(self.port),
            "--device",
            args.device,
            "--max-batch-size",
            str(max_batch_size),
            "--max-wait-ms",
            str(args.max_wait_ms),
            "--no-access-log",
            *(["--model", str(args.model)] if args.model else []),
            *(["--replicas", str(replicas)] if replicas else []),
        ]
        self.log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    async def wait_ready(self, deadline: float) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=2.0) as client:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.log_tail()}")
                try:
                    if (await client.get("/readyz")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise OutOfTime("waiting for the server to be ready")
                await asyncio.sleep(0.25)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=60 if self.replicas else 30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


async def batch_stats(client: httpx.AsyncClient, replicas: int = 1) -> tuple[float, float]:
    """(sum, count) of the server's answer batch-size histogram; with replicas, summed over them (each has its own
    /metrics, answered by whichever the proxy picks: asked until each replica, named in X-Memvq-Replica, answered)."""
    texts: dict[str, str] = {}
    for _ in range(50 * replicas):
        response = await client.get("/metrics")
        texts[response.headers.get("x-memvq-replica", "")] = response.text
        if len(texts) >= replicas:
            break
    else:
        logger.warning("/metrics answered by %d of %d replicas", len(texts), replicas)
    stats = {"sum": 0.0, "count": 0.0}
    for text in texts.values():
        for family in text_string_to_metric_families(text):
            if family.name != "memvq_batch_size":
                continue
            for sample in family.samples:
                suffix = sample.name.rsplit("_", 1)[-1]
                if suffix in stats and sample.labels.get("op") == "answer":
                    stats[suffix] += sample.value
    return stats["sum"], stats["count"]


async def send(client: httpx.AsyncClient, planned: Planned, outcome: Outcome) -> None:
    start = time.perf_counter()
    try:
        response = await client.post("/v1/answer", content=planned.body, headers={"content-type": "application/json"})
    except httpx.HTTPError as error:
        logger.warning("no response (%s: %s)", type(error).__name__, error)
        return
    outcome.seconds = time.perf_counter() - start
    outcome.status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {}
    if planned.valid:
        answered = isinstance(body.get("answer"), str) or (body.get("answer", "") is None and body.get("abstained"))
        outcome.ok = response.status_code == 200 and bool(answered) and "provenance" in body
    else:
        outcome.ok = 400 <= response.status_code < 500 and "error" in body
    if not outcome.ok:
        logger.warning("%s request got %d: %s", planned.kind, response.status_code, response.text[:200])


async def fire(url: str, requests: list[Planned], concurrency: int, outcomes: list[Outcome]) -> None:
    """`concurrency` clients take the next planned request until none are left."""
    next_index = count()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120.0, limits=limits) as client:

        async def worker() -> None:
            while (i := next(next_index)) < len(requests):
                outcome = Outcome(requests[i])
                outcomes.append(outcome)
                await send(client, requests[i], outcome)

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def replica_processes() -> list[psutil.Process]:
    """The model replicas' processes of `memvq serve --replicas` on this machine (not its router's): Ray names them
    `ray::ServeReplica:memvq:memvq`."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        title = " ".join(process.info["cmdline"] or [])
        if title.startswith("ray::ServeReplica:memvq:memvq") and "memvq-router" not in title:
            found.append(process)
    return found


async def kill_a_replica(outcomes: list[Outcome], after: int, result: ModeResult) -> None:
    """SIGKILL one model replica once `after` requests are answered."""
    while sum(1 for o in outcomes if o.status is not None) < after:
        await asyncio.sleep(0.01)
    victims = replica_processes()
    if victims:
        victims[0].kill()
        result.killed = f"pid {victims[0].pid}"
        logger.info("killed replica process %d after %d answers", victims[0].pid, after)


async def run_mode(
    args: argparse.Namespace,
    mode: str,
    max_batch_size: int,
    requests: list[Planned],
    deadline: float,
    logs: Path,
    replicas: int = 0,
    kill_after: int = 0,
) -> ModeResult:
    result = ModeResult(mode, max_batch_size, len(requests))
    server = ServerProcess(args, max_batch_size, logs, replicas)
    try:
        logger.info("%s: starting the server (max batch size %d) on %s", mode, max_batch_size, server.url)
        await server.wait_ready(deadline)
        warmup = [r for r in requests if r.valid][: args.warmup]
        async with httpx.AsyncClient(base_url=server.url, timeout=30.0) as client:
            await asyncio.wait_for(fire(server.url, warmup, args.concurrency, []), deadline - time.monotonic())
            before = await batch_stats(client, max(replicas, 1))
            logger.info("%s: %d requests from %d clients", mode, len(requests), args.concurrency)
            start = time.perf_counter()
            killer = asyncio.ensure_future(kill_a_replica(result.outcomes, kill_after, result)) if kill_after else None
            try:
                await asyncio.wait_for(
                    fire(server.url, requests, args.concurrency, result.outcomes), deadline - time.monotonic()
                )
            except TimeoutError:
                result.stopped = "the load"
            finally:
                if killer is not None:
                    killer.cancel()
            result.seconds = time.perf_counter() - start
            after = await batch_stats(client, max(replicas, 1))
        if after[1] > before[1]:
            result.mean_batch = (after[0] - before[0]) / (after[1] - before[1])
    except (TimeoutError, OutOfTime):
        result.stopped = result.stopped or "start-up or warm-up"
    finally:
        server.stop()
    return result


def table(results: list[ModeResult]) -> str:
    header = (
        "| mode | max batch | requests | valid 200 | malformed 4xx | errors | lost | p50 ms | p95 ms | p99 ms "
        "| answers/s | mean batch |"
    )
    rows = [header, "|" + "---|" * 12]
    for r in results:
        valid_ok = sum(1 for o in r.outcomes if o.planned.valid and o.ok)
        malformed_ok = sum(1 for o in r.outcomes if not o.planned.valid and o.ok)
        mean = f"{r.mean_batch:.2f}" if r.mean_batch is not None else "-"
        rows.append(
            f"| {r.mode} | {r.max_batch_size} | {r.planned} | {valid_ok} | {malformed_ok} | {r.errors} | {r.lost} "
            f"| {r.latency_ms(50):.0f} | {r.latency_ms(95):.0f} | {r.latency_ms(99):.0f} "
            f"| {r.answers_per_second:.1f} | {mean} |"
        )
    return "\n".join(rows)


async def bench(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.max_seconds
    requests = plan(load_questions(args.questions), args.requests, args.malformed_every, args.top_k)
    results = []
    if args.replicas:
        modes = [(replicas_mode(n), args.batch_size, n, 0) for n in args.replicas]
        modes += [
            (f"{replicas_mode(n)}, one killed after {args.kill_after} answers", args.batch_size, n, args.kill_after)
            for n in args.replicas
            if args.kill_after and n >= 2
        ]
    else:
        modes = [("batching on", args.batch_size, 0, 0), ("batching off", 1, 0, 0)]
    with tempfile.TemporaryDirectory() as tmp:
        for mode, size, replicas, kill_after in modes:
            try:
                result = await run_mode(args, mode, size, requests, deadline, Path(tmp), replicas, kill_after)
            except RuntimeError as error:  # the server did not start
                print(f"error: {mode}: {error}", file=sys.stderr)
                return 2
            results.append(result)
            if kill_after and result.killed is None:
                print(f"error: {mode}: no replica process found to kill", file=sys.stderr)
                return 2
            if result.stopped:
                break
    valid = sum(r.valid for r in requests)
    print(
        f"\n## memvq serve load test: {args.requests} POST /v1/answer ({valid} valid, {args.requests - valid} "
        f"malformed), {args.concurrency} clients, top_k {args.top_k}, max wait {args.max_wait_ms} ms\n"
    )
    print(table(results))
    stopped = next((r for r in results if r.stopped), None)
    if stopped is not None:
        done = sum(1 for o in stopped.outcomes if o.status is not None)
        print(
            f"\nstopped: --max-seconds {args.max_seconds:g} reached during {stopped.mode} ({stopped.stopped}); "
            f"{done} of {stopped.planned} requests answered. Raise --max-seconds or lower --requests."
        )
        return 2
    if args.replicas:
        first = results[0]
        for other in results[1:]:
            ratio = other.answers_per_second / first.answers_per_second if first.answers_per_second else float("inf")
            print(f"\nthroughput {other.mode} / {first.mode}: {ratio:.2f}x")
    else:
        on, off = results
        ratio = on.answers_per_second / off.answers_per_second if off.answers_per_second else float("inf")
        verdict = "met" if ratio >= 2.0 else "NOT met"
        print(f"\nthroughput with batching on / off: {ratio:.2f}x (target >= 2x: {verdict})")
    failed = sum(r.errors + r.lost for r in results)
    if failed:
        print(f"\nFAILED: {failed} errors or lost requests (see the warnings above)")
        return 1
    return 0


def replicas_mode(replicas: int) -> str:
    if replicas == 0:
        return "single process"
    return f"ray serve, {replicas} replica{'s' if replicas > 1 else ''}"


def replica_counts(text: str) -> list[int]:
    counts = [int(part) for part in text.split(",") if part.strip()]
    if not counts or any(n < 0 for n in counts):
        raise argparse.ArgumentTypeError(f"expected replica counts like 1,2 (0: single process), got {text!r}")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, required=True, help="store directory (memvq build-index)")
    parser.add_argument("--model", type=Path, default=None, help="reader directory (default: the embedded one)")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--malformed-every", type=int, default=20, help="every N-th request is malformed (0: none)")
    parser.add_argument("--batch-size", type=int, default=16, help="max batch size with batching on")
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--warmup", type=int, default=16, help="valid requests before measuring (not counted)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--questions", type=Path, default=QUESTIONS, help="KILT jsonl whose `input`s are asked")
    parser.add_argument("--max-seconds", type=float, default=1800.0, help="hard bound on the whole run")
    parser.add_argument(
        "--replicas",
        type=replica_counts,
        default=None,
        help="compare `memvq serve --replicas N` for each N of a list like 1,2 (0: single process) instead of "
        "batching on and off",
    )
    parser.add_argument(
        "--kill-after",
        type=int,
        default=0,
        help="with --replicas: also run each N >= 2 with one replica SIGKILLed after this many answers",
    )
    args = parser.parse_args()
    configure_logging()
    sys.exit(asyncio.run(bench(args)))


if __name__ == "__main__":
    main()

"""Fault injection, one run, printed as a table: what was tried, what was detected, what was lost (must be 0).

1. store: flip one random byte of a random file (manifest included) in a copy of `--store`, half the time setting
   the file's mtime back; `MemoryStore.open` must refuse it, and the watch of a store opened before the flip must
   name it. The byte is flipped back after each case.
2. build: a build of `--build-docs` pages with a tiny random BERT, killed (SIGKILL) at a random moment `--kills`
   times, then run to the end: its files must be byte-identical to an uninterrupted build's, and no Ray process of
   the killed runs may be left.
3. update: `memvq update` of a tiny store killed (SIGKILL) at a random moment `--kills` times: the store must open
   whole after each kill (its previous generation, or the new one), and the update run again must end with the
   uninterrupted update's files.
4. serve: `memvq serve` on `--store` with the embedded reader; clients send 4 x 64-question batches and hang up
   after 1 s, then one question is timed; clients that stay must all be answered, and the timed question must not
   wait behind the abandoned work (its latency beside one 16-question batch's).

    python -m bench.bench_faults --store runs/minilm-mini [--flips 60] [--kills 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from bench.bench_serve import ServerProcess, batch_stats, load_questions
from memvq.memory.artifact import ArtifactError
from memvq.memory.store import MemoryStore
from memvq.pipelines.logs import configure_logging

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CORPUS = SHARED / "nq_open_oracle" / "wiki-mini-knowledgesource.jsonl"
QUESTIONS = SHARED / "nq_open_oracle" / "nq-oracle-dev-kilt.jsonl"
logger = logging.getLogger("bench_faults")


@dataclass
class Row:
    area: str
    case: str
    tried: int
    detected: int
    lost: int
    note: str = ""


# -- 1. store ----------------------------------------------------------------------------------------------------


def flip(path: Path, at: int, keep_mtime: bool) -> None:
    stat = path.stat()
    with open(path, "r+b") as handle:
        handle.seek(at)
        byte = handle.read(1)[0]
        handle.seek(at)
        handle.write(bytes([byte ^ (1 << random.randrange(8))]))
    if keep_mtime:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def store_faults(store: Path, flips: int, work: Path) -> list[Row]:
    copy = work / "store"
    shutil.copytree(store, copy)
    watched = MemoryStore.open(copy)
    names = [*json.loads((copy / "manifest.json").read_text())["files"], "manifest.json"]
    on_open = on_watch = 0
    for case in range(flips):
        path = copy / random.choice(names)
        original = path.read_bytes()
        flip(path, random.randrange(len(original)), keep_mtime=case % 2 == 0)
        try:
            MemoryStore.open(copy)
        except ArtifactError:
            on_open += 1
        on_watch += bool(watched.watch.changed())
        path.write_bytes(original)
        assert not watched.watch.changed(), "restoring the byte must make the store whole again"
    return [
        Row("store", "flipped byte, opened after", flips, on_open, flips - on_open, "every file and the manifest"),
        Row("store", "flipped byte under an open store (watch)", flips, on_watch, flips - on_watch),
    ]


# -- 2. build ----------------------------------------------------------------------------------------------------


def tiny_build_setup(work: Path, docs: int) -> tuple[Path, Path]:
    """A corpus of the first `docs` shared pages and a build config for a tiny random BERT."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from memvq.encoders.embedded import default_model_path

    corpus = work / "corpus.jsonl"
    with open(CORPUS) as source:
        corpus.write_text("".join(line for _, line in zip(range(docs), source, strict=False)))
    model = work / "tiny-bert"
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(model)
    AutoTokenizer.from_pretrained(default_model_path()).save_pretrained(model)
    build = {
        "encoder": {"model": str(model)},
        "codec": {"dim": 32, "segments": [{"dims": 32, "heads": 8}], "codebook_size": 16, "epochs": 1},
        "shard_size": 16,
        "codec_sample_passages": 64,
    }
    config_path = work / "build.json"
    config_path.write_text(json.dumps(build))
    return corpus, config_path


def build_command(corpus: Path, out: Path, config: Path) -> list[str]:
    return [sys.executable, "-m", "memvq.cli", "build-index", "--corpus", str(corpus), "--out", str(out),
            "--config", str(config)]  # fmt: skip


def store_files(store: Path) -> dict[str, str]:
    return {
        name: record["sha256"] for name, record in json.loads((store / "manifest.json").read_text())["files"].items()
    }


def ray_processes() -> set[int]:
    found = set()
    for process in psutil.process_iter(["name", "cmdline"]):
        line = " ".join(process.info["cmdline"] or [])
        if "ray" in (process.info["name"] or "") or "raylet" in line or "gcs_server" in line or "ray::" in line:
            found.add(process.pid)
    return found


def build_faults(docs: int, kills: int, work: Path) -> list[Row]:
    corpus, config = tiny_build_setup(work, docs)
    before = ray_processes()
    start = time.perf_counter()
    subprocess.run(build_command(corpus, work / "reference", config), check=True, capture_output=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    reference = store_files(work / "reference")
    identical, lost = 0, 0
    for trial in range(kills):
        out = work / f"killed-{trial}"
        driver = subprocess.Popen(build_command(corpus, out, config), cwd=ROOT, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(random.uniform(0.3, 0.9) * seconds)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        finished = subprocess.run(build_command(corpus, out, config), capture_output=True, cwd=ROOT)
        same = finished.returncode == 0 and store_files(out) == reference
        identical += same
        lost += not same
    time.sleep(2)
    left = ray_processes() - before
    return [
        Row(
            "build",
            f"driver killed mid-build, rerun ({docs} pages)",
            kills,
            identical,
            lost,
            "identical to uninterrupted",
        ),
        Row("build", "Ray processes left after the runs", kills, kills if not left else 0, len(left)),
    ]


# -- 3. update ---------------------------------------------------------------------------------------------------


def update_faults(docs: int, kills: int, work: Path) -> list[Row]:
    """A tiny store of `docs` pages updated with the next `docs // 4` pages and a quarter of its own deleted, killed
    at a random moment of the update `kills` times: after each kill the store must open whole (the previous
    generation, or the new one when the kill came after its publish), and the update run again must end with the
    uninterrupted update's files."""
    (work / "update").mkdir()
    corpus, config = tiny_build_setup(work / "update", docs + docs // 4)
    pages = corpus.read_text().splitlines(keepends=True)
    (base_corpus := work / "update" / "base.jsonl").write_text("".join(pages[:docs]))
    (added := work / "update" / "added.jsonl").write_text("".join(pages[docs:]))
    (delete := work / "update" / "delete.txt").write_text(
        "".join(json.loads(line)["wikipedia_id"] + "\n" for line in pages[: docs // 4])
    )
    base = work / "update" / "base"
    subprocess.run(build_command(base_corpus, base, config), check=True, capture_output=True, cwd=ROOT)

    def update(store: Path) -> list[str]:
        return [sys.executable, "-m", "memvq.cli", "update", "--store", str(store), "--add", str(added),
                "--delete", str(delete)]  # fmt: skip

    reference = work / "update" / "reference"
    shutil.copytree(base, reference)
    start = time.perf_counter()
    subprocess.run(update(reference), check=True, capture_output=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    whole = identical = 0
    for trial in range(kills):
        out = work / "update" / f"killed-{trial}"
        shutil.copytree(base, out)
        driver = subprocess.Popen(update(out), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(random.uniform(0.1, 1.0) * seconds)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        with contextlib.suppress(ArtifactError):
            whole += MemoryStore.open(out).generation in (0, 1)
        finished = subprocess.run(update(out), capture_output=True, cwd=ROOT)
        identical += finished.returncode == 0 and store_files(out) == store_files(reference)
    return [
        Row("update", f"killed mid-update, store opened ({docs} pages)", kills, whole, kills - whole,
            "the previous generation, or the new one"),
        Row("update", "killed mid-update, rerun", kills, identical, kills - identical, "identical to uninterrupted"),
    ]  # fmt: skip


# -- 4. serve ----------------------------------------------------------------------------------------------------


async def serve_faults(args: argparse.Namespace, work: Path) -> list[Row]:
    questions = load_questions(QUESTIONS)
    server = ServerProcess(args, max_batch_size=16, log_dir=work)
    try:
        await server.wait_ready(time.monotonic() + 300)
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            await client.post("/v1/answer:batch", json={"questions": questions[:16]})  # warm up
            start = time.perf_counter()
            await client.post("/v1/answer:batch", json={"questions": questions[16:32]})
            one_batch = time.perf_counter() - start
            waits, stayed, answered = [], 0, 0
            run_before, _ = await batch_stats(client)
            for round_ in range(args.rounds):
                batch = questions[64 * round_ : 64 * round_ + 64]

                async def abandon(batch: list[str] = batch) -> None:
                    async with httpx.AsyncClient(base_url=server.url, timeout=1.0) as leaving:
                        with contextlib.suppress(httpx.TimeoutException):  # hung up, as planned
                            await leaving.post("/v1/answer:batch", json={"questions": batch})

                await asyncio.gather(*(abandon() for _ in range(4)))
                start = time.perf_counter()
                response = await client.post("/v1/answer", json={"question": questions[-1 - round_]})
                waits.append(time.perf_counter() - start)
                stayed += 1
                answered += response.status_code == 200
            run_after, _ = await batch_stats(client)
    finally:
        server.stop()
    ran = int(run_after - run_before) - stayed
    worst = max(waits)
    return [
        Row("serve", "4 x 64 questions abandoned after 1 s, then 1 question", args.rounds, answered, stayed - answered,
            f"next question waited {worst:.1f} s at worst (one 16-question batch: {one_batch:.1f} s); "
            f"{ran} of {args.rounds * 256} abandoned questions ran"),
    ]  # fmt: skip


def table(rows: list[Row]) -> str:
    lines = ["| area | case | tried | detected / answered | data lost | note |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.area} | {r.case} | {r.tried} | {r.detected} | {r.lost} | {r.note} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, required=True, help="a finished store (e.g. runs/minilm-mini)")
    parser.add_argument("--model", type=Path, default=None, help="reader for the serve part; default: embedded")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--flips", type=int, default=60)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--build-docs", type=int, default=80)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", nargs="*", default=[], choices=["store", "build", "update", "serve"])
    args = parser.parse_args()
    configure_logging()
    random.seed(args.seed)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ.setdefault("MEMVQ_CACHE_DIR", str(work / "cache"))
        if "store" not in args.skip:
            rows += store_faults(args.store, args.flips, work)
        if "build" not in args.skip:
            rows += build_faults(args.build_docs, args.kills, work)
        if "update" not in args.skip:
            rows += update_faults(args.build_docs, args.kills, work)
        if "serve" not in args.skip:
            rows += asyncio.run(serve_faults(args, work))
    print(table(rows))


if __name__ == "__main__":
    main()

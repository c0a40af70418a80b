"""Update vs rebuild at scale, one run, printed as a table: what an update of 1% of a store costs beside its build.

A store of `--passages` generated passages (`bench_scale.write_corpus`) is built with a small random BERT of
MiniLM's layout (`bench_scale.make_tiny_bert`: 64 wide, `--layers` deep; a random-model store exercises the same
code at size), then updated once with `--percent` of its passages: half as new documents, a quarter as replaced ones
(their ids given again with new text) and a quarter deleted; then compacted. Printed: each step's seconds (the
build's, the update's, the compaction's), the update's share of the build's encode time against its share of the
passages, the index step as the update does it (the parent's index, the deleted rows masked, the new rows added)
beside a rebuild of the index alone over every row, and the bytes compaction wins back.

    python -m bench.bench_update [--passages 100000] [--percent 1] [--layers 6] [--factory Flat] [--work-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.bench_scale import TINY, make_tiny_bert, write_corpus
from memvq.memory.store import MemoryStore
from memvq.pipelines.build import build_index
from memvq.pipelines.compact import compact_store
from memvq.pipelines.config import BuildConfig
from memvq.pipelines.indexing.finalize import build_passage_index
from memvq.pipelines.logs import configure_logging
from memvq.pipelines.update import update_store

log = logging.getLogger("bench_update")


def update_inputs(work: Path, corpus: Path, passages: int, seed: int) -> tuple[list[Path], Path, dict[str, int]]:
    """The update's corpora (new documents; replaced ones: the store's ids with other text) and its delete list:
    about `passages` passages in all, half added, a quarter replaced, a quarter deleted."""
    added = work / "added.jsonl"
    write_corpus(added, max(1, passages // 2), seed=seed + 1, id_prefix="new")
    pages = [json.loads(line) for line in corpus.read_text().splitlines()]
    mean = sum(_passages(page) for page in pages) / len(pages)
    want = max(1, round(passages / 4 / mean))
    chosen = np.random.default_rng(seed).permutation(len(pages))
    replaced = [pages[i] for i in chosen[:want]]
    deleted = [pages[i]["wikipedia_id"] for i in chosen[want : 2 * want]]
    other = work / "other.jsonl"
    write_corpus(other, sum(_passages(page) for page in replaced), seed=seed + 2, id_prefix="tmp")
    fresh = [json.loads(line) for line in other.read_text().splitlines()]
    replacing = work / "replaced.jsonl"
    lines = [{**page, "text": fresh[i % len(fresh)]["text"]} for i, page in enumerate(replaced)]
    replacing.write_text("".join(json.dumps(line) + "\n" for line in lines))
    delete = work / "delete.txt"
    delete.write_text("\n".join(deleted) + "\n")
    return [added, replacing], delete, {"replaced": len(replaced), "deleted": len(deleted)}


def _passages(page: dict) -> int:
    words = sum(len(paragraph.split()) for paragraph in page["text"][1:])
    return max(1, -(-words // 100))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, default=100_000)
    parser.add_argument("--percent", type=float, default=1.0, help="share of the store's passages the update touches")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--factory", default="Flat", help="the store's FAISS index (IVF-PQ keeps its training)")
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args()
    configure_logging(logging.WARNING)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="memvq-update-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / f"corpus-{args.passages}.jsonl"
    if not corpus.is_file():
        write_corpus(corpus, args.passages)
    model = make_tiny_bert(work / f"tiny-bert-{args.layers}", args.layers)
    config = BuildConfig.model_validate(
        {"encoder": {"model": str(model)}, "codec": {"dim": TINY["hidden"]}, "index": {"factory": args.factory}}
    )
    store = work / "store"
    shutil.rmtree(store, ignore_errors=True)
    start = time.perf_counter()
    built = build_index(corpus, store, config)
    build_wall = time.perf_counter() - start

    touched = round(args.passages * args.percent / 100)
    corpora, delete, counts = update_inputs(work, corpus, touched, seed=7)
    start = time.perf_counter()
    updated = update_store(store, corpora, delete)
    update_wall = time.perf_counter() - start

    opened = MemoryStore.open(store)
    shards = {shard: size for shard, _, size in opened.shard_rows()}
    rebuild_index_s = _rebuild_index_alone(opened, config, shards, work / "index-rebuilt")

    start = time.perf_counter()
    compacted = compact_store(store, grace_s=0)
    compact_wall = time.perf_counter() - start
    assert compacted is not None

    build_busy = built.passages / (built.encode_busy_passages_per_second or float("inf"))
    share = (updated.passages_added + updated.passages_deleted) / built.passages
    rows = [
        (
            "store",
            f"{built.passages:,} passages, {built.documents:,} documents, index {args.factory}, "
            f"tiny BERT {args.layers} x {TINY['hidden']}",
        ),
        (
            "build: total / encode / index",
            f"{build_wall:.1f} s / {built.seconds['encode']:.1f} s / {built.seconds['index']:.1f} s",
        ),
        (
            "update: documents",
            f"{updated.documents_added:,} added, {updated.documents_replaced:,} replaced "
            f"({counts['replaced']:,} asked), {updated.documents_deleted:,} deleted",
        ),
        (
            "update: passages",
            f"{updated.passages_added:,} added, {updated.passages_deleted:,} deleted ({share:.2%} of the store)",
        ),
        ("update: total (wall)", f"{update_wall:.1f} s"),
        *((f"update: {stage}", f"{sec:.2f} s") for stage, sec in updated.seconds.items()),
        (
            "update encode / build encode",
            f"{updated.seconds['encode'] / built.seconds['encode']:.2%} "
            f"(added passages / store: {updated.passages_added / built.passages:.2%})",
        ),
        (
            "  actors busy: update / build",
            f"{updated.encode_busy_seconds:.2f} s / {build_busy:.1f} s = "
            f"{updated.encode_busy_seconds / build_busy:.2%}",
        ),
        ("index: the update's (mask + add)", f"{updated.seconds['index']:.2f} s"),
        ("index: rebuilt alone over every row", f"{rebuild_index_s:.2f} s"),
        ("compact: total (wall)", f"{compact_wall:.1f} s, {compacted.rows_dropped:,} rows dropped"),
        *((f"compact: {stage}", f"{sec:.2f} s") for stage, sec in compacted.seconds.items()),
        (
            "compact: bytes",
            f"{compacted.bytes_before / 2**20:.1f} MiB -> {compacted.bytes_after / 2**20:.1f} MiB, "
            f"{compacted.bytes_freed / 2**20:.1f} MiB freed",
        ),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"\n| {'what':<{width}} | measured |\n|{'-' * (width + 2)}|----------|")
    for name, value in rows:
        print(f"| {name:<{width}} | {value} |")


def _rebuild_index_alone(store: MemoryStore, config: BuildConfig, shards: dict[int, int], out: Path) -> float:
    """Seconds to build the store's index afresh over all its rows (deleted ones too: the same input size)."""
    start = time.perf_counter()
    build_passage_index(store.layout, config, shards, TINY["hidden"], out)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()

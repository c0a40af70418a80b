"""What verifying a store costs at open: sizes only (`--no-verify`), full sha256 of every file (first open, or
every open without a cache), remembered checksums (every later open), and the server's watch sweep; on a store and
on a copy of it grown to about `--gb` GB (its shards repeated under new numbers, the manifest rewritten to match),
one run, printed as a table.

    python -m bench.bench_verify --store runs/minilm-mini [--gb 1.0]

The grown copy's files were just written, so hashing reads them from the page cache: the full-sha256 column is
the hashing cost, a cold disk adds its read time on top.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

from memvq.memory.artifact import CHECKSUM_KEY, header_checksum
from memvq.memory.integrity import CACHE_ENV
from memvq.memory.store import MemoryStore, shard_suffixes


def grown_copy(store: Path, out: Path, gigabytes: float) -> Path:
    """A copy of `store` whose shards repeat until it holds about `gigabytes` GB, with a consistent manifest."""
    manifest = json.loads((store / "manifest.json").read_text())
    size = sum(record["bytes"] for name, record in manifest["files"].items() if name.startswith("shards/"))
    repeats = max(1, math.ceil(gigabytes * 1e9 / size))
    memory = manifest["codec"] is not None
    if memory:
        shutil.copytree(store / "codec", out / "codec")
    shutil.copytree(store / "index", out / "index")
    (out / "shards").mkdir()
    shards, files, row = [], {k: v for k, v in manifest["files"].items() if not k.startswith("shards/")}, 0
    for copy in range(repeats):
        for entry in manifest["shards"]:
            number = copy * len(manifest["shards"]) + entry["shard"]
            for suffix in shard_suffixes(memory):
                name = f"shards/shard-{number:05d}.{suffix}"
                shutil.copyfile(store / f"shards/shard-{entry['shard']:05d}.{suffix}", out / name)
                files[name] = manifest["files"][f"shards/shard-{entry['shard']:05d}.{suffix}"]
            shards.append({**entry, "shard": number, "row_start": row})
            row += entry["passages"]
    manifest |= {
        "shards": shards,
        "files": files,
        "num_passages": row,
        "num_tokens": manifest["num_tokens"] * repeats,
    }
    manifest[CHECKSUM_KEY] = header_checksum(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(store: Path) -> dict[str, float]:
    manifest = json.loads((store / "manifest.json").read_text())
    with tempfile.TemporaryDirectory() as cache:
        os.environ[CACHE_ENV] = cache
        sizes_only = timed(lambda: MemoryStore.open(store, verify=False))
        full = timed(lambda: MemoryStore.open(store))
        remembered = timed(lambda: MemoryStore.open(store))
        watch = MemoryStore.open(store).watch
        sweep = timed(watch.changed)
    return {
        "gb": sum(record["bytes"] for record in manifest["files"].values()) / 1e9,
        "files": len(manifest["files"]) + 1,
        "passages": manifest["num_passages"],
        "sizes_only_ms": sizes_only * 1e3,
        "full_s": full,
        "remembered_ms": remembered * 1e3,
        "sweep_ms": sweep * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, required=True, help="a finished store (e.g. runs/minilm-mini)")
    parser.add_argument("--gb", type=float, default=1.0, help="size of the grown copy")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.store.parent) as tmp:
        rows = [
            ("store", measure(args.store)),
            (f"grown to ~{args.gb:g} GB", measure(grown_copy(args.store, Path(tmp) / "grown", args.gb))),
        ]
    print(
        "| store | GB | files | passages | open --no-verify (ms) | open, full sha256 (s) | open, remembered (ms) "
        "| watch sweep (ms) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        print(
            f"| {name} | {r['gb']:.3f} | {r['files']} | {r['passages']} | {r['sizes_only_ms']:.1f} | "
            f"{r['full_s']:.2f} | {r['remembered_ms']:.1f} | {r['sweep_ms']:.2f} |"
        )


if __name__ == "__main__":
    main()

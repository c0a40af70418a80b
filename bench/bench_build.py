"""Build benchmark on the shared mini corpus with MiniLM (memory = first 4 layers), one run, printed as tables.

1. pipeline throughput (passages/s of the Ray encode step and of the whole build) vs the raw encoder forward
   pass alone over the same passages in the same (per-shard, length-sorted) batches, with Ray shut down;
2. codec quality: VQ-VAE vs faiss PQ / OPQ at 16x and 32x vs bf16 (bench_codec.codec_table);
3. `get()` latency for 20 random passages from the store (codes, and decoded memory);
4. peak memory (RSS of the build process and its Ray workers, sampled).

    python -m bench.bench_build [--docs N] [--skip-codecs]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import torch

from memvq.encoders.backbone import Backbone
from memvq.encoders.hardware import autocast
from memvq.memory.store import MemoryStore
from memvq.pipelines.build import build_index
from memvq.pipelines.config import BuildConfig
from memvq.pipelines.indexing.encode import padded_batches
from memvq.pipelines.logs import configure_logging

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "nq_open_oracle" / "wiki-mini-knowledgesource.jsonl"


def rss_now() -> int:
    """RSS of this process and its descendants (Ray workers included)."""
    me = psutil.Process()
    total = 0
    for process in [me, *me.children(recursive=True)]:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            continue
    return total


class PeakMemory:
    """Samples the RSS of this process and all its descendants (Ray workers included) every 100 ms."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_now())
            time.sleep(0.1)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def raw_forward_throughput(store: Path, config: BuildConfig) -> tuple[float, int]:
    """Passages/s of the bare model forward over the store's passages in the very batches the build makes (each
    shard's `padded_batches`), tokenised beforehand (not timed), in the build's precision, with Ray shut down
    (nothing else running)."""
    import ray

    ray.shutdown()
    torch.set_num_threads(psutil.cpu_count(logical=True))
    backbone = Backbone.from_pretrained(config.encoder.model, alpha=config.encoder.alpha)
    batches, count = [], 0
    for path in sorted((store / "shards").glob("*.passages.parquet")):
        table = pq.read_table(path, columns=["title", "text"])
        titles, texts = table.column("title").to_pylist(), table.column("text").to_pylist()
        count += len(texts)
        batches.extend(batch for _, batch in padded_batches(backbone, titles, texts, config))
    precision = config.resolved().encoder.precision  # the build's
    start = time.perf_counter()
    with torch.inference_mode(), autocast(backbone.device, precision):
        for batch in batches:
            backbone.model(**batch)
    return count / (time.perf_counter() - start), count


def get_latency(store_dir: Path, repeats: int = 200) -> dict[str, float]:
    store = MemoryStore.open(store_dir)
    rng = np.random.default_rng(0)
    timings: dict[str, list[float]] = {"get": [], "get_memory": []}
    for _ in range(repeats):
        rows = rng.choice(store.num_passages, size=20, replace=False)
        start = time.perf_counter()
        store.get(rows)
        timings["get"].append(time.perf_counter() - start)
        start = time.perf_counter()
        store.get_memory(rows)
        timings["get_memory"].append(time.perf_counter() - start)
    return {
        f"{name} {stat}": float(np.percentile(values, q)) * 1e3
        for name, values in timings.items()
        for stat, q in (("p50", 50), ("p95", 95))
    }


def subset(corpus: Path, docs: int | None, directory: Path) -> Path:
    if docs is None:
        return corpus
    path = directory / "corpus.jsonl"
    with open(corpus) as source:
        path.write_text("".join(line for _, line in zip(range(docs), source, strict=False)))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=None, help="only the first N documents (default: all)")
    parser.add_argument("--skip-codecs", action="store_true", help="skip the codec comparison table")
    parser.add_argument("--config", type=Path, default=Path(__file__).parents[1] / "configs" / "build-minilm.toml")
    args = parser.parse_args()
    configure_logging(logging.WARNING)
    config = BuildConfig.from_file(args.config)
    if not config.memory:
        parser.error(f"{args.config} builds no memory (memory = false): this benchmark times a memory's build")
    with tempfile.TemporaryDirectory() as tmp:
        corpus = subset(CORPUS, args.docs, Path(tmp))
        with PeakMemory() as memory:
            report = build_index(corpus, Path(tmp) / "store", config)
        raw, passages = raw_forward_throughput(Path(tmp) / "store", config)
        latency = get_latency(Path(tmp) / "store")

    print(f"\n## Build pipeline ({passages} passages, {report.tokens:,} tokens, MiniLM, memory = 4 layers)\n")
    rows = [
        ("raw encoder forward (tokenised beforehand)", f"{raw:.1f} passages/s", "1.00"),
        (
            "pipeline: Ray encode step (with Ray start + model load)",
            f"{report.encode_passages_per_second:.1f} passages/s",
            f"{report.encode_passages_per_second / raw:.2f}",
        ),
        (
            "pipeline: Ray encode step, actor busy time",
            f"{report.encode_busy_passages_per_second:.1f} passages/s",
            f"{report.encode_busy_passages_per_second / raw:.2f}",
        ),
        (
            "pipeline: whole build (plan+codec+encode+index)",
            f"{report.passages_per_second:.1f} passages/s",
            f"{report.passages_per_second / raw:.2f}",
        ),
    ]
    print("| what | throughput | ratio to raw forward |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print("\n| build step | seconds |\n|---|---|")
    for stage, seconds in report.seconds.items():
        print(f"| {stage} | {seconds:.1f} |")
    print(
        f"\nbytes/token {report.bytes_per_token}, compression vs bf16 {report.compression_vs_bf16:.1f}x, "
        f"codes {report.codes_bytes / 2**20:.1f} MiB; peak RSS of the build (driver + Ray workers) "
        f"{memory.peak / 2**30:.2f} GiB"
    )
    print("\n## get() for 20 random passages (ms)\n\n| stat | ms |\n|---|---|")
    for name, value in latency.items():
        print(f"| {name} | {value:.2f} |")
    if not args.skip_codecs:
        from bench.bench_codec import main as codec_main

        print("\n## Codecs on MiniLM layer-4 token vectors\n")
        codec_main()


if __name__ == "__main__":
    main()

"""Scale benchmark: the build, the store and the FAISS index from the 4,609-passage mini corpus to a million passages.

Corpora: the shared mini corpus as it is, and KILT-format corpora of exactly N passages made from its paragraphs
(random word windows of them recombined into new documents with unique ids; streamed to disk). Encoders: a small
random BERT of MiniLM's layout (`--tiny-layers` deep, default 6 as MiniLM; 32-dim heads, 4x feed-forward, MiniLM's
tokenizer and memory/live split) but 64 wide, so that encoding is cheap and the store, codec (VQ 16x vs bf16: 8
bytes/token) and index are exercised at size; and the real MiniLM (the embedded default) on the mini corpus and on a
slice of the generated corpus, for the true encode rate. Each build runs in a subprocess of its own, so that its peak
RSS (process + Ray workers, sampled by `bench_build.PeakMemory`, overall and per build step) is its own; then, in
that subprocess:

- disk per passage by file kind; the store's open time (first open: hashes every file, the store's pages dropped
  from the page cache; second open: stats only; open without verification) and the index load time;
- `get()` of 20 random passages, 200 draws: cold (a store object just made, the draw's shard files dropped from the
  page cache), then warm (the same draws on one long-lived store);
- an exact Flat index and an IVF-PQ index (the auto rule's, `approximate_factory`: IVF{4 sqrt(n) as a power
  of two},PQ{dim/12}x8; auto picks it from 32,768 passages, below that the same rule at n) over the store's
  embeddings (the one the build made is reused): build time, peak RSS over the RSS before (when the bench builds
  it), search latency (one question at a time, and all at once), recall@10 against exact search for the 1,293 NQ
  dev questions embedded by the same encoder, for IVF-PQ also at nprobe 64 and over every list (what PQ alone
  loses: the index's own ranking, without the store's re-rank).

Then it prints the tables (markdown) and a projection to 22M passages for MiniLM and a T5-XXL memory. Results are
kept per build in the work dir (result-NAME.json): a second run prints them again and builds only what is missing.

    python -m bench.bench_scale [--sizes mini,100k,1m] [--tiny-layers 6] [--minilm-slice 50000]
        [--minilm-codec-from runs/minilm-mini/codec] [--work-dir /tmp/memvq-scale] [--keep]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bench.bench_build import CORPUS, PeakMemory, rss_now
from memvq.memory.index import IndexConfig, approximate_factory
from memvq.pipelines.logs import configure_logging
from memvq.retrieval.retriever import HYBRID_DEPTH

log = logging.getLogger("bench_scale")

QUESTIONS = CORPUS.parent / "nq-oracle-dev-kilt.jsonl"
TINY = {"hidden": 64, "heads": 2, "ffn": 256}  # MiniLM: 384 wide, 6 layers, 12 heads of 32, ffn 1536
STEPS = ("plan_passages", "train_codec", "encode_all_shards", "build_passage_index")
GET_ROWS, GET_REPEATS = 20, 200
PROJECT_PASSAGES = 22_000_000


# -- corpora -----------------------------------------------------------------------------------------------------


def parse_size(text: str) -> int | None:
    """'mini' -> None (the shared mini corpus as it is); '100k', '1m', '50000' -> passages."""
    text = text.strip().lower()
    if text == "mini":
        return None
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def size_name(passages: int | None) -> str:
    if passages is None:
        return "mini"
    if passages % 1_000_000 == 0:
        return f"{passages // 1_000_000}m"
    return f"{passages // 1000}k" if passages % 1000 == 0 else str(passages)


def write_corpus(
    path: Path, passages: int, seed: int = 0, words_per_passage: int = 100, id_prefix: str = "syn"
) -> None:
    """A KILT knowledge-source jsonl that chunks into exactly `passages` passages of `words_per_passage` words:
    documents of 1-6 passages whose paragraphs are random word windows (20-120 words) of the mini corpus's
    paragraphs, titled after their first window's page, ids `{id_prefix}-N`. Written line by line (atomically)."""
    pool: list[tuple[str, list[str]]] = []
    with open(CORPUS) as source:
        for line in source:
            page = json.loads(line)
            pool.extend((page["wikipedia_title"], p.split()) for p in page["text"] if len(p.split()) >= 20)
    rng = np.random.default_rng(seed)
    quarter = words_per_passage // 4
    tmp = path.with_suffix(".tmp")
    done, doc = 0, 0
    with open(tmp, "w") as out:
        while done < passages:
            count = min(int(rng.integers(1, 7)), passages - done)
            # count - 1 full passages and a last one of >= words_per_passage // 4 words (never merged back)
            words = int(rng.integers((count - 1) * words_per_passage + quarter, count * words_per_passage + 1))
            paragraphs, title = [], None
            while words > 0:
                source_title, source = pool[int(rng.integers(len(pool)))]
                start = int(rng.integers(0, max(1, len(source) - 20)))
                window = source[start : start + min(words, int(rng.integers(20, 121)))]
                paragraphs.append(" ".join(window))
                words -= len(window)
                title = title or source_title
            record = {"wikipedia_id": f"{id_prefix}-{doc:08d}", "wikipedia_title": title, "text": [title, *paragraphs]}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            done, doc = done + count, doc + 1
    tmp.replace(path)


def make_tiny_bert(path: Path, layers: int) -> Path:
    """A random BERT of MiniLM's layout, 64 wide (TINY), `layers` deep, with MiniLM's tokenizer, saved as a local
    checkpoint."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from memvq.encoders.embedded import default_model_path

    if (path / "config.json").is_file():
        return path
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=TINY["hidden"],
        num_hidden_layers=layers,
        num_attention_heads=TINY["heads"],
        intermediate_size=TINY["ffn"],
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(path)
    AutoTokenizer.from_pretrained(default_model_path()).save_pretrained(path)
    return path


# -- measurements inside one build's subprocess -----------------------------------------------------------------


def tiny_layers(model: str) -> int:
    return json.loads((Path(model) / "config.json").read_text())["num_hidden_layers"]


def instrument_steps(build_module: Any, steps: dict[str, dict[str, float]]) -> None:
    """Wrap the build's four step functions: RSS before each and its peak during it (process + Ray workers)."""
    for name in STEPS:
        original = getattr(build_module, name)

        def wrapped(*args, _original=original, _name=name, **kwargs):
            before = rss_now()
            start = time.perf_counter()
            with PeakMemory() as memory:
                result = _original(*args, **kwargs)
            steps[_name] = {"rss_before": before, "peak": memory.peak, "seconds": time.perf_counter() - start}
            return result

        setattr(build_module, name, wrapped)


def drop_page_cache(paths: list[Path]) -> None:
    """Evict these files' pages from the page cache (fsync, then POSIX_FADV_DONTNEED); other files are untouched."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def percentiles(values: list[float]) -> dict[str, float]:
    return {"p50_ms": float(np.percentile(values, 50)) * 1e3, "p95_ms": float(np.percentile(values, 95)) * 1e3}


def disk_usage(root: Path) -> dict[str, int]:
    """Bytes of the store's files by kind (codes, offsets, emb, passages, index, codec, other)."""
    usage: dict[str, int] = {}
    for path in root.rglob("*"):
        if not path.is_file():
            continue
        relative = path.relative_to(root)
        if relative.parts[0] == "shards":
            kind = path.name.split(".", 1)[1].removesuffix(".npy").removesuffix(".parquet").removesuffix(".json")
            kind = {"done": "markers", "passages": "passages"}.get(kind, kind)
        else:
            kind = relative.parts[0] if len(relative.parts) > 1 else "manifest etc."
        usage[kind] = usage.get(kind, 0) + path.stat().st_size
    return usage


def open_times(root: Path, cache: Path) -> dict[str, float]:
    """Seconds to open the store: first (hashes every file, its pages dropped), second (stats), unverified;
    then the index load."""
    from memvq.memory.integrity import CACHE_ENV
    from memvq.memory.store import MemoryStore

    os.environ[CACHE_ENV] = str(cache)
    drop_page_cache([path for path in root.rglob("*") if path.is_file()])
    times = {}
    for name, verify in (("first_open", True), ("second_open", True), ("open_unverified", False)):
        start = time.perf_counter()
        store = MemoryStore.open(root, verify=verify)
        times[name] = time.perf_counter() - start
    start = time.perf_counter()
    _ = store.index
    times["index_load"] = time.perf_counter() - start
    return times


def get_latency(root: Path) -> dict[str, dict[str, float]]:
    """`get()` of 20 random passages, 200 draws. Cold: each draw on a store object just made (no shard mapped yet)
    with the pages of the draw's codes and offsets files dropped from the page cache (not timed). Warm: the same
    draws again on one long-lived store (its LRU keeps 64 shards mapped; the pages are cached by then)."""
    from memvq.memory.store import MemoryStore

    store = MemoryStore.open(root)  # stats only: the open before remembered the checksums
    starts = np.array([shard["row_start"] for shard in store.manifest["shards"]])
    rng = np.random.default_rng(0)
    draws = [rng.choice(store.num_passages, size=GET_ROWS, replace=False) for _ in range(GET_REPEATS)]
    cold = []
    for rows in draws:
        fresh = MemoryStore(root, store.manifest)
        shards = np.unique(np.searchsorted(starts, rows, side="right") - 1).tolist()
        drop_page_cache([store.layout.shard_file(s, suffix) for s in shards for suffix in ("codes.npy", "offsets.npy")])
        start = time.perf_counter()
        fresh.get(rows)
        cold.append(time.perf_counter() - start)
    warm = []
    for rows in draws:
        start = time.perf_counter()
        store.get(rows)
        warm.append(time.perf_counter() - start)
    return {"cold": percentiles(cold), "warm": percentiles(warm)}


def shard_embeddings(root: Path) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(row ids, float32 embeddings) shard by shard, from the store's emb.npy files."""
    from memvq.memory.store import MemoryStore

    store = MemoryStore.open(root, verify=False)
    for entry in store.manifest["shards"]:
        emb = np.asarray(store.embeddings(int(entry["shard"])), dtype=np.float32)
        yield np.arange(entry["row_start"], entry["row_start"] + len(emb), dtype=np.int64), emb


def auto_factory(passages: int, dim: int) -> str:
    """The factory a build's auto index rule picks (`IndexConfig.resolved`)."""
    return IndexConfig().resolved(passages, dim).factory


def build_index_measured(root: Path, factory: str, dim: int, passages: int) -> tuple[Any, dict[str, float]]:
    """Build `factory` over the store's embeddings (streamed by shard; an IVF's training rows gathered as the
    build's finalize step gathers them), with its time and peak RSS over the RSS before."""
    from memvq.memory.index import IndexConfig, PassageIndex, training_rows

    config = IndexConfig(factory=factory)
    before = rss_now()
    start = time.perf_counter()
    with PeakMemory() as memory:
        sample = None
        if factory != "Flat":
            rows = training_rows(passages, config)
            sample = np.empty((len(rows), dim), dtype=np.float32)
            for ids, emb in shard_embeddings(root):
                lo, hi = np.searchsorted(rows, [ids[0], ids[0] + len(ids)])
                sample[np.arange(lo, hi)] = emb[rows[lo:hi] - ids[0]]
        index = PassageIndex.build(shard_embeddings(root), dim=dim, config=config, train_sample=sample)
        del sample
    seconds = time.perf_counter() - start
    return index, {"build_s": seconds, "peak_over_before": memory.peak - before}


def index_bytes(index: Any) -> int:
    """Bytes of the index as saved (index.faiss + ids.npy)."""
    with tempfile.TemporaryDirectory() as tmp:
        index.save(Path(tmp))
        return sum(path.stat().st_size for path in Path(tmp).iterdir() if path.name != "index.json")


def search_latency(index: Any, queries: np.ndarray) -> dict[str, float]:
    """One question at a time (the first 200): p50 / p95; all at once: ms per question."""
    index.search(queries[:8], 10)  # warm up
    single = []
    for query in queries[:200]:
        start = time.perf_counter()
        index.search(query, 10)
        single.append(time.perf_counter() - start)
    start = time.perf_counter()
    index.search(queries, 10)
    batch = (time.perf_counter() - start) / len(queries)
    return {**percentiles(single), "batch_ms_per_query": batch * 1e3}


def question_embeddings(model: str | None, alpha: float) -> np.ndarray:
    import torch

    from memvq.encoders.backbone import Backbone

    with open(QUESTIONS) as source:
        questions = [json.loads(line)["input"] for line in source]
    backbone = Backbone.from_pretrained(model, alpha=alpha)
    with torch.inference_mode():
        return np.concatenate(
            [backbone.embed_texts(questions[i : i + 128], 64).float().numpy() for i in range(0, len(questions), 128)]
        )


def recall_at(found: np.ndarray, exact: np.ndarray) -> float:
    return float(
        np.mean([len(set(f.tolist()) & set(e.tolist())) / exact.shape[1] for f, e in zip(found, exact, strict=True)])
    )


def recall_by_nprobe(index: Any, queries: np.ndarray, exact: np.ndarray) -> dict[str, float]:
    """Recall@10 of an IVF index at nprobe 16 (the default), 64 and every list (what PQ alone loses)."""
    import faiss

    nlist = faiss.extract_index_ivf(index.faiss_index).nlist
    out = {}
    for nprobe in (16, 64, nlist):
        faiss.ParameterSpace().set_index_parameter(index.faiss_index, "nprobe", nprobe)
        out[str(nprobe)] = recall_at(index.search(queries, 10)[1], exact)
    faiss.ParameterSpace().set_index_parameter(index.faiss_index, "nprobe", index.config.nprobe)
    return out


def tokenize_rate(model: str | None, root: Path, limit: int = 4096) -> float:
    """Passages/s of the build's tokenisation alone on one thread (the CPU side of a GPU actor)."""
    import pyarrow.parquet as pq

    from memvq.encoders.backbone import Backbone

    backbone = Backbone.from_pretrained(model)
    titles: list[str] = []
    texts: list[str] = []
    for path in sorted(root.glob("shards/*.passages.parquet")):
        table = pq.read_table(path, columns=["title", "text"])
        titles += table.column("title").to_pylist()
        texts += table.column("text").to_pylist()
        if len(texts) >= limit:
            break
    os.environ["RAYON_NUM_THREADS"] = "1"
    start = time.perf_counter()
    for i in range(0, len(texts), 64):
        backbone.tokenize_passages(titles[i : i + 64], texts[i : i + 64], 192)
    return len(texts) / (time.perf_counter() - start)


def run_one(args: argparse.Namespace) -> None:
    """One build and its measurements (the subprocess); writes args.result as JSON."""
    from memvq.memory.store import MemoryStore
    from memvq.pipelines import build
    from memvq.pipelines.config import BuildConfig

    work, out = Path(args.work_dir), Path(args.work_dir) / f"store-{args.name}"
    cache = Path(tempfile.mkdtemp(prefix="cache-", dir=work))
    os.environ["MEMVQ_CACHE_DIR"] = str(cache)
    dim = TINY["hidden"] if args.model else 384
    overrides: dict[str, Any] = {"index": {"factory": auto_factory(args.expect or 0, dim)}}
    if args.model:
        overrides |= {"encoder": {"model": args.model}, "codec": {"dim": dim}}
    config = BuildConfig.model_validate(overrides)
    steps: dict[str, dict[str, float]] = {}
    instrument_steps(build, steps)
    log.info("%s: building %s -> %s (index %s)", args.name, args.corpus, out, config.index.factory)
    with PeakMemory() as memory:
        report = build.build_index(args.corpus, out, config, codec_from=args.codec_from)
    result: dict[str, Any] = {
        "name": args.name,
        "model": "MiniLM" if args.model is None else f"tiny BERT {tiny_layers(args.model)}L",
        "dim": dim,
        "report": report.model_dump(),
        "peak_rss": memory.peak,
        "steps": steps,
        "disk": disk_usage(out),
        "shards": report.shards,
        "codec_from": args.codec_from,
    }
    log.info("%s: built %d passages in %.0fs; measuring the store", args.name, report.passages, report.seconds["total"])
    open_cache = Path(tempfile.mkdtemp(prefix="cache-", dir=work))  # a fresh one: the first open hashes everything
    result["open"] = open_times(out, open_cache)
    result["get"] = get_latency(out)
    log.info("%s: indexes", args.name)
    queries = question_embeddings(args.model, config.encoder.alpha)
    built = MemoryStore.open(out, verify=False).index
    step = steps["build_passage_index"]
    indexes: dict[str, dict[str, Any]] = {}
    objects = {}
    for factory in ("Flat", approximate_factory(report.passages, dim)):
        if factory == config.index.factory:
            objects[factory] = built
            figures = {"build_s": step["seconds"], "peak_over_before": step["peak"] - step["rss_before"], "by": "build"}
        else:
            objects[factory], figures = build_index_measured(out, factory, dim, report.passages)
            figures["by"] = "bench"
        indexes[factory] = (
            figures | {"bytes": index_bytes(objects[factory])} | search_latency(objects[factory], queries)
        )
    exact = objects["Flat"].search(queries, 10)[1]
    for factory, index in objects.items():
        indexes[factory]["recall@10"] = recall_at(index.search(queries, 10)[1], exact)
        if factory != "Flat":
            indexes[factory]["recall@10 by nprobe"] = recall_by_nprobe(index, queries, exact)
    result["indexes"] = indexes
    if args.model is None:
        result["tokenize_passages_per_s_1_thread"] = tokenize_rate(args.model, out)
    Path(args.result).write_text(json.dumps(result, indent=1))
    for directory in (cache, open_cache):
        shutil.rmtree(directory, ignore_errors=True)
    log.info("%s: done", args.name)


# -- the tables --------------------------------------------------------------------------------------------------


def gib(value: float) -> str:
    return f"{value / 2**30:.2f} GiB"


def human(value: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B"


def column(result: dict[str, Any]) -> str:
    passages = result["report"]["passages"]
    return f"{result['model']}, {passages:,}"


def busy_seconds(report: dict[str, Any]) -> float:
    """The encoder actors' busy seconds, summed over actors."""
    return report["passages"] / (report["encode_busy_passages_per_second"] or float("inf"))


def results_table(results: list[dict[str, Any]]) -> str:
    """The figures, one column per build."""
    rows: list[tuple[str, list[str]]] = []

    def add(label: str, values: list[str]) -> None:
        rows.append((label, values))

    rep = [r["report"] for r in results]
    add("tokens / passage", [f"{r['tokens'] / r['passages']:.1f}" for r in rep])
    add("shards", [f"{r['shards']:,}" for r in rep])
    add("build: passages/s (whole build)", [f"{r['passages_per_second']:.0f}" for r in rep])
    add(
        "build: encode step passages/s (with Ray start, model loads)",
        [f"{r['encode_passages_per_second']:.0f}" for r in rep],
    )
    add(
        "build: encode passages/s of one actor (its busy time)",
        [f"{r['encode_busy_passages_per_second'] or 0:.1f}" for r in rep],
    )
    add(
        "encode: actors busy at once (busy time / step time)",
        [f"{busy_seconds(r) / r['seconds']['encode']:.2f}" for r in rep],
    )
    add("encode: µs per token, one actor (1 torch thread)", [f"{1e6 * busy_seconds(r) / r['tokens']:.1f}" for r in rep])
    for step in ("plan", "codec", "encode", "index", "total"):
        add(f"build: {step} s", [f"{r['seconds'][step]:.1f}" for r in rep])
    add("(codec fitted, or taken with codec_from)", ["taken" if r.get("codec_from") else "fitted" for r in results])
    add("peak RSS, whole build (driver + Ray)", [gib(r["peak_rss"]) for r in results])
    labels = {
        "plan_passages": "plan",
        "train_codec": "codec",
        "encode_all_shards": "encode",
        "build_passage_index": "index",
    }
    for step, label in labels.items():
        add(f"peak RSS, {label} step", [gib(r["steps"][step]["peak"]) for r in results])
    add("disk / passage, all", [f"{sum(r['disk'].values()) / r['report']['passages']:.0f} B" for r in results])
    for kind in ("codes", "emb", "passages", "offsets", "markers", "index"):
        add(f"disk / passage, {kind}", [f"{r['disk'].get(kind, 0) / r['report']['passages']:.1f} B" for r in results])
    add("store on disk", [human(sum(r["disk"].values())) for r in results])
    add("open: first (hashes all, cold) s", [f"{r['open']['first_open']:.2f}" for r in results])
    add("open: second (stat only) s", [f"{r['open']['second_open']:.2f}" for r in results])
    add("open: unverified s", [f"{r['open']['open_unverified']:.3f}" for r in results])
    add("index load s", [f"{r['open']['index_load']:.3f}" for r in results])
    for temp in ("cold", "warm"):
        add(
            f"get() 20 passages {temp}: p50 / p95 ms",
            [f"{r['get'][temp]['p50_ms']:.2f} / {r['get'][temp]['p95_ms']:.2f}" for r in results],
        )
    for kind in ("Flat", "IVF"):
        picks = [next((f, v) for f, v in r["indexes"].items() if f.startswith(kind)) for r in results]
        add(f"{kind} index: factory (built by)", [f"{f} ({v['by']})" for f, v in picks])
        add(f"{kind} index: build s", [f"{v['build_s']:.1f}" for _, v in picks])
        add(f"{kind} index: size", [human(v["bytes"]) for _, v in picks])
        add(
            f"{kind} index: peak RSS over the RSS before, built by the bench",
            [gib(v["peak_over_before"]) if v["by"] == "bench" else "–" for _, v in picks],
        )
        add(
            f"{kind} index: search 1 question p50 / p95 ms",
            [f"{v['p50_ms']:.2f} / {v['p95_ms']:.2f}" for _, v in picks],
        )
        add(f"{kind} index: search 1,293 at once, ms / question", [f"{v['batch_ms_per_query']:.3f}" for _, v in picks])
        add(f"{kind} index: recall@10 vs exact", [f"{v['recall@10']:.3f}" for _, v in picks])
        if kind == "IVF":
            add(
                "IVF index: recall@10 at nprobe 16 / 64 / all lists",
                [
                    " / ".join(f"{x:.3f}" for x in v["recall@10 by nprobe"].values())
                    if "recall@10 by nprobe" in v
                    else "–"
                    for _, v in picks
                ],
            )
    add("bench wall time of the build + measurements", [f"{r.get('wall_s', 0) / 60:.1f} min" for r in results])
    lines = ["| | " + " | ".join(column(r) for r in results) + " |", "|---|" + "---:|" * len(results)]
    lines += [f"| {label} | " + " | ".join(values) + " |" for label, values in rows]
    return "\n".join(lines)


def projection(results: list[dict[str, Any]]) -> str:
    """22M passages for MiniLM (384-d, 48 B/token) and a T5-XXL memory (4096-d, 512 B/token)."""

    largest = max(results, key=lambda r: r["report"]["passages"])
    minilm = [r for r in results if r["model"] == "MiniLM"]
    minilm_run = max(minilm, key=lambda r: r["report"]["passages"]) if minilm else None
    p = PROJECT_PASSAGES
    tpp = largest["report"]["tokens"] / largest["report"]["passages"]
    text_bpp = largest["disk"]["passages"] / largest["report"]["passages"]
    marker_bpp = largest["disk"].get("markers", 0) / largest["report"]["passages"]
    tokens = p * tpp
    lines = [
        f"Basis: {tpp:.1f} tokens/passage and {text_bpp:.0f} B/passage of parquet text ({column(largest)}; MiniLM's "
        "tokenizer, T5's assumed alike), 256-passage shards.",
        "",
        "| 22M passages | MiniLM (384-d, 6 layers) | T5-XXL memory (4096-d, 24 layers) |",
        "|---|---:|---:|",
    ]
    # (dim, bytes/token at 16x vs bf16, forward FLOPs/token of the whole encoder, question-encoder weight bytes)
    models = {"MiniLM": (384, 48, 22.4e6, 22.7e6 * 4), "T5-XXL": (4096, 512, 9.3e9, 4.63e9 * 2)}
    cells: dict[str, list[str]] = {}

    def add(label: str, values: list[str]) -> None:
        cells[label] = values

    rows: dict[str, dict[str, float]] = {}
    for name, (dim, bpt, flops, weights) in models.items():
        factory = auto_factory(p, dim)
        nlist, m = int(factory.split(",")[0][3:]), int(factory.split(",")[1][2:].split("x")[0])
        rows[name] = {
            "codes": tokens * bpt,
            "emb": p * dim * 2,
            "rest": p * (text_bpp + marker_bpp + 8),
            "flat": p * (dim * 4 + 8),
            "ivfpq": p * (m + 8 + 8) + nlist * dim * 4,
            "weights": weights,
            "flops": flops,
            "factory": factory,
        }
    for label, key in (
        ("codes (tokens x bytes/token)", "codes"),
        ("embeddings (fp16)", "emb"),
        ("text, offsets, markers", "rest"),
    ):
        add(label, [human(rows[n][key]) for n in models])
    add("store on disk (without index)", [human(rows[n]["codes"] + rows[n]["emb"] + rows[n]["rest"]) for n in models])
    add("index: exact Flat", [human(rows[n]["flat"]) for n in models])
    add("index: auto IVF-PQ", [f"{human(rows[n]['ivfpq'])} ({rows[n]['factory']})" for n in models])
    shards = p / 256
    store_bytes = sum(largest["disk"].values())
    add("shards (256 passages)", [f"{shards:,.0f}"] * 2)
    add(
        f"manifest, plan, config (measured {largest['disk']['manifest etc.'] / largest['shards']:.0f} B per shard)",
        [human(largest["disk"]["manifest etc."] / largest["shards"] * shards)] * 2,
    )
    add(
        f"store open, stat only (measured {1e3 * largest['open']['second_open'] / largest['shards']:.2f} ms/shard)",
        [f"{largest['open']['second_open'] / largest['shards'] * shards / 60:.1f} min"] * 2,
    )
    rate = store_bytes / largest["open"]["first_open"]
    add(
        f"store first open, hashing every file (measured {rate / 1e6:.0f} MB/s)",
        [f"{(rows[n]['codes'] + rows[n]['emb'] + rows[n]['rest']) / rate / 60:.0f} min" for n in models],
    )
    add("RAM: IVF-PQ index (resident)", [human(rows[n]["ivfpq"]) for n in models])
    rerank = IndexConfig().rerank
    add(
        f"embeddings read per question (IVF-PQ: {rerank} x 10 candidates re-ranked, + up to {HYBRID_DEPTH} BM25 "
        "rows in hybrid; fp16, memory-mapped)",
        [
            f"{human(rerank * 10 * dim * 2)} / {human((rerank * 10 + HYBRID_DEPTH) * dim * 2)}"
            for dim, *_ in models.values()
        ],
    )
    add("RAM: question encoder weights (fp32 / bf16)", [human(rows[n]["weights"]) for n in models])
    add(
        "codes read per question (10 passages; memory-mapped, from page cache or disk)",
        [human(10 * tpp * bpt) for bpt in (48, 512)],
    )
    add("RAM to keep every code in page cache", [human(rows[n]["codes"]) for n in models])
    if minilm_run is not None:
        rep = minilm_run["report"]
        s_per_token = 1 / (rep["encode_busy_passages_per_second"] * rep["tokens"] / rep["passages"])
        cpu = [tokens * s_per_token / 3600, tokens * s_per_token * (9.3e9 / 22.4e6) / 3600]
        add(
            f"build hours, one CPU actor of 1 thread (MiniLM measured here, {1e6 * s_per_token:.0f} µs/token; "
            "T5-XXL scaled by FLOPs)",
            [f"{h:,.0f}" for h in cpu],
        )
    gpu = [tokens * rows[n]["flops"] / (989e12 * 0.4) / 3600 for n in models]
    add("build hours per H100 actor, ESTIMATE (FLOPs/token / 40% of 989 bf16 TFLOP/s)", [f"{h:,.2f}" for h in gpu])
    if minilm_run is not None and "tokenize_passages_per_s_1_thread" in minilm_run:
        rate = minilm_run["tokenize_passages_per_s_1_thread"]
        add(
            f"CPU core-hours of tokenisation alone (measured {rate:,.0f} passages/s on one thread)",
            [f"{p / rate / 3600:.1f}"] * 2,
        )
    lines += [f"| {label} | " + " | ".join(values) + " |" for label, values in cells.items()]
    return "\n".join(lines)


# -- the driver --------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="mini,100k,1m", help="tiny-BERT builds: 'mini' and/or passage counts")
    parser.add_argument(
        "--minilm-slice", type=int, default=50_000, help="MiniLM build on N generated passages (0: none)"
    )
    parser.add_argument(
        "--minilm-mini", action=argparse.BooleanOptionalAction, default=True, help="MiniLM on the mini corpus"
    )
    parser.add_argument("--tiny-layers", type=int, default=6, help="depth of the tiny BERT (MiniLM: 6)")
    parser.add_argument(
        "--minilm-codec-from",
        type=Path,
        help="a fitted codec of MiniLM's default build (e.g. runs/minilm-mini/codec) for the MiniLM builds: no codec "
        "fit (minutes on 2 cores), the build's `codec_from`",
    )
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "memvq-scale")
    parser.add_argument("--keep", action="store_true", help="keep the stores (the corpora are always kept for reuse)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--expect", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--codec-from", help=argparse.SUPPRESS)
    args = parser.parse_args()
    configure_logging()
    for noisy in ("pipelines", "memory", "ray", "faiss", "data", "encoders"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.child:
        run_one(args)
        return

    started = time.perf_counter()
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    runs: list[tuple[str, Path, str | None, int | None]] = []  # name, corpus, model (None: MiniLM), passages
    tiny = None
    for text in args.sizes.split(","):
        passages = parse_size(text)
        tiny = tiny or str(make_tiny_bert(work / f"tiny-bert-{args.tiny_layers}l", args.tiny_layers))
        name = f"tiny{args.tiny_layers}l-{size_name(passages)}"
        runs.append((name, corpus_for(work, passages), tiny, passages))
    if args.minilm_mini:
        runs.append(("minilm-mini", CORPUS, None, None))
    if args.minilm_slice:
        runs.append(
            (f"minilm-{size_name(args.minilm_slice)}", corpus_for(work, args.minilm_slice), None, args.minilm_slice)
        )
    results = []
    for name, corpus, model, passages in runs:
        result_path = work / f"result-{name}.json"
        store = work / f"store-{name}"
        if not result_path.is_file():
            shutil.rmtree(store, ignore_errors=True)
            command = [sys.executable, "-m", "bench.bench_scale", "--child", "--name", name, "--corpus", str(corpus)]
            command += ["--work-dir", str(work), "--result", str(result_path), "--expect", str(passages or 0)]
            command += ["--model", model] if model else []
            command += ["--codec-from", str(args.minilm_codec_from)] if model is None and args.minilm_codec_from else []
            clock = time.perf_counter()
            with open(work / f"log-{name}.txt", "w") as logfile:
                subprocess.run(
                    command,
                    check=True,
                    stdout=logfile,
                    stderr=subprocess.STDOUT,
                    env=os.environ | {"TQDM_DISABLE": "1"},
                )
            seconds = time.perf_counter() - clock
            log.info("%s: finished in %.0fs", name, seconds)
            result_path.write_text(json.dumps(json.loads(result_path.read_text()) | {"wall_s": seconds}, indent=1))
        results.append(json.loads(result_path.read_text()))
        if not args.keep:
            shutil.rmtree(store, ignore_errors=True)
    print("\n## Build, store and index by corpus size\n")
    print(results_table(results))
    print("\n## Projection to 22M passages\n")
    print(projection(results))
    print(f"\nbench wall time {(time.perf_counter() - started) / 60:.1f} min; work dir {work}")


def corpus_for(work: Path, passages: int | None) -> Path:
    """The mini corpus, or a generated one of `passages` passages (made once, reused from the work dir)."""
    if passages is None:
        return CORPUS
    path = work / f"corpus-{size_name(passages)}.jsonl"
    if not path.is_file():
        clock = time.perf_counter()
        write_corpus(path, passages)
        log.info(
            "wrote %s (%d passages, %s) in %.0fs",
            path,
            passages,
            human(path.stat().st_size),
            time.perf_counter() - clock,
        )
    return path


if __name__ == "__main__":
    main()

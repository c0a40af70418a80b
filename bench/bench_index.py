"""Candidate FAISS indexes over N real MiniLM passage embeddings: recall@10 of exact search, latency, size.

The real set: the shared mini corpus (4,609 passages) embedded by the embedded MiniLM (a store built once without
memory and cached in the work dir) and the NQ dev questions as queries. Where N exceeds it, the set is grown with
perturbed copies: each copy is a real embedding plus Gaussian noise (`--noise`, per dimension), normalised again;
so neighbourhoods are denser than Wikipedia's and the recall figures are of that set (printed as such). Ground
truth: exact inner-product top-10 over the N vectors. Each index is built over the N vectors (IVF-PQ trained on
100k of them, the build's `train_size`), then searched one question at a time with faiss on the machine's threads;
`refine` is the store's re-rank (`memory.index.rerank_exact`: refine x 10 candidates re-scored with the fp16
embeddings). One line per index and setting:

    index=<factory> nprobe=<n> refine=<k> recall@10=<x> ms/query=<y> bytes/passage=<z>

    python -m bench.bench_index --passages 1000000 [--queries 300] [--noise 0.02] [--refine 1 4 10] [--nprobe 16 64]
        [--hnsw] [--work-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np

from memvq.memory.index import IndexConfig, PassageIndex, rerank_exact, training_rows
from memvq.memory.store import MemoryStore
from memvq.pipelines.build import build_index
from memvq.pipelines.config import BuildConfig
from memvq.pipelines.logs import configure_logging
from memvq.retrieval.retriever import Retriever

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "nq_open_oracle"
log = logging.getLogger("bench_index")


def real_set(work: Path) -> tuple[np.ndarray, np.ndarray]:
    """(passage embeddings 'n 384' float16, question embeddings 'q 384' float32), cached in `work`."""
    cached = work / "real.npz"
    if cached.is_file():
        with np.load(cached) as saved:
            return saved["passages"], saved["questions"]
    store_dir = work / "mini-store"
    build_index(SHARED / "wiki-mini-knowledgesource.jsonl", store_dir, BuildConfig.model_validate({"memory": False}))
    store = MemoryStore.open(store_dir)
    passages = store.embeddings_of(np.arange(store.num_rows)).astype(np.float16)
    lines = (SHARED / "nq-oracle-dev-kilt.jsonl").read_text().splitlines()
    questions = Retriever.for_store(store).embed([json.loads(line)["input"] for line in lines])
    np.savez(cached, passages=passages, questions=questions)
    return passages, questions


def grown(real: np.ndarray, n: int, noise: float, seed: int = 0) -> np.ndarray:
    """`n` unit vectors float16: the real ones, then perturbed copies of them (in chunks, to bound memory)."""
    out = np.empty((n, real.shape[1]), dtype=np.float16)
    take = min(n, len(real))
    out[:take] = real[:take]
    rng = np.random.default_rng(seed)
    for start in range(take, n, 100_000):
        stop = min(n, start + 100_000)
        source = real[rng.integers(0, len(real), stop - start)].astype(np.float32)
        source += rng.normal(0.0, noise, source.shape).astype(np.float32)
        out[start:stop] = source / np.linalg.norm(source, axis=1, keepdims=True)
    return out


def candidates(n: int, dim: int, hnsw: bool, nprobe: list[int]) -> list[tuple[str, str, list[int]]]:
    """(factory, search parameter, its values) to measure: Flat, IVF-PQ at 4 sqrt(n) lists (a power of two) with
    dim / 8 and dim / 12 bytes per vector, and HNSW32 when asked (its build is long on 2 cores)."""
    lists = 2 ** round(math.log2(4 * math.sqrt(n)))
    ivf = [(f"IVF{lists},PQ{dim // bytes_per}x8", "nprobe", nprobe) for bytes_per in (8, 12)]
    found = [("Flat", "", [0]), *ivf]
    if hnsw:
        found.append(("HNSW32", "efSearch", [64, 128]))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--noise", type=float, default=0.02, help="per-dimension sigma of a perturbed copy")
    parser.add_argument("--refine", type=int, nargs="*", default=[1, 4, 10])
    parser.add_argument("--nprobe", type=int, nargs="*", default=[16, 64])
    parser.add_argument("--hnsw", action="store_true", help="also HNSW32 (efSearch 64 and 128)")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "memvq-bench-index")
    args = parser.parse_args()
    configure_logging(logging.WARNING)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    real, questions = real_set(args.work_dir)
    vectors = grown(real, args.passages, args.noise)
    queries = questions[: args.queries]
    dim = vectors.shape[1]
    exact = PassageIndex.build([(np.arange(len(vectors)), vectors)], dim, IndexConfig(factory="Flat", use_gpu=False))
    truth = exact.search(queries, 10)[1]
    print(f"# {len(real):,} real MiniLM passage embeddings grown to {len(vectors):,} (noise {args.noise}/dim), "
          f"{len(queries)} NQ dev questions, faiss threads {faiss.omp_get_max_threads()}")  # fmt: skip
    for factory, parameter, values in candidates(len(vectors), dim, args.hnsw, args.nprobe):
        config = IndexConfig(factory=factory, use_gpu=False)
        sample = vectors[training_rows(len(vectors), config)].astype(np.float32) if factory != "Flat" else None
        start = time.perf_counter()
        index = exact if factory == "Flat" else PassageIndex.build(chunks(vectors), dim, config, train_sample=sample)
        built = time.perf_counter() - start
        size = (faiss.serialize_index(index.faiss_index).nbytes + 8 * index.ntotal) / index.ntotal
        for value in values:
            if parameter:
                faiss.ParameterSpace().set_index_parameter(index.faiss_index, parameter, value)
            for refine in args.refine if factory != "Flat" else [1]:
                rows, seconds = search(index, queries, vectors, refine)
                recall = np.mean([len(set(r) & set(t)) / 10 for r, t in zip(rows, truth, strict=True)])
                setting = {"nprobe": f"nprobe={value}", "efSearch": f"nprobe=- efSearch={value}"}
                ms = 1000 * seconds / len(queries)
                print(
                    f"index={factory} {setting.get(parameter, 'nprobe=-')} refine={refine} recall@10={recall:.3f} "
                    f"ms/query={ms:.2f} bytes/passage={size:.1f} build_s={built:.0f}"
                )


def chunks(vectors: np.ndarray, size: int = 100_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(row ids, vectors) batches, as a build streams its shards' embeddings."""
    for start in range(0, len(vectors), size):
        yield np.arange(start, min(start + size, len(vectors))), vectors[start : start + size]


def search(index: PassageIndex, queries: np.ndarray, vectors: np.ndarray, refine: int) -> tuple[np.ndarray, float]:
    """Top-10 rows per question, one question at a time (re-ranked by `refine` x 10 candidates), and the seconds."""
    found = np.empty((len(queries), 10), dtype=np.int64)
    start = time.perf_counter()
    for i, query in enumerate(queries):
        _, rows = index.search(query[None], 10 * refine)
        if refine > 1:
            _, rows = rerank_exact(query[None], rows, lambda chosen: vectors[chosen], 10)
        found[i] = rows[0, :10]
    return found, time.perf_counter() - start


if __name__ == "__main__":
    main()

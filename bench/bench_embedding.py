"""Which dense embedding retrieves better from a store: the full-depth mean pool the build stores in its index (what
sentence-transformers trained MiniLM and MPNet for) or a mean pool of the memory layers' output (the store's memory,
decoded, for the passages; the memory layers over the question for the questions).

Exact inner-product search over every passage for both, so that only the embedding differs; page-level KILT
R-precision and recall@5 / @20 (`data.kilt.metrics`) over the first N questions of each KILT file:

    python -m bench.bench_embedding --store runs/mpnet-mini --data runs/splits/nq-dev.jsonl \
        --data runs/splits/squad-dev.jsonl [--limit 270]
"""

from __future__ import annotations

import argparse
import logging
import statistics
from pathlib import Path
from typing import Any

import torch

from memvq.data.kilt.metrics import evidence_rank, recall_at_k, rprecision
from memvq.data.kilt.records import read_kilt_file, record_input
from memvq.encoders.backbone import mean_pool
from memvq.encoders.hardware import Resolved, autocast, resolve_precision
from memvq.memory.store import MemoryStore
from memvq.pipelines.logs import configure_logging
from memvq.retrieval.retriever import QUESTION_TOKENS, Retriever

BATCH = 64
KS = (5, 20)


def full_depth(store: MemoryStore) -> torch.Tensor:
    """The passages' stored embeddings 'n d' (float32)."""
    shards = range(len(store.manifest["shards"]))
    return torch.cat([torch.from_numpy(store.embeddings(shard).astype("float32")) for shard in shards])


def memory_pool(store: MemoryStore) -> torch.Tensor:
    """Mean pool of each passage's decoded memory, L2-normalised: 'n d'."""
    out = []
    for start in range(0, store.num_passages, BATCH):
        memory, mask = store.get_memory(range(start, min(start + BATCH, store.num_passages)))
        out.append(mean_pool(memory, mask))
    return torch.cat(out)


@torch.no_grad()
def questions(retriever: Retriever, texts: list[str], precision: Resolved) -> dict[str, torch.Tensor]:
    """Both embeddings 'q d' of the questions: the full-depth one the retriever uses, and the memory layers' pool."""
    encoder, full, memory = retriever.encoder, [], []
    for start in range(0, len(texts), BATCH):
        batch = encoder.tokenize_questions(texts[start : start + BATCH], QUESTION_TOKENS)
        with autocast(encoder.device, precision):
            hidden = encoder.encode_memory(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
            last = encoder.run_live(hidden, batch["attention_mask"])
        full.append(mean_pool(last.float(), batch["attention_mask"]))
        memory.append(mean_pool(hidden.float(), batch["attention_mask"]))
    return {"full depth (the index's)": torch.cat(full), "memory layers": torch.cat(memory)}


def page_scores(store: MemoryStore, records: list[dict[str, Any]], rows: torch.Tensor) -> dict[str, float]:
    """KILT page-level R-precision and recall@k of the passages' rows ranked per question 'q k'."""
    unique = rows.unique().tolist()
    pages = {row: str(record["doc_id"]) for row, record in zip(unique, store.passages(unique), strict=True)}
    found: dict[str, list[float]] = {"R-prec": []} | {f"recall@{k}": [] for k in KS}
    for record, ranked in zip(records, rows.tolist(), strict=True):
        guess = {"id": record["id"], "output": [{"provenance": [{"wikipedia_id": pages[r]} for r in ranked]}]}
        found["R-prec"].append(rprecision(guess, record))
        rank, sets = evidence_rank(guess, record)
        for k in KS:
            found[f"recall@{k}"].append(recall_at_k(rank, sets, k) if sets else 0.0)
    return {name: 100 * statistics.fmean(values) for name, values in found.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--data", type=Path, action="append", required=True, help="KILT file (repeatable)")
    parser.add_argument("--limit", type=int, default=270, help="the first N questions of each file")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    args = parser.parse_args()
    configure_logging(logging.WARNING)
    torch.set_grad_enabled(False)
    store = MemoryStore.open(args.store)
    precision = resolve_precision(args.precision, torch.device("cpu"))
    retriever = Retriever.for_store(store, precision=precision)
    passages = {"full depth (the index's)": full_depth(store), "memory layers": memory_pool(store)}
    info = store.manifest["backbone"]
    print(f"store {args.store}: {info['model_path']}, memory = {info['memory_layers']} of {info['num_layers']} layers")
    print(f"{store.num_passages} passages, exact search, {precision}\n")
    print("| data | questions | embedding | page R-prec | recall@5 | recall@20 |")
    print("|---|---:|---|---:|---:|---:|")
    for path in args.data:
        records = read_kilt_file(path, limit=args.limit, need_input=True).records
        embedded = questions(retriever, [record_input(r) or "" for r in records], precision)
        for name, question in embedded.items():
            rows = torch.topk(question @ passages[name].T, max(KS), dim=1).indices
            scores = page_scores(store, records, rows)
            print(
                f"| {path.name} | {len(records)} | {name} | {scores['R-prec']:.1f} | {scores['recall@5']:.1f} | "
                f"{scores['recall@20']:.1f} |"
            )


if __name__ == "__main__":
    main()

"""Retrieval modes side by side: page R-precision, recall@5 and @20, and ms per question, for dense, lexical and
hybrid retrieval over one store, per KILT question file; one run, printed as a markdown table.

R-precision: of a question's R gold pages, the share among the pages of its first R distinct retrieved pages;
recall@k: whether a gold page is among the pages of its top k passages. ms/question: the retrieval of batches of 64
questions (the question embedding included), after one warm-up batch. The reader's EM per mode comes from
`memvq eval --retrieval MODE` (docs/benchmarks.md, "Retrieval modes").

    python -m bench.bench_retrieval --store runs/demo --data runs/splits/nq-dev.jsonl [--data ...] [--limit 270] \
        [--fusion score:0.2 rrf:0.1 ...]

Hybrid runs once per `--fusion METHOD:WEIGHT` (default: the mode's own fusion, `retriever.FUSION`).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from memvq.encoders.options import RETRIEVAL_MODES
from memvq.memory.store import MemoryStore
from memvq.pipelines.logs import configure_logging
from memvq.retrieval.retriever import FUSION, Fusion, Retriever

BATCH = 64


def load(path: Path, limit: int | None) -> tuple[list[str], list[set[str]]]:
    """Questions and their gold pages (wikipedia_id of every provenance record)."""
    questions, gold = [], []
    for line in path.read_text().splitlines()[:limit]:
        record = json.loads(line)
        pages = {p["wikipedia_id"] for out in record["output"] for p in out.get("provenance", [])}
        if pages:
            questions.append(record["input"])
            gold.append(pages)
    return questions, gold


def scores(pages: list[list[str]], gold: list[set[str]]) -> dict[str, float]:
    """R-precision and recall@5 / @20 of ranked pages (one list per question, with repeats) against gold pages."""
    rprec, recall5, recall20 = [], [], []
    for ranked, wanted in zip(pages, gold, strict=True):
        distinct = list(dict.fromkeys(ranked))
        rprec.append(len(set(distinct[: len(wanted)]) & wanted) / len(wanted))
        recall5.append(bool(set(ranked[:5]) & wanted))
        recall20.append(bool(set(ranked[:20]) & wanted))
    return {"R-prec": float(np.mean(rprec)), "recall@5": float(np.mean(recall5)), "recall@20": float(np.mean(recall20))}


def fusion(text: str) -> Fusion:
    """'score:0.2' -> Fusion("score", 0.2)."""
    method, _, weight = text.partition(":")
    if method not in ("score", "rrf") or not weight:
        raise argparse.ArgumentTypeError(f"{text!r}: METHOD:WEIGHT with METHOD score or rrf")
    return Fusion(method, float(weight))  # type: ignore[arg-type]


def name(mode: str, chosen: Fusion) -> str:
    """The table's name of a run."""
    return mode if mode != "hybrid" else f"hybrid ({chosen.method}, lexical x{chosen.weight:g})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--data", type=Path, action="append", required=True)
    parser.add_argument("--limit", type=int, default=None, help="the first N questions of each file")
    parser.add_argument(
        "--fusion", type=fusion, nargs="*", default=None, help="hybrid fusions to compare: METHOD:WEIGHT (score, rrf)"
    )
    args = parser.parse_args()
    configure_logging(logging.WARNING)
    retriever = Retriever.for_store(MemoryStore.open(args.store))
    retriever.search(["warm up"] * BATCH, 20, "hybrid")
    print("| questions | mode | R-prec | recall@5 | recall@20 | ms/question |\n|---|---|---:|---:|---:|---:|")
    for path in args.data:
        questions, gold = load(path, args.limit)
        runs = [(mode, FUSION) for mode in RETRIEVAL_MODES if mode != "hybrid"]
        runs += [("hybrid", chosen) for chosen in args.fusion or [FUSION]]
        for mode, retriever.fusion in runs:
            start = time.perf_counter()
            found = [
                hits
                for first in range(0, len(questions), BATCH)
                for hits in retriever.search(questions[first : first + BATCH], 20, mode)
            ]
            ms = 1000 * (time.perf_counter() - start) / len(questions)
            result = scores([[p.wikipedia_id for p in hits] for hits in found], gold)
            print(
                f"| {path.stem} ({len(questions)}) | {name(mode, retriever.fusion)} | "
                f"{result['R-prec']:.3f} | {result['recall@5']:.3f} | {result['recall@20']:.3f} | {ms:.2f} |"
            )


if __name__ == "__main__":
    main()

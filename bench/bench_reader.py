"""Reader benchmark on the NQ dev questions and the mini-corpus store, one backbone (the stores'), one run, as
tables, in one precision (`--precision`, default auto: bf16 on a CPU with native bf16).

1. speed (`--head generate` or `extract`): queries/s at batch 1 and batch 16 of FiD (alpha = 1, passage text
   re-encoded), and of LUMEN and GLIMMER (rerank K -> k) split where each `--store`'s memory was made (one store
   per live fraction, all built from the same corpus: alpha = 1/3 for configs/build-minilm.toml,
   configs/build-minilm-alpha*.toml for others), their ratio to FiD, and milliseconds per stage (retrieve,
   memory, live, rerank, decode), the median of `--repeats` rounds over every setting in turn. Every mode reads
   the same K retrieved passages; with the generate head the same 2-layer decoder writes exactly
   `--answer-tokens` tokens (decoding costs the same whatever the weights), with the extract head "decode" is
   the span search;
2. quality: EM / F1 (KILT normalisation) and page-level R-precision on each `--data` question file (held-out NQ
   and SQuAD: `memvq split`) of each trained reader given with `--reader MODE=DIR`, read from the store made by
   its memory layers, with the memory uncompressed (the memory layers re-run on the passage text), VQ 16x (the
   store), with `--codec-32x` VQ 32x (`bench_store_codec.half_width_32x` of the store's codec config, fitted here
   on the reader's memory of the store's codec sample as a build fits one, applied to the re-run memory) and, with
   `--pq-store`, faiss PQ 16x.

    python -m bench.bench_reader --store runs/minilm-mini --store runs/minilm-mini-a23 --head extract \\
        --reader glimmer=runs/reader-glimmer/reader --data runs/splits/nq-dev.jsonl \\
        --data runs/splits/squad-dev.jsonl [--pq-store runs/minilm-mini-pq]
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import replace
from fractions import Fraction
from functools import partial
from pathlib import Path
from typing import Any

import torch

from bench.bench_codec_transfer import memory_vectors
from bench.bench_store_codec import half_width_32x
from memvq.data.kilt.metrics import answer_scores, rprecision
from memvq.data.kilt.records import gold_answer_list, load_kilt, record_input
from memvq.encoders.backbone import Backbone
from memvq.encoders.config import ReaderConfig
from memvq.encoders.hardware import autocast, resolve_precision
from memvq.encoders.options import QueryOptions
from memvq.encoders.reader import Reader
from memvq.encoders.reader_io import load_reader
from memvq.memory.codecs import MemoryCodec, make_codec
from memvq.memory.store import MemoryStore
from memvq.pipelines.compatibility import IncompatibleModelError, check_compatible, split_for_store
from memvq.pipelines.config import BuildConfig
from memvq.pipelines.indexing.codec import codec_sample_rows
from memvq.pipelines.logs import configure_logging
from memvq.pipelines.rag import RAGPipeline, reader_inputs, recomputed_inputs
from memvq.pipelines.timing import QUERY_STAGES as STAGES
from memvq.retrieval.retriever import RetrievedPassage, Retriever

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
NQ_DEV = SHARED / "nq_open_oracle" / "nq-oracle-dev-kilt.jsonl"
MEMORY_MODES = ("lumen", "glimmer")  # memory-only (alpha = 0) needs a store of all-layer memory


def live_fraction(store: MemoryStore) -> str:
    """The store's alpha as a fraction of the backbone's layers ("2/3")."""
    info = store.manifest["backbone"]
    return str(Fraction(info["num_layers"] - info["memory_layers"], info["num_layers"]))


def make_reader(
    backbone: Backbone,
    store: MemoryStore,
    mode: str,
    top_k: int,
    rerank_k: int,
    answer_tokens: int,
    copy_answers: bool,
    head: str,
) -> Reader:
    """An untrained reader of `mode` on a (shared) backbone, split where the store's memory was made: the
    architecture decides the speed, not the weights."""
    config = ReaderConfig(
        mode=mode,
        top_k=top_k,
        rerank_k=rerank_k,
        decoder_layers=2,
        max_answer_tokens=answer_tokens,
        copy_answers=copy_answers and head == "generate",
        head=head,
    )
    config, memory_layers = split_for_store(config, store)
    split = Backbone(backbone.model, backbone.tokenizer, memory_layers, model_path=backbone.info.model_path)
    return Reader.from_backbone(split, config).eval()


def speed_rows(
    stores: list[MemoryStore], retrievers: dict[Path, Retriever], questions: list[str], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """FiD once, then LUMEN and GLIMMER at each store's live fraction, side by side: `args.repeats` rounds over
    every setting in turn, each row the round of median queries/s."""
    backbone = Backbone.from_pretrained(stores[0].manifest["backbone"]["model_path"])
    settings = [("fid", stores[0], "1")] + [(m, s, live_fraction(s)) for s in stores for m in MEMORY_MODES]
    pipelines = []
    for mode, store, alpha in settings:
        reader = make_reader(
            backbone, store, mode, args.top_k, args.rerank_k, args.answer_tokens, args.copy_answers, args.head
        )
        pipeline = RAGPipeline(store, reader, retrievers[store.layout.root], precision=args.precision)
        pipeline.answer(questions[:2])  # warm up
        pipelines.append((mode, alpha, pipeline))
    runs: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for _ in range(args.repeats):
        for mode, alpha, pipeline in pipelines:
            for batch in (1, 16):
                count = args.speed_questions if batch == 16 else args.speed_questions // 4
                totals = dict.fromkeys(STAGES, 0.0)
                start = time.perf_counter()
                for first in range(0, count, batch):
                    result = pipeline.answer(questions[first : first + batch], min_answer_tokens=args.answer_tokens)
                    for stage in STAGES:
                        totals[stage] += result[0].timings_ms[stage]
                seconds = time.perf_counter() - start
                runs.setdefault((mode, alpha, batch), []).append(
                    {
                        "mode": mode,
                        "alpha": alpha,
                        "batch": batch,
                        "qps": count / seconds,
                        **{stage: ms / count for stage, ms in totals.items()},
                    }
                )
    rows = [sorted(found, key=lambda row: row["qps"])[len(found) // 2] for found in runs.values()]
    fid = {row["batch"]: row["qps"] for row in rows if row["mode"] == "fid"}
    for row in rows:
        row["vs_fid"] = row["qps"] / fid[row["batch"]]
    return rows


@torch.inference_mode()  # the memory recomputed by memory layers that trained builds no autograd graph here
def quality_row(
    pipeline: RAGPipeline,
    records: list[dict[str, Any]],
    retrieved: list[list[RetrievedPassage]],
    options: QueryOptions,
) -> dict[str, float]:
    answered, rprec = [], 0.0
    reader = pipeline.reader
    for first in range(0, len(records), 16):
        chunk = records[first : first + 16]
        hits = retrieved[first : first + 16]
        questions = [record_input(r) or "" for r in chunk]
        rows = [[p.row for p in passages] for passages in hits]
        inputs = pipeline.inputs(pipeline.store, reader, rows)
        prior = torch.tensor([[p.score for p in passages] for passages in hits])
        with autocast(reader.device, pipeline.precision):
            out = reader.answer(questions, replace(inputs, retrieval_scores=prior), options)
        kept = out.kept.tolist()
        for record, answer, order, passages in zip(chunk, out.answers, kept, hits, strict=True):
            answered.append((answer, gold_answer_list(record)))
            guess = {"output": [{"provenance": [passages[j].provenance() for j in order]}]}
            rprec += rprecision(guess, record)
    scores = answer_scores(answered)
    return {"em": 100 * scores["em"], "f1": 100 * scores["f1"], "r_precision": 100 * rprec / len(records)}


def fit_32x(store: MemoryStore, reader: Reader) -> MemoryCodec:
    """A 32x codec of the store's codec config at half width, fitted on the reader's memory (in the build's
    precision) of the passages the store's codec was fitted on: a seeded sample of as many vectors as the build
    took, not the build's own sample, so its fit is like the build's, not the same."""
    config = BuildConfig.model_validate(store.manifest["config"])
    rows = codec_sample_rows(config, store.num_passages).tolist()
    with torch.inference_mode():
        vectors = memory_vectors(store, reader.backbone, rows, config.codec_train_vectors, config.seed)
    return make_codec(half_width_32x(store.codec.config)).fit(vectors)


def store_for(reader: Reader, stores: list[MemoryStore]) -> MemoryStore:
    """The first store holding the memory `reader` reads (`check_compatible`: made by as many memory layers, and
    by its own when it fine-tuned them; fid reads passage text, so any)."""
    refusals = []
    for store in stores:
        try:
            check_compatible(store, reader)
        except IncompatibleModelError as error:
            refusals.append(f"{store.layout.root}: {error}")
            continue
        return store
    raise SystemExit(f"no --store holds the memory of this {reader.config.mode} reader: " + "; ".join(refusals))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--store", type=Path, action="append", default=[], help="a store per live fraction (default runs/minilm-mini)"
    )
    parser.add_argument("--pq-store", type=Path, default=None, help="the first store's corpus with a faiss PQ codec")
    parser.add_argument("--codec-32x", action="store_true", help="quality: also the memory at 32x (fitted here)")
    parser.add_argument("--reader", action="append", default=[], help="MODE=DIR of a trained reader (repeatable)")
    parser.add_argument(
        "--data", type=Path, action="append", default=[], help="KILT questions held out from training (repeatable)"
    )
    parser.add_argument("--quality-questions", type=int, default=270, help="per --data file")
    parser.add_argument("--speed-questions", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="speed: rounds over every setting (median kept)")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--rerank-k", type=int, default=3, help="passages GLIMMER keeps (speed and quality)")
    parser.add_argument("--answer-tokens", type=int, default=8)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    parser.add_argument(
        "--head", choices=("generate", "extract"), default="generate", help="speed: the answer head of every mode"
    )
    parser.add_argument(
        "--copy-answers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="speed: the copying decoder (the embedded reader's) in every mode",
    )
    args = parser.parse_args()
    configure_logging(logging.WARNING)
    torch.manual_seed(0)
    args.precision = resolve_precision(args.precision, torch.device("cpu"))

    stores = [MemoryStore.open(path, verify=False) for path in args.store or [Path("runs/minilm-mini")]]
    retrievers = {store.layout.root: Retriever.for_store(store, precision=args.precision) for store in stores}
    data = {
        path.stem: [r for r in load_kilt(path) if record_input(r) and gold_answer_list(r)]
        for path in args.data or [NQ_DEV]
    }

    if not args.skip_speed:
        questions = [record_input(r) or "" for r in next(iter(data.values()))]
        rows = speed_rows(stores, retrievers, questions, args)
        print(
            f"\n## Speed ({args.head} head, K = {args.top_k}, GLIMMER keeps {args.rerank_k}, {args.answer_tokens} "
            f"answer tokens, copying decoder {'on' if args.copy_answers else 'off'}, {torch.get_num_threads()} "
            f"threads, {args.precision}, median of {args.repeats} rounds)\n"
        )
        print("| mode | alpha | batch | queries/s | vs FiD | " + " | ".join(f"{s} ms/q" for s in STAGES) + " |")
        print("|---|---|---:|---:|---:|" + "---:|" * len(STAGES))
        for row in rows:
            stages = " | ".join(f"{row[s]:.1f}" for s in STAGES)
            print(
                f"| {row['mode']} | {row['alpha']} | {row['batch']} | {row['qps']:.2f} | {row['vs_fid']:.2f}x | "
                f"{stages} |"
            )

    if args.reader:
        options = QueryOptions(rerank_k=args.rerank_k)
        data = {name: records[: args.quality_questions] for name, records in data.items()}
        sizes = ", ".join(f"{name} {len(records)}" for name, records in data.items())
        print(f"\n## Quality (questions: {sizes}; K = {args.top_k}, GLIMMER keeps {args.rerank_k}, {args.precision})\n")
        columns = [f"{name} {metric}" for name in data for metric in ("EM", "F1", "R-precision")]
        print("| reader | alpha | memory | " + " | ".join(columns) + " |")
        print("|---|---|---|" + "---:|" * len(columns))
        retrieved: dict[Path, dict[str, list[list[RetrievedPassage]]]] = {}  # per store, per --data file
        pq_store = MemoryStore.open(args.pq_store, verify=False) if args.pq_store else None
        for spec in args.reader:
            mode, _, directory = spec.partition("=")
            reader = load_reader(directory)
            store = store_for(reader, stores)
            retriever = retrievers[store.layout.root]
            if store.layout.root not in retrieved:
                retrieved[store.layout.root] = {
                    name: retriever.search([record_input(r) or "" for r in records], args.top_k)
                    for name, records in data.items()
                }
            variants = [("uncompressed", store, recomputed_inputs), ("VQ 16x", store, reader_inputs)]
            if reader.config.mode == "fid":  # no memory: the passage text itself
                variants = [("none (passage text)", store, reader_inputs)]
            else:
                if args.codec_32x:
                    codec = fit_32x(store, reader)
                    quantize = partial(recomputed_inputs, quantize=lambda x, c=codec: c.decode(c.encode(x)))
                    variants.append(("VQ 32x (fitted here)", store, quantize))
                if pq_store is not None:
                    check_compatible(pq_store, reader)
                    variants.append(("faiss PQ 16x", pq_store, reader_inputs))
            alpha = "1" if reader.config.mode == "fid" else live_fraction(store)
            for name, variant_store, inputs in variants:
                pipeline = RAGPipeline(variant_store, reader, retriever, inputs=inputs, precision=args.precision)
                cells = []
                for data_name, records in data.items():
                    scores = quality_row(pipeline, records, retrieved[store.layout.root][data_name], options)
                    cells += [f"{scores['em']:.1f}", f"{scores['f1']:.1f}", f"{scores['r_precision']:.1f}"]
                print(f"| {mode} | {alpha} | {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

"""fp32 vs bf16 side by side in one run, on the machine at hand: what `precision` buys and what it costs.

1. build: the encode step of `build_index` over the shared mini corpus (its Ray actors, the shipped codec, so no fit),
   passages/s of the whole step and of the actors' busy time;
2. reader: queries/s at batch 1 and 16 of the embedded default (FiD, extract head, K = 3) and of a GLIMMER
   reader (extract head, alpha 1/3, K = 10 keeping 2; untrained: the architecture decides the speed) over the
   bf16 store, the median of `--repeats` rounds, fp32 and bf16 in turn;
3. training: examples/s of optimizer steps of the embedded default's recipe (configs/train-minilm.toml) and of the
   GLIMMER one, the same batches in both precisions;
4. quality: the embedded default's EM / F1 on the held-out NQ split (`memvq split`) with the same weights, and the
   shipped codec's relative error on fp32 and bf16 memory of the same passages.

    python -m bench.bench_precision --data runs/splits/nq-dev.jsonl [--out runs/bench-precision]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.quality import relative_error
from memvq.data.kilt.metrics import answer_scores
from memvq.data.kilt.records import gold_answer_list, load_kilt, record_input
from memvq.encoders.backbone import Backbone
from memvq.encoders.config import ReaderConfig
from memvq.encoders.embedded import default_reader_path
from memvq.encoders.hardware import Resolved, autocast
from memvq.encoders.reader import Reader
from memvq.encoders.reader_io import load_reader
from memvq.memory.store import MemoryStore
from memvq.pipelines.build import build_index
from memvq.pipelines.compatibility import split_for_store
from memvq.pipelines.config import BuildConfig, TrainConfig
from memvq.pipelines.logs import configure_logging
from memvq.pipelines.rag import RAGPipeline
from memvq.pipelines.train import Trainer
from memvq.retrieval.retriever import Retriever

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CORPUS = SHARED / "nq_open_oracle" / "wiki-mini-knowledgesource.jsonl"
PRECISIONS: tuple[Resolved, ...] = ("fp32", "bf16")


def build_rows(out: Path) -> tuple[list[dict[str, Any]], Path]:
    """The mini corpus built in each precision (fresh directories); the bf16 store's path for what follows."""
    rows = []
    config = BuildConfig.from_file(ROOT / "configs" / "build-minilm.toml")
    for precision in PRECISIONS:
        store = out / f"store-{precision}"
        shutil.rmtree(store, ignore_errors=True)
        encoder = config.encoder.model_copy(update={"precision": precision})
        report = build_index(CORPUS, store, config.model_copy(update={"encoder": encoder}))
        rows.append(
            {
                "precision": precision,
                "passages": report.passages,
                "encode_s": report.seconds["encode"],
                "step": report.encode_passages_per_second,
                "busy": report.encode_busy_passages_per_second,
            }
        )
    return rows, out / "store-bf16"


def glimmer_reader(store: MemoryStore) -> Reader:
    config, memory_layers = split_for_store(
        ReaderConfig(mode="glimmer", head="extract", top_k=10, rerank_k=2, max_answer_tokens=12), store
    )
    return Reader.from_backbone(Backbone.from_pretrained(memory_layers=memory_layers), config).eval()


def reader_rows(store: MemoryStore, questions: list[str], repeats: int, count: int) -> list[dict[str, Any]]:
    """queries/s of each reader in each precision at batch 1 and 16; every round runs every setting in turn."""
    readers = {"FiD K=3 (default)": load_reader(default_reader_path()), "GLIMMER 1/3, K=10 -> 2": glimmer_reader(store)}
    retrievers = {precision: Retriever.for_store(store, precision=precision) for precision in PRECISIONS}
    pipelines = {}
    for name, reader in readers.items():
        for precision in PRECISIONS:
            pipeline = RAGPipeline(store, reader, retrievers[precision], precision=precision)
            pipeline.answer(questions[:4])  # warm up
            pipelines[(name, precision)] = pipeline
    found: dict[tuple[str, str, int], list[float]] = {}
    for _ in range(repeats):
        for (name, precision), pipeline in pipelines.items():
            for batch in (1, 16):
                n = count if batch == 16 else count // 4
                start = time.perf_counter()
                for first in range(0, n, batch):
                    pipeline.answer(questions[first : first + batch])
                found.setdefault((name, precision, batch), []).append(n / (time.perf_counter() - start))
    return [
        {"reader": name, "precision": precision, "batch": batch, "qps": statistics.median(values)}
        for (name, precision, batch), values in found.items()
    ]


def training_rows(store: Path, out: Path, steps: int) -> list[dict[str, Any]]:
    """examples/s of `steps` optimizer steps (after one warm-up step) of each recipe in each precision."""
    recipes = {
        "FiD K=3 (default recipe)": ROOT / "configs" / "train-minilm.toml",
        "GLIMMER 1/3 (glimmer recipe)": ROOT / "configs" / "train-minilm-glimmer.toml",
    }
    rows = []
    for name, recipe in recipes.items():
        for precision in PRECISIONS:
            run = out / f"train-{recipe.stem}-{precision}"
            shutil.rmtree(run, ignore_errors=True)
            config = TrainConfig.from_file(recipe, {"precision": precision, "device": "cpu"})
            trainer = Trainer(store, run, config)
            trainer.prepare_data()
            trainer.train_mode(True)
            trainer.train_step(trainer.step_batches())  # warm up
            start = time.perf_counter()
            for _ in range(steps):
                trainer.train_step(trainer.step_batches())
            seconds = time.perf_counter() - start
            optim = config.optim
            rows.append(
                {
                    "recipe": name,
                    "precision": precision,
                    "examples_per_s": steps * optim.batch_size * optim.grad_accum / seconds,
                }
            )
    return rows


def quality_rows(store: MemoryStore, data: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The embedded default's EM / F1 in each precision over `data` (KILT records)."""
    reader = load_reader(default_reader_path())
    rows = []
    for precision in PRECISIONS:
        pipeline = RAGPipeline(store, reader, Retriever.for_store(store, precision=precision), precision=precision)
        answered = []
        for first in range(0, len(data), 16):
            chunk = data[first : first + 16]
            for record, result in zip(chunk, pipeline.answer([record_input(r) or "" for r in chunk]), strict=True):
                answered.append((result.answer, gold_answer_list(record)))
        scores = answer_scores(answered)
        rows.append({"precision": precision, "em": 100 * scores["em"], "f1": 100 * scores["f1"]})
    return rows


@torch.inference_mode()
def codec_rows(store: MemoryStore, passages: int) -> list[dict[str, Any]]:
    """The store's codec on the memory of the first `passages` passages, computed in each precision."""
    info = store.manifest["backbone"]
    backbone = Backbone.from_pretrained(memory_layers=info["memory_layers"])
    records = store.passages(list(range(passages)))
    max_tokens = store.manifest["config"]["encoder"]["max_passage_tokens"]
    rows = []
    for precision in PRECISIONS:
        vectors = []
        for first in range(0, len(records), 32):
            chunk = records[first : first + 32]
            batch = backbone.tokenize_passages([r["title"] for r in chunk], [r["text"] for r in chunk], max_tokens)
            with autocast(torch.device("cpu"), precision):
                memory = backbone.encode_memory(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
            vectors.append(memory.float()[batch["attention_mask"].bool()])
        x = torch.cat(vectors)
        x_hat = store.codec.decode(store.codec.encode(x))
        rows.append({"precision": precision, "tokens": len(x), "relative_error": relative_error(x, x_hat)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "runs" / "splits" / "nq-dev.jsonl")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-precision")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--speed-questions", type=int, default=64)
    parser.add_argument("--train-steps", type=int, default=8)
    parser.add_argument("--codec-passages", type=int, default=512)
    parser.add_argument("--store", type=Path, default=None, help="skip the builds and read this store of the corpus")
    args = parser.parse_args()
    configure_logging(logging.WARNING)
    torch.manual_seed(0)
    np.random.seed(0)
    data = [r for r in load_kilt(args.data) if record_input(r) and gold_answer_list(r)]
    questions = [record_input(r) or "" for r in data]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {torch.cpu.get_capabilities()['cpu_name']}")

    store_path = args.store
    if store_path is None:
        builds, store_path = build_rows(args.out)
        print("\n## Build: the encode step over the mini corpus (2 actors x 1 thread, the shipped codec)\n")
        print("| precision | passages | encode s | passages/s (step) | passages/s (actors busy) |")
        print("|---|---:|---:|---:|---:|")
        for row in builds:
            print(
                f"| {row['precision']} | {row['passages']} | {row['encode_s']:.1f} | {row['step']:.1f} | "
                f"{row['busy']:.1f} |"
            )
        step, busy = (builds[1][key] / builds[0][key] for key in ("step", "busy"))
        print(f"\nbf16 / fp32: {step:.2f}x (step), {busy:.2f}x (actors busy)")

    store = MemoryStore.open(store_path, verify=False)
    rows = reader_rows(store, questions, args.repeats, args.speed_questions)
    print(f"\n## Reader: queries/s (median of {args.repeats} rounds)\n")
    print("| reader | batch | fp32 | bf16 | bf16 / fp32 |")
    print("|---|---:|---:|---:|---:|")
    table = {(r["reader"], r["batch"], r["precision"]): r["qps"] for r in rows}
    for name, batch in sorted({(r["reader"], r["batch"]) for r in rows}):
        fp32, bf16 = table[(name, batch, "fp32")], table[(name, batch, "bf16")]
        print(f"| {name} | {batch} | {fp32:.2f} | {bf16:.2f} | {bf16 / fp32:.2f}x |")

    rows = training_rows(store_path, args.out, args.train_steps)
    print(f"\n## Training: examples/s over {args.train_steps} optimizer steps\n")
    print("| recipe | fp32 | bf16 | bf16 / fp32 |")
    print("|---|---:|---:|---:|")
    table = {(r["recipe"], r["precision"]): r["examples_per_s"] for r in rows}
    for name in dict.fromkeys(r["recipe"] for r in rows):
        fp32, bf16 = table[(name, "fp32")], table[(name, "bf16")]
        print(f"| {name} | {fp32:.2f} | {bf16:.2f} | {bf16 / fp32:.2f}x |")

    rows = quality_rows(store, data)
    print(f"\n## Quality: the embedded default on {args.data.name} ({len(data)} questions), the same weights\n")
    print("| precision | EM | F1 |")
    print("|---|---:|---:|")
    for row in rows:
        print(f"| {row['precision']} | {row['em']:.1f} | {row['f1']:.1f} |")
    rows = codec_rows(store, args.codec_passages)
    print(f"\n## Codec: relative error of the store's codec on the memory of {args.codec_passages} passages\n")
    print("| memory computed in | tokens | relative error |")
    print("|---|---:|---:|")
    for row in rows:
        print(f"| {row['precision']} | {row['tokens']} | {row['relative_error']:.4f} |")


if __name__ == "__main__":
    main()

"""The training job: fine-tune a reader (live layers, reranker, decoder) on questions over a memory store.

Steps, each resumable: plan (read and split the tasks, write the held-out questions as KILT files) -> retrieve
(top-K store rows of every question, cached) -> train (AdamW, warmup then linear decay, gradient accumulation,
bf16 autocast on GPU, gradient clipping; generation loss + GLIMMER perplexity distillation) with a dev
evaluation (EM / F1) and a checkpoint every `eval_every` steps -> save the reader and `train.json`. With
`finetune_codec` (MEMORY-VQ) the memory is recomputed from the passages' text by the memory layers and
quantized by the store's codebooks, trained by EMA alongside the reader; the codec is saved for a rebuild. With
the reader's `train_memory_layers` the memory is recomputed too, and the memory layers train with the rest; the
store is then rebuilt with them (`build-index --memory-from OUT/reader`).

    OUT/config.json                the TrainConfig and store (a resume with another one is refused)
    OUT/data/{task}-dev.jsonl      held-out questions (KILT format: `memvq eval --data` reads them)
    OUT/retrieval.npz              top-K store rows of every train / dev question
    OUT/checkpoint.pt              trained tensors, optimizer, schedule, RNG, history (written atomically)
    OUT/reader/                    the trained reader (`--model` of query / eval / serve)
    OUT/codec/                     (finetune_codec) the fine-tuned codec: `build-index --codec-from OUT/codec`
    OUT/train.json                 manifest: config, store, versions, history, time, sha256 of the reader files
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from data.kilt.metrics import exact_match, f1, metric_max_over_ground_truths
from data.tasks import QAExample, TaskData, load_task, schedule, write_split_files
from encoders.backbone import Backbone, resolve_device
from encoders.reader import Reader
from memory.artifact import ManifestError, atomic_write, file_record, library_versions, read_json, write_json
from memory.codecs import CodebookFinetuner, VQCodec, load_codec
from memory.store import MemoryStore
from pipelines.build import CONFIG_NAME as BUILD_CONFIG
from pipelines.config import TrainConfig
from pipelines.rag import RAGPipeline, reader_inputs, recomputed_inputs
from retrieval.retriever import Retriever, passage_from_record

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
RETRIEVAL_FILE = "retrieval.npz"
CHECKPOINT_FILE = "checkpoint.pt"
READER_DIR = "reader"
CODEC_DIR = "codec"
MANIFEST_FILE = "train.json"


@dataclass
class TrainReport:
    """What a run did: steps done, stopped by the time budget or not, dev scores per evaluation, seconds."""

    steps: int
    finished: bool
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    reader_dir: Path | None = None
    codec_dir: Path | None = None


# Run arguments that do not change what a step computes: a run may be resumed with other values.
RUN_ONLY = ("max_minutes", "device")


def _check_resume(out: Path, config: TrainConfig, store: Path) -> None:
    record = {"config": config.model_dump(mode="json", exclude=set(RUN_ONLY)), "store": str(store.resolve())}
    path = out / CONFIG_FILE
    if path.is_file():
        if read_json(path, "train config") != record:
            raise ManifestError(f"{out} holds a training run with another config or store; use a new --out")
        return
    write_json(path, record)


def _retrieve_all(out: Path, tasks: Sequence[TaskData], retriever: Retriever, k: int) -> dict[str, np.ndarray]:
    """Top-k store rows 'n k' and their retrieval scores 'n k' of every train / dev question, keyed
    '{task}/{split}' and '{task}/{split}/scores'; cached in OUT (a cache without scores is rebuilt)."""
    path = out / RETRIEVAL_FILE
    if path.is_file():
        with np.load(path) as cached:
            if all(key.endswith("/scores") or f"{key}/scores" in cached.files for key in cached.files):
                return {key: cached[key] for key in cached.files}
    rows: dict[str, np.ndarray] = {}
    batch = 256
    total = sum(len(task.train) + len(task.dev) for task in tasks)
    with tqdm(total=total, desc="retrieve", unit="q") as bar:
        for task in tasks:
            for split, examples in (("train", task.train), ("dev", task.dev)):
                found = np.zeros((len(examples), k), dtype=np.int64)
                scores = np.zeros((len(examples), k), dtype=np.float32)
                for start in range(0, len(examples), batch):
                    questions = [e.question for e in examples[start : start + batch]]
                    chunk = slice(start, start + len(questions))
                    scores[chunk], found[chunk] = retriever.store.index.search(retriever.embed(questions), k)
                    bar.update(len(questions))
                rows[f"{task.config.name}/{split}"] = found
                rows[f"{task.config.name}/{split}/scores"] = scores

    def save(tmp: Path) -> None:
        with tmp.open("wb") as handle:
            np.savez(handle, **rows)

    atomic_write(path, save)
    return rows


def _optimizer(reader: Reader, config: TrainConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    optim = config.optim
    decoder = [p for p in reader.decoder.parameters() if p.requires_grad]
    decoder_ids = {id(p) for p in decoder}
    rest = [p for p in reader.parameters() if p.requires_grad and id(p) not in decoder_ids]
    optimizer = torch.optim.AdamW(
        [{"params": rest, "lr": optim.lr}, {"params": decoder, "lr": optim.decoder_lr or optim.lr}],
        weight_decay=optim.weight_decay,
    )

    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        return max(0.0, (optim.steps - step) / max(1, optim.steps - optim.warmup_steps))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def evaluate_dev(
    pipeline: RAGPipeline,
    examples: Sequence[QAExample],
    rows: np.ndarray,
    scores: np.ndarray,
    batch_size: int = 16,
) -> dict[str, float]:
    """EM and F1 (KILT normalisation) of the reader on held-out questions, with their cached retrieval
    (rows and scores 'n k': glimmer ranks passages with the retrieval scores as at query time)."""
    if not examples:
        return {}
    em = f1_sum = 0.0
    store = pipeline.store
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        chunk_rows, chunk_scores = rows[start : start + len(chunk)], scores[start : start + len(chunk)]
        records = iter(store.passages(chunk_rows.reshape(-1)))
        retrieved = [[passage_from_record(next(records), float(score)) for score in row] for row in chunk_scores]
        for example, result in zip(chunk, pipeline.read([e.question for e in chunk], retrieved), strict=True):
            em += metric_max_over_ground_truths(exact_match, result.answer, example.answers)
            f1_sum += metric_max_over_ground_truths(f1, result.answer, example.answers)
    return {"em": em / len(examples), "f1": f1_sum / len(examples)}


def train(store_path: str | Path, out: str | Path, config: TrainConfig) -> TrainReport:
    """Run (or resume) a training job; returns its report. The reader ends up in OUT/reader."""
    store_path, out = Path(store_path), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_resume(out, config, store_path)
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    store = MemoryStore.open(store_path, verify=True)
    store.codec.to(device)
    info = store.manifest["backbone"]
    backbone = Backbone.from_pretrained(config.model or info["model_path"], alpha=config.reader.live_fraction)
    reader = Reader.from_backbone(backbone.to(device), config.reader)
    retriever = Retriever.for_store(store, device)
    finetuner = _codebook_finetuner(store, config, device)
    inputs = reader_inputs
    if finetuner is not None:
        inputs = partial(recomputed_inputs, quantize=finetuner)
    elif config.reader.train_memory_layers:
        inputs = recomputed_inputs
    pipeline = RAGPipeline(store, reader, retriever, inputs=inputs)

    tasks = [load_task(task) for task in config.tasks]
    write_split_files(tasks, out / "data", splits=("dev",))
    for task in tasks:
        logger.info("task %s: %d train, %d dev questions", task.config.name, len(task.train), len(task.dev))
    rows = _retrieve_all(out, tasks, retriever, config.reader.retrieve_k)

    optim = config.optim
    optimizer, scheduler = _optimizer(reader, config)
    step, elapsed, history = 0, 0.0, []
    checkpoint_path = out / CHECKPOINT_FILE
    if checkpoint_path.is_file():
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        reader.load_trained_state(state["reader"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if finetuner is not None:
            finetuner.load_state_dict(state["codec"])
        torch.set_rng_state(state["rng"])
        step, elapsed, history = state["step"], state["seconds"], state["history"]
        logger.info("resuming at step %d (%.0f s trained)", step, elapsed)

    slots = schedule(tasks, optim.steps * optim.grad_accum * optim.batch_size, config.seed)
    use_amp = config.amp and device.type == "cuda"
    started = time.perf_counter() - elapsed
    finished = step >= optim.steps

    def save_checkpoint() -> None:
        state = {
            "reader": reader.trained_state(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "step": step,
            "seconds": time.perf_counter() - started,
            "history": history,
        }
        if finetuner is not None:
            state["codec"] = finetuner.state_dict()
        atomic_write(checkpoint_path, lambda tmp: torch.save(state, tmp))

    def train_mode(on: bool) -> None:
        reader.train(on)
        if finetuner is not None:
            finetuner.train(on)

    def evaluate() -> None:
        train_mode(False)
        scores: dict[str, Any] = {"step": step, "seconds": round(time.perf_counter() - started, 1)}
        for task in tasks:
            dev = task.dev[: task.config.max_dev]
            key = f"{task.config.name}/dev"
            for name, value in evaluate_dev(
                pipeline, dev, rows[key], rows[f"{key}/scores"], optim.batch_size * 2
            ).items():
                scores[f"{task.config.name}/{name}"] = round(value, 4)
        history.append(scores)
        logger.info("eval at step %d: %s", step, scores)
        train_mode(True)

    train_mode(True)
    bar = tqdm(total=optim.steps, initial=step, desc="train", unit="step")
    running: dict[str, float] = {}
    while step < optim.steps:
        optimizer.zero_grad(set_to_none=True)
        for micro in range(optim.grad_accum):
            first = (step * optim.grad_accum + micro) * optim.batch_size
            batch = slots[first : first + optim.batch_size]
            examples = [tasks[t].train[i] for t, i in batch]
            keys = [f"{tasks[t].config.name}/train" for t, _ in batch]
            batch_rows = [rows[key][i].tolist() for key, (_, i) in zip(keys, batch, strict=True)]
            batch_scores = torch.from_numpy(
                np.stack([rows[f"{key}/scores"][i] for key, (_, i) in zip(keys, batch, strict=True)])
            )
            answers = [e.answers[(first + n) % len(e.answers)] for n, e in enumerate(examples)]
            inputs = pipeline.inputs(store, reader, batch_rows)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                losses = reader.loss(
                    [e.question for e in examples], answers=answers, retrieval_scores=batch_scores, **inputs
                )
            (losses["loss"] / optim.grad_accum).backward()
            for name, value in losses.items():
                running[name] = 0.9 * running.get(name, value.item()) + 0.1 * value.item()
        torch.nn.utils.clip_grad_norm_([p for p in reader.parameters() if p.requires_grad], optim.max_grad_norm)
        optimizer.step()
        scheduler.step()
        step += 1
        bar.update(1)
        bar.set_postfix({name.replace("_loss", ""): f"{value:.3f}" for name, value in running.items()})
        out_of_time = config.max_minutes is not None and time.perf_counter() - started > config.max_minutes * 60
        if step % config.eval_every == 0 or step == optim.steps or out_of_time:
            evaluate()
            save_checkpoint()
        if out_of_time:
            logger.info("time budget of %.1f min reached at step %d of %d", config.max_minutes, step, optim.steps)
            break
    bar.close()
    finished = finished or step >= optim.steps
    seconds = time.perf_counter() - started
    codec_dir = None
    if finetuner is not None:
        codec_dir = out / CODEC_DIR
        finetuner.codec().save(codec_dir)
        logger.info(
            "fine-tuned codec in %s: re-encode the store with it (build-index --config %s --codec-from %s)",
            codec_dir,
            store.layout.root / BUILD_CONFIG,
            codec_dir,
        )
    reader_dir = _finalize(out, reader, config, store, step, finished, history, seconds, codec_dir)
    if config.reader.train_memory_layers:
        logger.info(
            "the reader's memory layers were fine-tuned: build its store with them (build-index --config %s "
            "--memory-from %s%s)",
            store.layout.root / BUILD_CONFIG,
            reader_dir,
            "" if codec_dir is None else f" --codec-from {codec_dir}",
        )
    return TrainReport(
        steps=step, finished=finished, history=history, seconds=seconds, reader_dir=reader_dir, codec_dir=codec_dir
    )


def _codebook_finetuner(store: MemoryStore, config: TrainConfig, device: torch.device) -> CodebookFinetuner | None:
    """The store's VQ codebooks, trainable on `device` (finetune_codec), or None. The codec is a copy of the
    store's: the store's own stays as it is, on its device."""
    if not config.finetune_codec:
        return None
    codec = load_codec(store.layout.codec_dir)
    if not isinstance(codec, VQCodec):
        raise ValueError(f"finetune_codec needs a store built with the vq codec; {store.layout.root} has another")
    return CodebookFinetuner(codec.to(device), decay=config.codec_decay)


def _finalize(
    out: Path,
    reader: Reader,
    config: TrainConfig,
    store: MemoryStore,
    step: int,
    finished: bool,
    history: list[dict[str, Any]],
    seconds: float,
    codec_dir: Path | None,
) -> Path:
    reader_dir = reader.eval().save(out / READER_DIR, fp16=True)
    files = {path.name: file_record(path) for path in sorted(reader_dir.iterdir()) if path.is_file()}
    codec_files = {} if codec_dir is None else {p.name: file_record(p) for p in sorted(codec_dir.iterdir())}
    write_json(
        out / MANIFEST_FILE,
        {
            "format": "memvq-train/1",
            "config": config.to_json(),
            "store": {"path": str(store.layout.root), "backbone": store.manifest["backbone"]},
            "steps": step,
            "finished": finished,
            "seconds": round(seconds, 1),
            "history": history,
            "reader_files": files,
            "codec_files": codec_files,
            "versions": library_versions(),
            "trainable_parameters": sum(p.numel() for p in reader.parameters() if p.requires_grad),
            "examples_seen": step * config.optim.grad_accum * config.optim.batch_size,
        },
    )
    return reader_dir

"""The training job: fine-tune a reader (live layers, reranker, answer head) on questions over a memory store.

`Trainer` steps, each resumable: `prepare_data` (read and split the tasks, write the held-out questions as KILT
files; top-K store rows of every question, cached) -> `train_step`s (AdamW, warmup then linear decay, gradient
accumulation, the run's precision (`encoders.hardware`: bf16 autocast where the hardware has it), gradient
clipping; the answer head's loss + GLIMMER perplexity distillation) with an
`score_dev` (dev EM / F1) and a `save_checkpoint` every `eval_every` steps -> `finalize` (the reader and
`train.json`). The backbone is split where the store's memory was made (its manifest's memory layers). With
`finetune_codec` (MEMORY-VQ) the memory is recomputed from the passages' text by the memory layers and
quantized by the store's codebooks, trained by EMA alongside the reader; the codec is saved for a rebuild. With
the reader's `train_memory_layers` the memory is recomputed too, and the memory layers train with the rest; the
store is then rebuilt with them (`build-index --memory-from OUT/reader`). With `init_from` the reader starts from a
saved one's tensors where they fit (`reader_io.warm_start`).

    OUT/config.json                the TrainConfig and store (a resume with another one is refused)
    OUT/data/{task}-dev.jsonl      held-out questions (KILT format: `memvq eval --data` reads them)
    OUT/retrieval.npz              top-K store rows of every train / dev question, by the store's default
                                   retrieval mode (hybrid for a store built since 2026-12-06 with a BM25 index)
    OUT/checkpoint.pt              trained tensors, optimizer, schedule, RNG, history (written atomically)
    OUT/reader/                    the trained reader (`--model` of query / eval / serve)
    OUT/codec/                     (finetune_codec) the fine-tuned codec: `build-index --codec-from OUT/codec`
    OUT/train.json                 its memvq-train header: config, store, library versions, history, time, sha256
                                   of the reader (and codec) files
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from memvq.data.kilt.metrics import answer_scores
from memvq.data.tasks import QAExample, TaskData, load_task, schedule, write_split_files
from memvq.encoders.backbone import Backbone
from memvq.encoders.hardware import Resolved, attention_kernel, autocast, resolve_device, resolve_precision
from memvq.encoders.reader import Reader
from memvq.encoders.reader_io import load_trained_state, save_reader, warm_start
from memvq.memory.artifact import ArtifactFormat, atomic_write, write_artifact
from memvq.memory.codecs import CodebookFinetuner, VQCodec, load_codec
from memvq.memory.store import MemoryStore
from memvq.pipelines.compatibility import split_for_store
from memvq.pipelines.config import TrainConfig
from memvq.pipelines.rag import RAGPipeline, reader_inputs, recomputed_inputs
from memvq.pipelines.resume import check_or_record
from memvq.retrieval.retriever import Retriever, passage_from_record

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
RETRIEVAL_FILE = "retrieval.npz"
CHECKPOINT_FILE = "checkpoint.pt"
READER_DIR = "reader"
CODEC_DIR = "codec"
MANIFEST_FILE = "train.json"
TRAIN_FORMAT = ArtifactFormat("memvq-train", 2, remake="run `memvq train` again")


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


def _check_resume(out: Path, config: TrainConfig, store: Path, precision: Resolved) -> None:
    record = {
        "config": config.model_dump(mode="json", exclude={*RUN_ONLY, "precision"}),
        "precision": precision,  # what it resolved to: a step in bf16 is not a step in fp32
        "store": str(store.resolve()),
    }
    check_or_record(out / CONFIG_FILE, record, "a training run")


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
                    scores[chunk], found[chunk] = retriever.store.search(retriever.embed(questions), k)
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
    head = [p for p in reader.answer_head.parameters() if p.requires_grad]
    head_ids = {id(p) for p in head}
    rest = [p for p in reader.parameters() if p.requires_grad and id(p) not in head_ids]
    optimizer = torch.optim.AdamW(
        [{"params": rest, "lr": optim.lr}, {"params": head, "lr": optim.head_lr or optim.lr}],
        weight_decay=optim.weight_decay,
    )

    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        return max(0.0, (optim.steps - step) / max(1, optim.steps - optim.warmup_steps))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def dev_scores(
    pipeline: RAGPipeline,
    examples: Sequence[QAExample],
    rows: np.ndarray,
    scores: np.ndarray,
    batch_size: int,
) -> dict[str, float]:
    """EM and F1 (KILT normalisation) of the reader on held-out questions, with their cached retrieval
    (rows and scores 'n k': glimmer ranks passages with the retrieval scores as at query time)."""
    if not examples:
        return {}
    store, answered = pipeline.store, []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        chunk_rows, chunk_scores = rows[start : start + len(chunk)], scores[start : start + len(chunk)]
        records = iter(store.passages(chunk_rows.reshape(-1)))
        retrieved = [[passage_from_record(next(records), float(score)) for score in row] for row in chunk_scores]
        results = pipeline.read([e.question for e in chunk], retrieved)
        answered += [(result.answer, example.answers) for example, result in zip(chunk, results, strict=True)]
    return answer_scores(answered)


@dataclass
class TrainBatch:
    """One micro-batch: the training examples, the answer each learns, its store rows 'b k' and their retrieval
    scores 'b k'."""

    examples: list[QAExample]
    answers: list[list[str]]  # gold answers, each question's rotated by its slot (the generate head learns the first)
    rows: list[list[int]]
    scores: torch.Tensor

    @property
    def questions(self) -> list[str]:
        return [e.question for e in self.examples]


class Trainer:
    """One training run over a store, in named steps: `prepare_data`, `restore_checkpoint`, `train_step` after
    `train_step` with a `score_dev` and a `save_checkpoint` every `eval_every` steps, `finalize`; `run` does all."""

    def __init__(self, store_path: Path, out: Path, config: TrainConfig, verify: bool = True) -> None:
        self.device = resolve_device(config.device)
        self.precision = resolve_precision(config.precision, self.device)
        out.mkdir(parents=True, exist_ok=True)
        _check_resume(out, config, store_path, self.precision)
        torch.manual_seed(config.seed)
        self.out, self.config = out, config
        self.store = store = MemoryStore.open(store_path, verify=verify)
        if store.has_memory:
            store.codec.to(self.device)
        reader_config, memory_layers = split_for_store(config.reader, store)
        model = config.model or store.manifest["backbone"]["model_path"]
        backbone = Backbone.from_pretrained(model, memory_layers=memory_layers)
        self.reader = reader = Reader.from_backbone(backbone.to(self.device), reader_config)
        if config.init_from is not None:
            warm_start(reader, config.init_from)
        self.retriever = Retriever.for_store(store, self.device, self.precision)
        self.finetuner = _codebook_finetuner(store, config, self.device)
        inputs = reader_inputs
        if self.finetuner is not None:
            inputs = partial(recomputed_inputs, quantize=self.finetuner)
        elif config.reader.train_memory_layers:
            inputs = recomputed_inputs
        self.pipeline = RAGPipeline(store, reader, self.retriever, inputs=inputs, precision=self.precision)
        self.optimizer, self.scheduler = _optimizer(reader, config)
        self.tasks: list[TaskData] = []
        self.rows: dict[str, np.ndarray] = {}
        self.slots: list[tuple[int, int]] = []
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.step_seconds: list[float] = []  # this run's optimizer steps, for the examples per second
        self._started = time.perf_counter()

    @property
    def seconds(self) -> float:
        """Training time so far, the resumed run's included (data preparation not counted)."""
        return time.perf_counter() - self._started

    def prepare_data(self) -> None:
        """Read and split the tasks, write the held-out questions as KILT files, retrieve (or read the cached)
        top-K store rows of every question, and lay out the multi-task schedule of training examples."""
        self.tasks = tasks = [load_task(task) for task in self.config.tasks]
        write_split_files(tasks, self.out / "data", splits=("dev",))
        for task in tasks:
            logger.info("task %s: %d train, %d dev questions", task.config.name, len(task.train), len(task.dev))
        self.rows = _retrieve_all(self.out, tasks, self.retriever, self.config.reader.top_k)
        optim = self.config.optim
        self.slots = schedule(tasks, optim.steps * optim.grad_accum * optim.batch_size, self.config.seed)

    def batch(self, first: int) -> TrainBatch:
        """The examples of schedule slots [first, first + batch_size), each answer picked in turn by slot."""
        slots = self.slots[first : first + self.config.optim.batch_size]
        examples = [self.tasks[t].train[i] for t, i in slots]
        keys = [f"{self.tasks[t].config.name}/train" for t, _ in slots]
        return TrainBatch(
            examples=examples,
            answers=[_rotated(e.answers, first + n) for n, e in enumerate(examples)],
            rows=[self.rows[key][i].tolist() for key, (_, i) in zip(keys, slots, strict=True)],
            scores=torch.from_numpy(
                np.stack([self.rows[f"{key}/scores"][i] for key, (_, i) in zip(keys, slots, strict=True)])
            ),
        )

    def step_batches(self) -> list[TrainBatch]:
        """The `grad_accum` micro-batches of the next optimizer step."""
        optim = self.config.optim
        return [self.batch((self.step * optim.grad_accum + m) * optim.batch_size) for m in range(optim.grad_accum)]

    def loss(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        """The reader's losses on a batch ('loss', the one minimised: the answer head's + GLIMMER distillation)."""
        with autocast(self.device, self.precision):  # recomputed or decoded memory too
            inputs = self.pipeline.inputs(self.store, self.reader, batch.rows)
            return self.reader.loss(batch.questions, batch.answers, replace(inputs, retrieval_scores=batch.scores))

    def train_step(self, batches: Sequence[TrainBatch]) -> dict[str, float]:
        """One optimizer step over micro-batches (gradients accumulated, then clipped); their mean losses."""
        self.optimizer.zero_grad(set_to_none=True)
        means: dict[str, float] = {}
        for batch in batches:
            losses = self.loss(batch)
            (losses["loss"] / len(batches)).backward()
            for name, value in losses.items():
                means[name] = means.get(name, 0.0) + value.item() / len(batches)
        trained = [p for p in self.reader.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(trained, self.config.optim.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return means

    def train_mode(self, on: bool) -> None:
        """Training (dropout, the attention kernel fastest for the backward pass) or evaluation."""
        self.reader.train(on)
        self.reader.backbone.model.set_attn_implementation(attention_kernel(self.device, self.precision, on))
        if self.finetuner is not None:
            self.finetuner.train(on)

    def score_dev(self) -> dict[str, Any]:
        """Dev EM / F1 of every task (its first `max_dev` questions) at this step, added to the history."""
        self.train_mode(False)
        scores: dict[str, Any] = {"step": self.step, "seconds": round(self.seconds, 1)}
        for task in self.tasks:
            dev = task.dev[: task.config.max_dev]
            key = f"{task.config.name}/dev"
            found = dev_scores(
                self.pipeline, dev, self.rows[key], self.rows[f"{key}/scores"], self.config.optim.batch_size * 2
            )
            for name, value in found.items():
                scores[f"{task.config.name}/{name}"] = round(value, 4)
        self.history.append(scores)
        logger.info("eval at step %d: %s", self.step, scores)
        self.train_mode(True)
        return scores

    def save_checkpoint(self) -> None:
        """OUT/checkpoint.pt (atomically): trained tensors, optimizer, schedule, RNG, step, seconds, history."""
        state = {
            "reader": self.reader.trained_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "step": self.step,
            "seconds": self.seconds,
            "history": self.history,
        }
        if self.finetuner is not None:
            state["codec"] = self.finetuner.state_dict()
        atomic_write(self.out / CHECKPOINT_FILE, lambda tmp: torch.save(state, tmp))

    def restore_checkpoint(self) -> bool:
        """Start the clock; resume from OUT/checkpoint.pt if there is one (True), its seconds counted."""
        self._started = time.perf_counter()
        path = self.out / CHECKPOINT_FILE
        if not path.is_file():
            return False
        state = torch.load(path, map_location="cpu", weights_only=True)
        load_trained_state(self.reader, state["reader"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.finetuner is not None:
            self.finetuner.load_state_dict(state["codec"])
        torch.set_rng_state(state["rng"])
        self.step, self.history = state["step"], state["history"]
        self._started -= state["seconds"]
        logger.info("resuming at step %d (%.0f s trained)", self.step, state["seconds"])
        return True

    def run(self) -> TrainReport:
        """Prepare the data, resume, train to the last step or the time budget (evaluating and checkpointing
        every `eval_every` steps, at the last and when out of time), then finalize."""
        config, optim = self.config, self.config.optim
        self.prepare_data()
        self.restore_checkpoint()
        self.train_mode(True)
        running: dict[str, float] = {}
        dev: dict[str, str] = {}  # the last evaluation's EM per task, shown beside the losses
        per_step = optim.batch_size * optim.grad_accum
        with tqdm(total=optim.steps, initial=self.step, desc="train", unit="step") as bar:
            while self.step < optim.steps:
                start = time.perf_counter()
                for name, value in self.train_step(self.step_batches()).items():
                    running[name] = 0.9 * running.get(name, value) + 0.1 * value
                self.step_seconds.append(time.perf_counter() - start)
                bar.update(1)
                postfix = {name.replace("_loss", ""): f"{value:.3f}" for name, value in running.items()}
                bar.set_postfix({**postfix, "ex/s": f"{per_step / self.step_seconds[-1]:.1f}", **dev})
                out_of_time = config.max_minutes is not None and self.seconds > config.max_minutes * 60
                if self.step % config.eval_every == 0 or self.step == optim.steps or out_of_time:
                    scores = self.score_dev()
                    dev = {f"dev {key}": f"{value:.3f}" for key, value in scores.items() if key.endswith("/em")}
                    self.save_checkpoint()
                if out_of_time:
                    minutes = config.max_minutes
                    logger.info("time budget of %.1f min reached at step %d of %d", minutes, self.step, optim.steps)
                    break
        return self.finalize()

    def finalize(self) -> TrainReport:
        """Save the reader (and the fine-tuned codec) and OUT/train.json; the run's report."""
        seconds, finished = self.seconds, self.step >= self.config.optim.steps
        store, codec_dir = self.store, None
        if self.finetuner is not None:
            codec_dir = self.out / CODEC_DIR
            self.finetuner.codec().save(codec_dir)
            logger.info(
                "fine-tuned codec in %s: re-encode the store with it (build-index --config %s --codec-from %s)",
                codec_dir,
                store.layout.build_config,
                codec_dir,
            )
        optim, busy = self.config.optim, sum(self.step_seconds)
        speed = busy and len(self.step_seconds) * optim.batch_size * optim.grad_accum / busy
        reader_dir = _finalize(self, finished, seconds, codec_dir, speed)
        if self.config.reader.train_memory_layers:
            logger.info(
                "the reader's memory layers were fine-tuned: build its store with them (build-index --config %s "
                "--memory-from %s%s)",
                store.layout.build_config,
                reader_dir,
                "" if codec_dir is None else f" --codec-from {codec_dir}",
            )
        return TrainReport(self.step, finished, self.history, seconds, reader_dir, codec_dir)


def train(store_path: str | Path, out: str | Path, config: TrainConfig, verify: bool = True) -> TrainReport:
    """Run (or resume) a training job; returns its report. The reader ends up in OUT/reader. `verify`: check the
    store's files first (`LoadOptions.verify`)."""
    return Trainer(Path(store_path), Path(out), config, verify).run()


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
    trainer: Trainer, finished: bool, seconds: float, codec_dir: Path | None, examples_per_second: float
) -> Path:
    out, reader, config, store, step = trainer.out, trainer.reader, trainer.config, trainer.store, trainer.step
    reader_dir = save_reader(reader.eval(), out / READER_DIR, fp16=True, trained_precision=trainer.precision)
    saved = [*reader_dir.iterdir(), *([] if codec_dir is None else codec_dir.iterdir())]
    write_artifact(
        out,
        MANIFEST_FILE,
        TRAIN_FORMAT,
        config.to_json(),
        files={path.relative_to(out).as_posix(): path for path in sorted(saved) if path.is_file()},
        extra={
            "store": {"path": str(store.layout.root), "backbone": store.manifest["backbone"]},
            "steps": step,
            "finished": finished,
            "precision": trainer.precision,
            "seconds": round(seconds, 1),
            "history": trainer.history,
            "trainable_parameters": sum(p.numel() for p in reader.parameters() if p.requires_grad),
            "examples_seen": step * config.optim.grad_accum * config.optim.batch_size,
            "examples_per_second": round(examples_per_second, 2),  # in training steps (not evaluation), this run
        },
    )
    return reader_dir


def _rotated(answers: Sequence[str], slot: int) -> list[str]:
    """The gold answers starting at the slot's turn: over the epochs a generative head learns each of them."""
    turn = slot % len(answers)
    return [*answers[turn:], *answers[:turn]]

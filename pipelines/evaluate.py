"""`memvq eval`: KILT question files -> `RAGPipeline` -> KILT predictions per task -> metrics report.

It owns running a pipeline over KILT-format question files (batched, with a progress bar, resumable), scoring
prediction files (ours or anyone's) against gold, and the report: ``report.json`` and ``report.md`` with the
metrics, queries/s and time per stage of each task, and the settings, model and store it ran with. The metrics
themselves are :func:`memvq.data.kilt.metrics.score_all`; reading and validating KILT records is
:mod:`memvq.data.kilt.records`.

Layout of an eval directory (``task``: :func:`memvq.data.kilt.records.task_of` of the data file, or its stem)::

    OUT/eval_config.json            what decides the predictions (store, model, decoding); a resume must match it
    OUT/{task}-predictions.jsonl    KILT predictions, appended and flushed per batch
    OUT/{task}-timings.json         summed stage milliseconds of the questions predicted so far
    OUT/report.json, OUT/report.md

Resuming: run the same command again; ids already in a predictions file are skipped (a task with none left is
not rerun, only rescored) unless their question's text changed since (each prediction keeps the `input` it was
predicted from: those are predicted again, with a warning), and a line torn by an interrupted write is dropped.
From a notebook::

    rag = RAGPipeline.load("runs/minilm-mini")
    report = evaluate(rag, ["nq-dev-kilt.jsonl"], "runs/eval-nq", EvalSettings(limit=100))
    report["tasks"]["nq"]["metrics"]["downstream"]["em"]
    score_predictions("nq-dev-kilt.jsonl", "runs/eval-nq/nq-predictions.jsonl")
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from tqdm import tqdm

from memvq.data.kilt import metrics as kilt_metrics
from memvq.data.kilt.records import (
    KiltFile,
    Record,
    gold_answers,
    load_kilt,
    parse_record,
    read_kilt_file,
    record_id,
    record_input,
    task_names,
)
from memvq.data.kilt.selective import is_right, selective_scores
from memvq.encoders.options import QueryOptions
from memvq.memory.artifact import atomic_write, sha256_file
from memvq.pipelines.config import LoadOptions
from memvq.pipelines.eval_report import bad_summary, jsonable, make_report, write_report
from memvq.pipelines.resume import check_or_record
from memvq.pipelines.timing import QUERY_STAGES

if TYPE_CHECKING:
    from memvq.memory.store import MemoryStore
    from memvq.pipelines.rag import RAGAnswer, RAGPipeline

logger = logging.getLogger(__name__)

CONFIG_FILE = "eval_config.json"
TIMED_STAGES = (*QUERY_STAGES, "total")

# Settings that change what is predicted: a resume with other values would mix predictions, so it is refused.
_PREDICTION_SETTINGS = ("query", "passage_text")


class EvalConfigError(ValueError):
    """An eval directory holds predictions made with another store, model or decoding settings."""


class EvalSettings(BaseModel):
    """How an eval runs and is scored (the config of report.json)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    batch_size: int = Field(16, ge=1, description="questions per pipeline call (and per flush of predictions)")
    query: QueryOptions = Field(default_factory=QueryOptions, description="the query knobs (None: the reader's)")
    limit: int | None = Field(None, ge=1, description="only the first N questions of each file")
    ks: tuple[int, ...] = Field((1, 5), description="k of the retrieval metrics @k")
    rank_keys: tuple[str, ...] = Field(("wikipedia_id",), description="provenance fields that identify a page")
    passage_text: bool = Field(True, description="write passage text in the provenance (for answer_in_context@k)")

    @field_validator("ks")
    @classmethod
    def _check_ks(cls, ks: tuple[int, ...]) -> tuple[int, ...]:
        if not ks or any(k < 1 for k in ks) or len(set(ks)) != len(ks):
            raise ValueError(f"ks must be distinct positive integers, got {list(ks)}")
        return tuple(sorted(ks))

    @field_validator("rank_keys")
    @classmethod
    def _check_rank_keys(cls, keys: tuple[str, ...]) -> tuple[str, ...]:
        if not keys or any(not k for k in keys):
            raise ValueError(f"rank_keys must be non-empty field names, got {list(keys)}")
        return keys


_DEFAULTS = EvalSettings()  # the scoring functions' defaults are the settings'

# ----------------------------------------------------------------------------------------------
# predicting


@dataclass
class TaskTiming:
    """Pipeline milliseconds per stage summed over the questions predicted (over every run of a resume)."""

    questions: int = 0
    batches: int = 0
    wall_s: float = 0.0
    stage_ms: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TIMED_STAGES, 0.0))

    @classmethod
    def load(cls, path: Path) -> TaskTiming:
        if not path.is_file():
            return cls()
        data = json.loads(path.read_text())
        return cls(data["questions"], data["batches"], data["wall_s"], {**cls().stage_ms, **data["stage_ms"]})

    def save(self, path: Path) -> None:
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(asdict(self), indent=2)))

    def add(self, questions: int, timings_ms: Mapping[str, float], wall_s: float) -> None:
        self.questions += questions
        self.batches += 1
        self.wall_s += wall_s
        for stage in TIMED_STAGES:
            self.stage_ms[stage] += float(timings_ms.get(stage, 0.0))

    def summary(self) -> dict[str, Any]:
        """queries/s (wall clock of the batches, writing included) and mean milliseconds per question and stage."""
        n = self.questions
        return {
            "questions_timed": n,
            "batches": self.batches,
            "seconds": self.wall_s,
            "queries_per_second": n / self.wall_s if self.wall_s > 0 else None,
            "ms_per_question": {stage: (ms / n if n else None) for stage, ms in self.stage_ms.items()},
        }


def prediction_record(record: Mapping[str, Any], answer: RAGAnswer, passage_text: bool = True) -> Record:
    """A KILT guess: the record's id and input, one output with the answer and the passages read as provenance."""
    return {"id": record["id"], "input": answer.question, "output": [answer.kilt_output(with_text=passage_text)]}


def predicted_inputs(path: Path) -> dict[str, str]:
    """The question each id of a predictions file was predicted from (its `input`); a last line torn by an
    interrupted write is cut off the file."""
    if not path.is_file():
        return {}
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        logger.warning("%s: dropping an incomplete last line (an interrupted run)", path)
        with path.open("r+b") as fout:
            fout.truncate(end)
    inputs: dict[str, str] = {}
    for lineno, line in enumerate(data[:end].decode("utf-8").splitlines(), start=1):
        if line.strip():
            record = parse_record(line, f"{path}:{lineno}")
            inputs[record_id(record)] = str(record.get("input"))
    return inputs


def drop_predictions(path: Path, ids: set[str]) -> None:
    """Rewrite a predictions file (atomically) without the lines of `ids`."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and record_id(json.loads(line)) not in ids]
    atomic_write(path, lambda tmp: tmp.write_text("".join(kept), encoding="utf-8"))


def predict_task(
    pipeline: RAGPipeline,
    questions: KiltFile,
    predictions_path: Path,
    settings: EvalSettings,
    timings_path: Path | None = None,
    task: str = "",
    progress: bool = True,
) -> int:
    """Predict the questions not yet in ``predictions_path``, appending (and flushing) them batch by batch.

    Stage timings are added to ``timings_path`` after each batch. Returns the number of questions predicted.
    """
    done = predicted_inputs(predictions_path)
    changed = {
        record_id(r) for r in questions.records if record_id(r) in done and done[record_id(r)] != str(record_input(r))
    }
    if changed:  # predicted from another text of the question: not an answer to this one
        logger.warning(
            "%s: %d question(s) changed since they were predicted (e.g. id %s): predicting them again",
            predictions_path,
            len(changed),
            sorted(changed)[0],
        )
        drop_predictions(predictions_path, changed)
    todo = [r for r in questions.records if record_id(r) not in done or record_id(r) in changed]
    if not todo:
        return 0
    timing = TaskTiming.load(timings_path) if timings_path else TaskTiming()
    total = len(questions.records)
    bar = tqdm(total=total, initial=total - len(todo), desc=task or None, unit="q", disable=not progress)
    with predictions_path.open("a", encoding="utf-8") as fout, bar:
        for start in range(0, len(todo), settings.batch_size):
            batch = todo[start : start + settings.batch_size]
            began = time.perf_counter()
            answers = pipeline.answer([str(record_input(r)) for r in batch], settings.query)
            lines = [
                json.dumps(prediction_record(r, a, settings.passage_text), ensure_ascii=False) + "\n"
                for r, a in zip(batch, answers, strict=True)
            ]
            fout.write("".join(lines))
            fout.flush()
            os.fsync(fout.fileno())
            timing.add(len(batch), answers[0].timings_ms, time.perf_counter() - began)
            if timings_path:
                timing.save(timings_path)
            bar.update(len(batch))
    return len(todo)


# ----------------------------------------------------------------------------------------------
# scoring


def score_records(
    gold: Sequence[Mapping[str, Any]],
    guess: Sequence[Mapping[str, Any]],
    ks: Sequence[int] = _DEFAULTS.ks,
    rank_keys: Sequence[str] = _DEFAULTS.rank_keys,
) -> dict[str, Any]:
    """:func:`kilt_metrics.score_all` over the gold records that have an answer.

    Gold records without any answer (a test file without answers, some ELI5 records) cannot be scored and
    are counted as ``unscored``; guesses for ids outside ``gold`` (e.g. beyond ``--limit``) are ignored and
    counted as ``extra_predictions``. Missing or malformed guesses raise :class:`KiltFormatError`.
    """
    scorable = [r for r in gold if gold_answers(r)]
    ids = {record_id(r) for r in scorable}
    all_ids = {record_id(r) for r in gold}
    kept = [g for g in guess if record_id(g) in ids]
    extra = sum(1 for g in guess if record_id(g) not in all_ids)
    metrics = kilt_metrics.score_all(scorable, kept, ks, rank_keys) if scorable else None
    return {
        "scored": len(scorable),
        "unscored": len(gold) - len(scorable),
        "extra_predictions": extra,
        "metrics": metrics,
        "selective": selective_report(scorable, kept),
    }


def judged_outputs(
    gold: Sequence[Mapping[str, Any]], guess: Sequence[Mapping[str, Any]]
) -> list[tuple[str, Mapping[str, Any], bool]] | None:
    """(id, output, right) per gold record with a guess, when every guess carries a confidence (None otherwise):
    right is the exact match with a gold answer of the answer it would give (`candidate` when it abstained)."""
    outputs = {record_id(g): g["output"][0] for g in guess}
    if not outputs or not all("confidence" in output for output in outputs.values()):
        return None
    return [
        (ident, output, is_right(output.get("candidate") or output["answer"], gold_answers(r)))
        for r in gold
        if (output := outputs.get(ident := record_id(r))) is not None
    ]


def selective_report(gold: Sequence[Mapping[str, Any]], guess: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """`selective_scores` of guesses that all carry a confidence (None otherwise; see `judged_outputs`)."""
    judged = judged_outputs(gold, guess)
    if judged is None:
        return None
    confidence = [float(output["confidence"]) for _, output, _ in judged]
    abstained = [bool(output.get("abstained")) for _, output, _ in judged]
    return selective_scores(confidence, [right for _, _, right in judged], abstained)


def score_predictions(
    gold_file: str | Path,
    predictions_file: str | Path,
    ks: Sequence[int] = _DEFAULTS.ks,
    rank_keys: Sequence[str] = _DEFAULTS.rank_keys,
    limit: int | None = None,
) -> dict[str, Any]:
    """Score a KILT prediction file against a gold file (``limit``: its first N records) without any model.

    Bad gold lines are skipped and listed (``bad_records``); the predictions must be well formed (one output
    per record with an answer and provenance, every gold id predicted), as the official scripts want.
    """
    gold = read_kilt_file(gold_file, limit=limit)
    guess = load_kilt(predictions_file)
    return {
        "data": str(gold_file),
        "predictions": str(predictions_file),
        "questions": len(gold.records),
        **bad_summary(gold),
        **score_records(gold.records, guess, ks, rank_keys),
    }


def pair_predictions(
    data_files: Sequence[str | Path], prediction_files: Sequence[str | Path]
) -> list[tuple[str, Path, Path]]:
    """(task, gold file, predictions file) triples.

    By task name when every predictions file's task name (:func:`task_names`: ``nq-predictions.jsonl`` ->
    ``nq``, as ``evaluate`` writes them) is that of a ``--data`` file (data files left without predictions are
    not scored); otherwise in the order given, which needs as many predictions files as data files.
    """
    data = [Path(p) for p in data_files]
    preds = [Path(p) for p in prediction_files]
    data_names = task_names(data)
    pred_names = task_names(preds)
    if set(pred_names) <= set(data_names):
        by_name = dict(zip(pred_names, preds, strict=True))
        return [(name, d, by_name[name]) for name, d in zip(data_names, data, strict=True) if name in by_name]
    if len(preds) != len(data):
        raise ValueError(
            f"cannot pair {len(preds)} predictions file(s) with {len(data)} data file(s): their task names "
            f"({', '.join(pred_names)} vs {', '.join(data_names)}) do not match and the counts differ"
        )
    logger.info("task names of predictions and data files differ: pairing them in the order given")
    return list(zip(data_names, data, preds, strict=True))


def run_eval(
    data_files: Sequence[str | Path],
    out_dir: str | Path | None,
    settings: EvalSettings,
    *,
    store: str | Path | None = None,
    model: str | Path | None = None,
    load: LoadOptions | None = None,
    predictions: Sequence[str | Path] | None = None,
) -> dict[str, Any]:
    """What `memvq eval` runs: score `predictions` against the data files when given, else load the pipeline (the
    store and the reader, None: the embedded default) and `evaluate` it."""
    if predictions is not None:
        return score_prediction_files(data_files, predictions, out_dir, settings)
    if store is None or out_dir is None:
        raise ValueError("running a model needs a store and an output directory")
    from memvq.encoders.embedded import default_reader_path
    from memvq.pipelines.rag import RAGPipeline

    model_path = model if model is not None else default_reader_path()
    pipeline = RAGPipeline.load(store, model_path, **(load or LoadOptions()).model_dump())
    return evaluate(pipeline, data_files, out_dir, settings, model_path=model_path)


def score_prediction_files(
    data_files: Sequence[str | Path],
    prediction_files: Sequence[str | Path],
    out_dir: str | Path | None = None,
    settings: EvalSettings | None = None,
) -> dict[str, Any]:
    """Score existing prediction files (paired by :func:`pair_predictions`); write the report if ``out_dir``."""
    settings = settings or EvalSettings()
    tasks: dict[str, Any] = {}
    for name, gold_file, pred_file in pair_predictions(data_files, prediction_files):
        tasks[name] = score_predictions(gold_file, pred_file, settings.ks, settings.rank_keys, settings.limit)
    report = make_report("score", settings.model_dump(mode="json"), tasks, out_dir)
    if out_dir is not None:
        write_report(report, out_dir)
    return report


# ----------------------------------------------------------------------------------------------
# running


def evaluate(
    pipeline: RAGPipeline,
    data_files: Sequence[str | Path],
    out_dir: str | Path,
    settings: EvalSettings | None = None,
    model_path: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Predict every question of ``data_files`` with ``pipeline`` (resuming what ``out_dir`` holds), score each
    task, write ``report.json`` / ``report.md`` and return the report.

    ``model_path`` (the reader's directory) is only recorded, with a hash of its weights. Refuses
    (:class:`EvalConfigError`) to resume with another store, model or decoding settings.
    """
    settings = settings or EvalSettings()
    data = [Path(p) for p in data_files]
    for path in data:
        if not path.is_file():
            raise FileNotFoundError(f"data file not found: {path}")
    names = task_names(data)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store = store_summary(pipeline.store)
    model = model_summary(pipeline, model_path)
    _check_run_config(out, store, model, settings)

    tasks: dict[str, Any] = {}
    for name, path in zip(names, data, strict=True):
        questions = read_kilt_file(path, limit=settings.limit, need_input=True)
        predictions_path = out / f"{name}-predictions.jsonl"
        timings_path = out / f"{name}-timings.json"
        predicted = predict_task(pipeline, questions, predictions_path, settings, timings_path, name, progress)
        if not predicted:
            logger.info("%s: every question already predicted in %s, scoring only", name, predictions_path)
        guess = load_kilt(predictions_path) if predictions_path.is_file() else []
        tasks[name] = {
            "data": str(path),
            "predictions": str(predictions_path),
            "questions": len(questions.records),
            "predicted_this_run": predicted,
            **bad_summary(questions),
            **score_records(questions.records, guess, settings.ks, settings.rank_keys),
            "timing": TaskTiming.load(timings_path).summary(),
        }
    summaries = {"store": store, "model": model, "device": _device_summary(pipeline)}
    report = make_report("run", settings.model_dump(mode="json"), tasks, out, **summaries)
    write_report(report, out)
    return report


def store_summary(store: MemoryStore) -> dict[str, Any]:
    """What identifies the store in a report: its path, manifest hash, counts, backbone, codec, build config."""
    manifest = store.manifest
    codec = dict(manifest.get("codec") or {})  # None: a store without memory
    codec_config = codec.pop("config", {}) or {}
    return {
        "path": str(store.layout.root),
        "manifest_sha256": sha256_file(store.layout.manifest),
        "format": manifest.get("format"),
        "version": manifest.get("version"),
        "num_documents": manifest.get("num_documents"),
        "num_passages": manifest.get("num_passages"),
        "num_tokens": manifest.get("num_tokens"),
        "backbone": manifest.get("backbone"),
        "codec": {**codec, "kind": codec_config.get("kind")} if codec else None,
        "compression_vs_bf16": manifest.get("report", {}).get("compression_vs_bf16"),
        "build_config": manifest.get("config"),
        "library_versions": manifest.get("library_versions"),
    }


def model_summary(pipeline: RAGPipeline, model_path: str | Path | None = None) -> dict[str, Any]:
    """The reader: path (if known), sha256 of its weights file, the precision it runs in, config and backbone."""
    from memvq.encoders.reader_io import WEIGHTS_FILE

    weights = Path(model_path) / WEIGHTS_FILE if model_path is not None else None
    return jsonable(
        {
            "path": str(model_path) if model_path is not None else None,
            "weights_sha256": sha256_file(weights) if weights is not None and weights.is_file() else None,
            "mode": pipeline.reader.config.mode,
            "precision": pipeline.precision,
            "config": pipeline.config.model_dump(mode="json"),
            "calibration": asdict(pipeline.calibration) if pipeline.calibration is not None else None,
            "backbone": asdict(pipeline.reader.backbone.info),
        }
    )


def _check_run_config(out: Path, store: dict[str, Any], model: dict[str, Any], settings: EvalSettings) -> None:
    config = {
        "store_manifest_sha256": store["manifest_sha256"],
        "model": {k: model[k] for k in ("weights_sha256", "config", "calibration", "backbone", "precision")},
        "settings": settings.model_dump(mode="json", include=set(_PREDICTION_SETTINGS)),
    }
    check_or_record(out / CONFIG_FILE, jsonable(config), "an evaluation", EvalConfigError)


def _device_summary(pipeline: RAGPipeline) -> dict[str, Any]:
    device = pipeline.device
    summary: dict[str, Any] = {"device": str(device)}
    if device.type == "cuda":
        import torch

        summary["gpu"] = torch.cuda.get_device_name(device)
    else:
        summary["cpu"] = platform.processor() or platform.machine()
        summary["cpu_count"] = os.cpu_count()
    return summary

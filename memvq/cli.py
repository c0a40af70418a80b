"""The `memvq` command line: thin typer commands over the library API.

Every option that sets a field of a settings model (`BuildConfig`, `TrainConfig`, `LoadOptions`, `QueryOptions`,
`EvalSettings`, `ServeSettings`) is made by `setting` from that field: its help is the field's description and its
default the field's (or None: "the config's"), so that each default has one home. Heavy modules are imported inside
the commands; the settings modules are light.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel

from memvq.encoders.config import ReaderConfig
from memvq.encoders.hardware import Precision
from memvq.encoders.options import QueryOptions, RetrievalMode
from memvq.pipelines.calibrate import CalibrateSettings
from memvq.pipelines.config import BuildConfig, EncoderConfig, LoadOptions, OptimConfig, TrainConfig
from memvq.pipelines.evaluate import EvalSettings
from memvq.pipelines.logs import configure_logging
from memvq.serve.settings import ServeSettings

app = typer.Typer(no_args_is_help=True, add_completion=False, help="memvq: compressed retrieval-augmented memory.")

THE_CONFIGS = "default: the config's"
THE_READERS = "default: the reader's"


def setting(model: type[BaseModel], name: str, *flags: str, default: Any = ..., note: str = "", **options: Any) -> Any:
    """A typer option for field `name` of a settings model: the field's description as help (with `note`), the
    field's default unless `default` is given (None: leave the config's / reader's value)."""
    field = model.model_fields[name]
    help_text = "; ".join(part for part in (field.description or name.replace("_", " "), note) if part)
    value = field.get_default(call_default_factory=True) if default is ... else default
    return typer.Option(value, *flags, help=help_text, **options)


def _query_options(
    top_k: int | None,
    rerank_k: int | None,
    max_answer_tokens: int | None,
    num_beams: int | None,
    min_confidence: float | None = None,
) -> QueryOptions:
    return QueryOptions(
        top_k=top_k,
        rerank_k=rerank_k,
        max_answer_tokens=max_answer_tokens,
        num_beams=num_beams,
        min_confidence=min_confidence,
    )


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging (libraries' notices too)")] = False,
) -> None:
    """Without -v a command prints its progress bars, its result and its warnings and errors (serve: its log)."""
    configure_logging(logging.WARNING, verbose=verbose)


@app.command("build-index")
def build_index_command(
    corpus: Annotated[Path, typer.Option(help="corpus file or directory (KILT, SQuAD, DPR json/tsv, jsonl, parquet)")],
    out: Annotated[
        str,
        typer.Option(
            help="store directory to create (or resume): a path (local, or a filesystem all Ray nodes share) or a "
            "pyarrow.fs URI (s3://bucket/store, gs://..., hdfs://..., file://...)"
        ),
    ],
    config: Annotated[Path | None, typer.Option(help="build config, TOML or JSON (see configs/)")] = None,
    model: str | None = setting(EncoderConfig, "model", default=None, note=THE_CONFIGS),
    format: str | None = setting(BuildConfig, "format", "--format", default=None, note=THE_CONFIGS),
    workers: int | None = setting(BuildConfig, "num_workers", "--workers", default=None, note=THE_CONFIGS),
    memory: bool | None = setting(BuildConfig, "memory", "--memory/--no-memory", default=None, note=THE_CONFIGS),
    memory_from: str | None = setting(EncoderConfig, "memory_from", default=None, note="TRAIN_RUN/reader"),
    precision: Precision | None = setting(EncoderConfig, "precision", default=None, note=THE_CONFIGS),
    ray_address: Annotated[
        str | None,
        typer.Option(envvar="RAY_ADDRESS", help="Ray cluster address; default: a local Ray the build starts and stops"),
    ] = None,
    codec_from: Annotated[
        Path | None, typer.Option(help="encode with this fitted codec (e.g. TRAIN_RUN/codec) instead of fitting one")
    ] = None,
    work_dir: Annotated[
        Path | None,
        typer.Option(
            envvar="MEMVQ_STAGING_DIR",
            help="where a build to a URI stages its files (a directory per URI under it); "
            "default: ~/.cache/memvq/staging",
        ),
    ] = None,
) -> None:
    """Build a compressed memory store and its FAISS passage index from a corpus (resumable)."""
    from memvq.data.ingest.sources import CorpusError
    from memvq.memory.artifact import ArtifactError
    from memvq.memory.location import is_uri
    from memvq.pipelines.build import build_index

    encoder = {"model": model, "memory_from": memory_from, "precision": precision}
    overrides = {"format": format, "num_workers": workers, "memory": memory, "encoder": encoder}
    try:
        build_config = BuildConfig.from_file(config, overrides)
        target = out if is_uri(out) else Path(out)
        report = build_index(corpus, target, build_config, ray_address, codec_from, work_dir)
    except (CorpusError, ArtifactError, OSError, ValueError) as error:  # OSError: a URI's filesystem (pyarrow)
        raise _fail(error) from error
    typer.echo(f"\nstore ready at {out}")
    _echo_rows(_build_rows(report))


def _build_rows(report: Any) -> list[tuple[str, str]]:
    """A build report as name / value rows."""
    busy = report.encode_busy_passages_per_second
    return [
        ("documents", f"{report.documents:,}"),
        ("passages", f"{report.passages:,}"),
        ("bad records skipped", f"{report.bad_records:,}"),
        ("  of them duplicate doc ids", f"{report.duplicate_ids:,}"),
        ("words cut (max_passage_chars)", f"{report.split_words:,}"),
        ("tokens", f"{report.tokens:,}"),
        ("shards", f"{report.shards:,}"),
        *(
            [
                ("bytes / token", f"{report.bytes_per_token}"),
                ("compression vs bf16", f"{report.compression_vs_bf16:.1f}x"),
                ("codes on disk", f"{report.codes_bytes / 2**20:.1f} MiB"),
            ]
            if report.compression_vs_bf16 is not None
            else [("memory", "none (passages and the dense index: for fid readers)")]
        ),
        *((f"time: {stage}", f"{sec:.1f} s") for stage, sec in report.seconds.items()),
        ("throughput", f"{report.passages_per_second:.1f} passages/s"),
        ("encode throughput", f"{report.encode_passages_per_second:.1f} passages/s"),
        *([("encode throughput (actors busy)", f"{busy:.1f} passages/s")] if busy else []),
    ]


def _echo_rows(rows: list[tuple[str, str]]) -> None:
    """Print name / value rows as an aligned two-column table."""
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        typer.echo(f"  {name:<{width}}  {value}")


def _fail(error: object) -> typer.Exit:
    """Print `error: ...` in red on stderr; the caller raises the returned exit (code 2)."""
    typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
    return typer.Exit(2)


@app.command("train")
def train_command(
    store: Annotated[Path, typer.Option(help="memory store built by build-index")],
    out: Annotated[Path, typer.Option(help="run directory to create (or resume); the reader goes to OUT/reader")],
    config: Annotated[Path, typer.Option(help="train config, TOML or JSON (see configs/train-minilm.toml)")],
    mode: str | None = setting(ReaderConfig, "mode", default=None, note=THE_CONFIGS),
    steps: int | None = setting(OptimConfig, "steps", default=None, note=THE_CONFIGS),
    max_minutes: float | None = setting(TrainConfig, "max_minutes", default=None, note=THE_CONFIGS),
    device: str | None = setting(TrainConfig, "device", default=None, note=THE_CONFIGS),
    precision: Precision | None = setting(TrainConfig, "precision", default=None, note=THE_CONFIGS),
    verify: bool = setting(LoadOptions, "verify"),
) -> None:
    """Fine-tune a reader (live layers, reranker, answer head) over a store's memory (resumable)."""
    from memvq.memory.artifact import ArtifactError
    from memvq.pipelines.train import train

    overrides: dict[str, Any] = {"reader": {"mode": mode}, "optim": {"steps": steps}}
    overrides |= {"max_minutes": max_minutes, "device": device, "precision": precision}
    try:
        report = train(store, out, TrainConfig.from_file(config, overrides), verify=verify)
    except (ArtifactError, FileNotFoundError, ValueError) as error:
        raise _fail(error) from error
    last = report.history[-1] if report.history else {}
    typer.echo(f"\nreader ready at {report.reader_dir}")
    _echo_rows(
        [
            ("steps", f"{report.steps}" + ("" if report.finished else " (stopped by the time budget)")),
            ("time", f"{report.seconds / 60:.1f} min"),
            *((f"dev {name}", f"{value:.3f}") for name, value in last.items() if "/" in name),
        ]
    )


@app.command("update")
def update_command(
    store: Annotated[Path, typer.Option(help="store built by build-index")],
    add: Annotated[
        list[Path] | None,
        typer.Option(
            help="corpus to add, in any format build-index reads (repeatable); a known id replaces its document"
        ),
    ] = None,
    delete: Annotated[
        Path | None, typer.Option(help="file of document ids (wikipedia_id) to delete, one per line")
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            envvar="RAY_ADDRESS", help="Ray cluster address; default: a local Ray the update starts and stops"
        ),
    ] = None,
) -> None:
    """Add, replace and delete documents of a store as its next generation (atomic, resumable, no rebuild)."""
    from memvq.data.ingest.sources import CorpusError
    from memvq.memory.artifact import ArtifactError
    from memvq.pipelines.update import update_store

    try:
        report = update_store(store, add or [], delete, ray_address)
    except (CorpusError, ArtifactError, OSError, ValueError) as error:
        raise _fail(error) from error
    typer.echo(f"\nstore {store} is at generation {report.generation}")
    _echo_rows(
        [
            ("documents added", f"{report.documents_added:,}"),
            ("documents replaced", f"{report.documents_replaced:,}"),
            ("documents deleted", f"{report.documents_deleted:,}"),
            ("unknown ids (not deleted)", f"{report.unknown_ids:,}" + _examples(report.unknown_examples)),
            ("bad records skipped", f"{report.bad_records:,}"),
            ("passages added / deleted", f"{report.passages_added:,} / {report.passages_deleted:,}"),
            ("passages now", f"{report.passages:,} of {report.documents:,} documents"),
            *((f"time: {stage}", f"{sec:.1f} s") for stage, sec in report.seconds.items()),
        ]
    )


def _examples(examples: list[str]) -> str:
    return f" (e.g. {', '.join(examples[:3])})" if examples else ""


@app.command("compact")
def compact_command(
    store: Annotated[Path, typer.Option(help="store built by build-index and updated since")],
    grace: Annotated[
        float,
        typer.Option(
            "--grace-seconds",
            min=0.0,
            help="seconds between publishing the compacted store and removing the old files (servers switch first)",
        ),
    ] = 15.0,
) -> None:
    """Rewrite a store without the rows its updates deleted (a new generation; the old files are removed)."""
    from memvq.memory.artifact import ArtifactError
    from memvq.pipelines.compact import compact_store

    try:
        report = compact_store(store, grace)
    except (ArtifactError, OSError, ValueError) as error:
        raise _fail(error) from error
    if report is None:
        typer.echo(f"store {store} holds no deleted rows: nothing to compact")
        return
    typer.echo(f"\nstore {store} is at generation {report.generation}")
    _echo_rows(
        [
            ("passages", f"{report.passages:,} in {report.shards:,} shards"),
            ("deleted rows dropped", f"{report.rows_dropped:,}"),
            ("store size", f"{report.bytes_before / 2**20:.1f} MiB -> {report.bytes_after / 2**20:.1f} MiB"),
            ("space won back", f"{report.bytes_freed / 2**20:.1f} MiB"),
            *((f"time: {stage}", f"{sec:.1f} s") for stage, sec in report.seconds.items()),
        ]
    )


@app.command("fetch")
def fetch_command(
    uri: Annotated[str, typer.Argument(help="a store built to a pyarrow.fs URI (s3://, gs://, hdfs://, file://)")],
    out: Annotated[Path, typer.Argument(help="local directory to copy it into")],
) -> None:
    """Copy a finished store from a URI to local disk and verify it (query, eval and serve open local stores)."""
    from memvq.memory.artifact import ArtifactError
    from memvq.memory.location import fetch_store
    from memvq.memory.store import MemoryStore

    try:
        store = MemoryStore.open(fetch_store(uri, out))
    except (ArtifactError, OSError) as error:
        raise _fail(error) from error
    typer.echo(f"store verified at {out}: {store.num_passages:,} passages, {store.num_tokens:,} tokens")


@app.command("split")
def split_command(
    config: Annotated[Path, typer.Option(help="train config whose tasks to split (see configs/train-minilm.toml)")],
    out: Annotated[Path, typer.Option(help="directory for {task}-train.jsonl and {task}-dev.jsonl")],
) -> None:
    """Write the train / dev split of a train config's tasks as KILT files (dev = what the reader never saw)."""
    from memvq.data.tasks import load_task, write_split_files

    try:
        tasks = [load_task(task) for task in TrainConfig.from_file(config).tasks]
    except (FileNotFoundError, ValueError) as error:
        raise _fail(error) from error
    for path in write_split_files(tasks, out):
        typer.echo(f"{path}  ({sum(1 for _ in path.open()):,} questions)")


@app.command("query")
def query_command(
    question: Annotated[str, typer.Argument(help="the question")],
    store: Annotated[Path, typer.Option(help="store built by build-index (default: make demo's)")] = Path("runs/demo"),
    model: Annotated[Path | None, typer.Option(help="trained reader directory; default: the embedded one")] = None,
    top_k: int | None = setting(QueryOptions, "top_k", note=THE_READERS),
    rerank_k: int | None = setting(QueryOptions, "rerank_k", note=THE_READERS),
    max_answer_tokens: int | None = setting(QueryOptions, "max_answer_tokens", note=THE_READERS),
    num_beams: int | None = setting(QueryOptions, "num_beams", note=THE_READERS),
    min_confidence: float | None = setting(QueryOptions, "min_confidence", note=THE_READERS),
    device: str = setting(LoadOptions, "device"),
    precision: Precision = setting(LoadOptions, "precision"),
    verify: bool = setting(LoadOptions, "verify"),
    retrieval: RetrievalMode | None = setting(LoadOptions, "retrieval"),
) -> None:
    """Answer one question from the memory: the answer (or that it abstained), its confidence, the passages read and
    the time per stage."""
    from memvq.memory.artifact import ArtifactError
    from memvq.pipelines.compatibility import IncompatibleModelError
    from memvq.pipelines.rag import RAGPipeline

    try:
        options = _query_options(top_k, rerank_k, max_answer_tokens, num_beams, min_confidence)
        start = time.perf_counter()
        rag = RAGPipeline.load(store, model, device=device, verify=verify, precision=precision, retrieval=retrieval)
        load_ms = (time.perf_counter() - start) * 1000
        [result] = rag.answer([question], options)
    except (ArtifactError, FileNotFoundError, IncompatibleModelError, ValueError) as error:
        raise _fail(error) from error
    if result.abstained:
        typer.secho("(not found in the store: no answer reaches min_confidence)", bold=True)
        typer.echo(f"best guess, not given: {result.answer!r}")
    else:
        typer.secho(result.answer or "(no answer)", bold=True)
    if result.confidence is not None:
        typer.echo(f"confidence {result.confidence:.2f}")
    if result.span is not None:
        passage = result.passages[result.span.passage]
        typer.echo(f"\nfrom passage {result.span.passage + 1}, {passage.title} ({passage.passage_id}):")
        typer.echo(f"  {marked_span(passage.text, result.span.char_start, result.span.char_end)}")
    typer.echo("\npassages read:")
    for rank, passage in enumerate(result.passages, start=1):
        typer.echo(f"  {rank}. {passage.title}  (score {passage.score:.3f}, {passage.passage_id})")
    typer.echo("\ntime (ms):")
    _echo_rows([("load", f"{load_ms:.0f}"), *((stage, f"{ms:.1f}") for stage, ms in result.timings_ms.items())])


def marked_span(text: str, start: int, end: int, context: int = 160) -> str:
    """The answer [start, end) marked [[like this]] in up to `context` characters of its passage on each side."""
    before, after = max(0, start - context), min(len(text), end + context)
    head = ("..." if before else "") + text[before:start]
    tail = text[end:after] + ("..." if after < len(text) else "")
    return f"{head}[[{text[start:end]}]]{tail}"


def _listed(text: str, option: str, kind: type = str) -> tuple[Any, ...]:
    """A comma-separated option's values."""
    try:
        return tuple(kind(part.strip()) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise typer.BadParameter(f"expected comma-separated values, got {text!r}", param_hint=option) from error


def _joined(model: type[BaseModel], name: str) -> str:
    """A tuple field's default as the comma-separated text of its option."""
    return ",".join(str(value) for value in model.model_fields[name].get_default(call_default_factory=True))


@app.command("eval")
def eval_command(
    data: Annotated[list[Path], typer.Option(help="KILT-format question/gold file (jsonl); repeat for several tasks")],
    out: Annotated[
        Path | None,
        typer.Option(help="predictions + report.json/.md directory (resumable); optional with --predictions"),
    ] = None,
    store: Annotated[Path | None, typer.Option(help="store built by `memvq build-index`")] = None,
    model: Annotated[Path | None, typer.Option(help="saved reader directory; default: the embedded reader")] = None,
    predictions: Annotated[
        list[Path] | None,
        typer.Option(
            help="score this KILT prediction file instead of running a model (repeatable); paired with --data by "
            "task name (nq-predictions.jsonl -> nq), else in the order given"
        ),
    ] = None,
    device: str = setting(LoadOptions, "device"),
    precision: Precision = setting(LoadOptions, "precision"),
    verify: bool = setting(LoadOptions, "verify"),
    batch_size: int = setting(EvalSettings, "batch_size"),
    top_k: int | None = setting(QueryOptions, "top_k", note=THE_READERS),
    rerank_k: int | None = setting(QueryOptions, "rerank_k", note=THE_READERS),
    max_answer_tokens: int | None = setting(QueryOptions, "max_answer_tokens", note=THE_READERS),
    num_beams: int | None = setting(QueryOptions, "num_beams", note=THE_READERS),
    min_confidence: float | None = setting(QueryOptions, "min_confidence", note=THE_READERS),
    limit: int | None = setting(EvalSettings, "limit"),
    ks: str = setting(EvalSettings, "ks", default=_joined(EvalSettings, "ks"), note="comma-separated"),
    rank_keys: str = setting(
        EvalSettings, "rank_keys", default=_joined(EvalSettings, "rank_keys"), note="comma-separated"
    ),
    passage_text: bool = setting(EvalSettings, "passage_text"),
    retrieval: RetrievalMode | None = setting(LoadOptions, "retrieval"),
) -> None:
    """Answer KILT-format questions with the store and reader, write KILT predictions and a metrics report."""
    from memvq.data.kilt.records import KiltFormatError
    from memvq.pipelines.eval_report import summary_table
    from memvq.pipelines.evaluate import run_eval

    if predictions is None and store is None:
        raise _fail("--store is required to run the model (or give --predictions to score existing predictions)")
    if predictions is None and out is None:
        raise _fail("--out is required to run the model")
    for path in [*data, *(predictions or [])]:
        if not path.is_file():
            raise _fail(f"file not found: {path}")
    try:
        query = _query_options(top_k, rerank_k, max_answer_tokens, num_beams, min_confidence)
        ks_values, keys = _listed(ks, "--ks", int), _listed(rank_keys, "--rank-keys")
        settings = EvalSettings(
            batch_size=batch_size, query=query, limit=limit, ks=ks_values, rank_keys=keys, passage_text=passage_text
        )
        load = LoadOptions(device=device, precision=precision, verify=verify, retrieval=retrieval)
        if predictions is not None and (store is not None or model is not None):
            typer.echo("note: --predictions given, so --store/--model are not used (no model is run)")
        report = run_eval(data, out, settings, store=store, model=model, load=load, predictions=predictions)
    except (FileNotFoundError, KiltFormatError, ValueError, RuntimeError) as error:
        raise _fail(error) from error
    typer.echo("")
    typer.echo(summary_table(report))
    for name, task in report["tasks"].items():
        if task["bad_records"]:
            typer.echo(f"{name}: {task['bad_records']} bad record(s) skipped (see the report), e.g.")
            typer.echo(f"  {task['bad_record_examples'][0]}")
        if task["unscored"]:
            typer.echo(f"{name}: {task['unscored']} question(s) without a gold answer not scored")
    if out is not None:
        typer.echo(f"report: {out / 'report.md'} and {out / 'report.json'}")


@app.command("calibrate")
def calibrate_command(
    data: Annotated[list[Path], typer.Option(help="KILT-format questions with answers the reader is not scored on")],
    store: Annotated[Path, typer.Option(help="store built by `memvq build-index`")],
    model: Annotated[Path | None, typer.Option(help="saved reader directory; default: the embedded reader")] = None,
    out: Annotated[
        Path | None, typer.Option(help="directory of calibration.json; default: the reader's (read with it)")
    ] = None,
    device: str = setting(LoadOptions, "device"),
    precision: Precision = setting(LoadOptions, "precision"),
    top_k: int | None = setting(QueryOptions, "top_k", note=THE_READERS),
    rerank_k: int | None = setting(QueryOptions, "rerank_k", note=THE_READERS),
    batch_size: int = setting(CalibrateSettings, "batch_size"),
    skip: int = setting(CalibrateSettings, "skip"),
    limit: int | None = setting(CalibrateSettings, "limit"),
    unsupported_every: int = setting(CalibrateSettings, "unsupported_every"),
    keep_right: float = setting(CalibrateSettings, "keep_right"),
    min_confidence: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="the default threshold to save (chosen by a rule on held-out data); "
            "default: the --keep-right rule on these questions",
        ),
    ] = None,
) -> None:
    """Fit the reader's answer confidence (and its default min_confidence) on questions with known answers."""
    from memvq.encoders.embedded import default_reader_path
    from memvq.encoders.reader_io import reader_weights_sha256
    from memvq.memory.artifact import ArtifactError
    from memvq.pipelines.calibrate import calibrate
    from memvq.pipelines.compatibility import IncompatibleModelError
    from memvq.pipelines.confidence import save_calibration
    from memvq.pipelines.rag import RAGPipeline

    model_path = model or default_reader_path()
    try:
        settings = CalibrateSettings(
            query=_query_options(top_k, rerank_k, None, None),
            batch_size=batch_size,
            skip=skip,
            limit=limit,
            unsupported_every=unsupported_every,
            keep_right=keep_right,
            min_confidence=min_confidence,
        )
        rag = RAGPipeline.load(store, model_path, device=device, precision=precision)
        calibration, fit = calibrate(rag, data, settings)
        fit = {**fit, "reader_sha256": reader_weights_sha256(model_path)}
        path = save_calibration(out or model_path, calibration, settings.model_dump(mode="json"), fit)
    except (ArtifactError, FileNotFoundError, IncompatibleModelError, ValueError, OSError) as error:
        raise _fail(error) from error
    _echo_rows(
        [
            ("questions (gold pages hidden)", f"{fit['questions']:,} ({fit['unsupported']:,})"),
            ("accuracy (exact match)", f"{fit['accuracy']:.3f}"),
            ("AUROC", f"{fit['auroc']:.3f}"),
            ("calibration error raw -> fitted", f"{fit['ece_raw']:.3f} -> {fit['ece_fitted']:.3f}"),
            (
                "min_confidence",
                f"{calibration.min_confidence:.4f}"
                + (" (given)" if min_confidence is not None else f" (keeps {keep_right:.0%} of right answers)"),
            ),
            ("wrong answers removed", f"{fit['wrong_removed']:.3f}"),
            ("hidden-page questions abstained", f"{fit['unsupported_abstained']:.3f}"),
        ]
    )
    typer.echo(f"calibration: {path}")


@app.command("serve")
def serve_command(
    store: Annotated[Path, typer.Option(help="store built by `memvq build-index` (memory-mapped)")],
    model: Annotated[Path | None, typer.Option(help="saved reader directory; default: the embedded reader")] = None,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="port to listen on")] = 8000,
    device: str = setting(LoadOptions, "device"),
    precision: Precision = setting(LoadOptions, "precision"),
    verify: bool = setting(LoadOptions, "verify"),
    retrieval: RetrievalMode | None = setting(LoadOptions, "retrieval"),
    max_batch_size: int = setting(ServeSettings, "max_batch_size"),
    max_wait_ms: float = setting(ServeSettings, "max_wait_ms"),
    api_key: str | None = setting(ServeSettings, "api_key", envvar="MEMVQ_API_KEY", show_default=False),
    access_log: Annotated[bool, typer.Option(help="log every request (uvicorn access log)")] = True,
    header_timeout: float = setting(ServeSettings, "header_timeout_s", "--header-timeout"),
    body_timeout: float = setting(ServeSettings, "body_timeout_s", "--body-timeout"),
    watch_interval: float = setting(ServeSettings, "watch_interval_s", "--watch-interval"),
    replicas: Annotated[
        int | None,
        typer.Option(min=1, show_default=False, help="serve on N Ray Serve replicas (Ray Serve's proxy and batching)"),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            show_default=False,
            help="with --replicas: the Ray cluster to deploy on (default: RAY_ADDRESS, else a local Ray)",
        ),
    ] = None,
) -> None:
    """Serve the RAG query API over HTTP (FastAPI): /v1/answer, /v1/answer:batch, /v1/retrieve, /metrics."""
    from memvq.encoders.embedded import default_reader_path
    from memvq.memory.artifact import ArtifactError

    if ray_address is not None and replicas is None:
        raise typer.BadParameter("--ray-address needs --replicas", param_hint="--ray-address")
    if logging.getLogger().level > logging.INFO:  # a server's log: where it listens, what it loaded, each request
        logging.getLogger().setLevel(logging.INFO)
    try:
        settings = ServeSettings(
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
            api_key=api_key or None,
            header_timeout_s=header_timeout,
            body_timeout_s=body_timeout,
            watch_interval_s=watch_interval,
        )
        load = LoadOptions(device=device, precision=precision, verify=verify, retrieval=retrieval)
        reader = model or default_reader_path()
        if replicas is not None:
            _serve_replicas(store, reader, replicas, host, port, ray_address, load, settings)
        else:
            _serve_here(store, reader, host, port, load, settings, access_log)
    except (FileNotFoundError, ArtifactError, ValueError, RuntimeError) as error:
        raise _fail(error) from error


def _serve_replicas(
    store: Path,
    reader: Path,
    replicas: int,
    host: str,
    port: int,
    ray_address: str | None,
    load: LoadOptions,
    settings: ServeSettings,
) -> None:
    """`serve --replicas`: each replica loads the pipeline; here the store is checked once, up front."""
    from memvq.memory.store import MemoryStore
    from memvq.serve.replicas import serve_replicas

    if not Path(reader).is_dir():
        raise FileNotFoundError(f"reader directory not found: {reader}")
    MemoryStore.open(store, verify=load.verify)
    serve_replicas(
        store, reader, replicas=replicas, host=host, port=port, ray_address=ray_address, load=load, settings=settings
    )


def _serve_here(
    store: Path, reader: Path, host: str, port: int, load: LoadOptions, settings: ServeSettings, access_log: bool
) -> None:
    """The single-process server: one pipeline, the in-process batcher, uvicorn."""
    from memvq.pipelines.rag import RAGPipeline
    from memvq.serve.app import create_app
    from memvq.serve.runner import serve

    pipeline = RAGPipeline.load(store, reader, **load.model_dump())
    logging.getLogger(__name__).info(
        "serving on http://%s:%d (max batch size %d, max wait %.1f ms, API key %s)",
        host,
        port,
        settings.max_batch_size,
        settings.max_wait_ms,
        "required" if settings.api_key else "off",
    )
    serve(create_app(pipeline, settings, watch=pipeline.store.watch), host=host, port=port, access_log=access_log)


if __name__ == "__main__":
    app()

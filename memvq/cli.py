"""The `memvq` command line: thin typer commands over the library API."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from encoders.hardware import PRECISION_HELP
from pipelines.logs import configure_logging

app = typer.Typer(no_args_is_help=True, add_completion=False, help="memvq: compressed retrieval-augmented memory.")

# The flags of the query knobs (`encoders.options.QueryOptions`), shared by `query` and `eval`.
TopK = Annotated[int | None, typer.Option(help="passages retrieved per question; default: the reader's")]
RerankK = Annotated[int | None, typer.Option(help="glimmer: passages kept after reranking; default: the reader's")]
MaxAnswerTokens = Annotated[int | None, typer.Option(help="answer length limit; default: the reader's")]
NumBeams = Annotated[int | None, typer.Option(help="beam size; default: the reader's")]
PrecisionFlag = Annotated[Literal["auto", "fp32", "bf16"], typer.Option(help=PRECISION_HELP)]
ConfigPrecision = Annotated[
    Literal["auto", "fp32", "bf16"] | None, typer.Option(help=f"{PRECISION_HELP}; default: the config's (auto)")
]
Verify = Annotated[
    bool,
    typer.Option(
        help="check the store before reading it: its manifest, every file's sha256 (files unchanged since they were "
        "last verified are not hashed again) and its shard counts"
    ),
]


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
    model: Annotated[str | None, typer.Option(help="local encoder checkpoint; default: embedded MiniLM")] = None,
    config: Annotated[Path | None, typer.Option(help="build config, TOML or JSON (see configs/)")] = None,
    format: Annotated[str | None, typer.Option("--format", help="corpus format; default: detected")] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(envvar="RAY_ADDRESS", help="Ray cluster address; default: a local Ray the build starts and stops"),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(help="most encoder actors; default: one per GPU, else one per cpus_per_actor CPUs of each node"),
    ] = None,
    codec_from: Annotated[
        Path | None, typer.Option(help="encode with this fitted codec (e.g. TRAIN_RUN/codec) instead of fitting one")
    ] = None,
    memory_from: Annotated[
        Path | None,
        typer.Option(help="a reader trained with train_memory_layers (TRAIN_RUN/reader): its memory layers encode"),
    ] = None,
    precision: ConfigPrecision = None,
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
    from data.ingest.corpus import CorpusError
    from memory.artifact import ArtifactError
    from memory.location import is_uri
    from pipelines.build import build_index
    from pipelines.config import BuildConfig

    overrides: dict[str, Any] = {
        "format": format,
        "num_workers": workers,
        "encoder": {
            "model": model,
            "memory_from": None if memory_from is None else str(memory_from),
            "precision": precision,
        },
    }
    try:
        build_config = BuildConfig.from_file(config, overrides)
        report = build_index(
            corpus,
            out if is_uri(out) else Path(out),
            build_config,
            ray_address=ray_address,
            codec_from=codec_from,
            work_dir=work_dir,
        )
    except (CorpusError, ArtifactError, OSError, ValueError) as error:  # OSError: a URI's filesystem (pyarrow)
        raise _fail(error) from error
    rows = [
        ("documents", f"{report.documents:,}"),
        ("passages", f"{report.passages:,}"),
        ("bad records skipped", f"{report.bad_records:,}"),
        ("  of them duplicate doc ids", f"{report.duplicate_ids:,}"),
        ("words cut (max_passage_chars)", f"{report.split_words:,}"),
        ("tokens", f"{report.tokens:,}"),
        ("shards", f"{report.shards:,}"),
        ("bytes / token", f"{report.bytes_per_token}"),
        ("compression vs bf16", f"{report.compression_vs_bf16:.1f}x"),
        ("codes on disk", f"{report.codes_bytes / 2**20:.1f} MiB"),
        *((f"time: {stage}", f"{sec:.1f} s") for stage, sec in report.seconds.items()),
        ("throughput", f"{report.passages_per_second:.1f} passages/s"),
        ("encode throughput", f"{report.encode_passages_per_second:.1f} passages/s"),
        *(
            [("encode throughput (actors busy)", f"{report.encode_busy_passages_per_second:.1f} passages/s")]
            if report.encode_busy_passages_per_second
            else []
        ),
    ]
    typer.echo(f"\nstore ready at {out}")
    _echo_rows(rows)


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
    mode: Annotated[
        str | None, typer.Option(help="reader mode: glimmer, lumen, fid, memory (overrides the config)")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="optimizer steps (overrides the config)")] = None,
    max_minutes: Annotated[float | None, typer.Option(help="wall-clock budget; stops and saves")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda (overrides the config)")] = None,
    precision: ConfigPrecision = None,
) -> None:
    """Fine-tune a reader (live layers, reranker, decoder) over a store's memory (resumable)."""
    from memory.artifact import ArtifactError
    from pipelines.config import TrainConfig
    from pipelines.train import train

    overrides: dict[str, Any] = {
        "reader": {"mode": mode},
        "optim": {"steps": steps},
        "max_minutes": max_minutes,
        "device": device,
        "precision": precision,
    }
    try:
        report = train(store, out, TrainConfig.from_file(config, overrides))
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


@app.command("fetch")
def fetch_command(
    uri: Annotated[str, typer.Argument(help="a store built to a pyarrow.fs URI (s3://, gs://, hdfs://, file://)")],
    out: Annotated[Path, typer.Argument(help="local directory to copy it into")],
) -> None:
    """Copy a finished store from a URI to local disk and verify it (query, eval and serve open local stores)."""
    from memory.artifact import ArtifactError
    from memory.location import fetch_store
    from memory.store import MemoryStore

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
    from data.tasks import load_task, write_split_files
    from pipelines.config import TrainConfig

    try:
        tasks = [load_task(task) for task in TrainConfig.from_file(config).tasks]
    except (FileNotFoundError, ValueError) as error:
        raise _fail(error) from error
    for path in write_split_files(tasks, out):
        typer.echo(f"{path}  ({sum(1 for _ in path.open()):,} questions)")


@app.command("query")
def query_command(
    question: Annotated[str, typer.Argument(help="the question")],
    store: Annotated[Path, typer.Option(help="memory store built by build-index")] = Path("runs/minilm-mini"),
    model: Annotated[Path | None, typer.Option(help="trained reader directory; default: the embedded one")] = None,
    top_k: TopK = None,
    rerank_k: RerankK = None,
    max_answer_tokens: MaxAnswerTokens = None,
    num_beams: NumBeams = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    precision: PrecisionFlag = "auto",
    verify: Verify = True,
) -> None:
    """Answer one question from the memory: the answer, the passages read and the time per stage."""
    import time

    from encoders.options import QueryOptions
    from memory.artifact import ArtifactError
    from pipelines.rag import IncompatibleModelError, RAGPipeline

    try:
        options = QueryOptions(top_k=top_k, rerank_k=rerank_k, max_answer_tokens=max_answer_tokens, num_beams=num_beams)
        start = time.perf_counter()
        rag = RAGPipeline.load(store, model, device=device, verify=verify, precision=precision)
        load_ms = (time.perf_counter() - start) * 1000
        [result] = rag.answer([question], options)
    except (ArtifactError, FileNotFoundError, IncompatibleModelError, ValueError) as error:
        raise _fail(error) from error
    typer.secho(result.answer or "(no answer)", bold=True)
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


def _int_list(text: str, option: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint=option) from error


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
    device: Annotated[Literal["auto", "cpu", "cuda"], typer.Option(help="auto: the GPU when there is one")] = "auto",
    precision: PrecisionFlag = "auto",
    batch_size: Annotated[int, typer.Option(help="questions per batch (and per flush of the predictions)")] = 16,
    top_k: TopK = None,
    rerank_k: RerankK = None,
    max_answer_tokens: MaxAnswerTokens = None,
    num_beams: NumBeams = None,
    limit: Annotated[int | None, typer.Option(help="only the first N questions of each file")] = None,
    ks: Annotated[str, typer.Option(help="k of the retrieval metrics @k, comma-separated")] = "1,5",
    rank_keys: Annotated[
        str, typer.Option(help="provenance fields that identify a page, comma-separated")
    ] = "wikipedia_id",
    passage_text: Annotated[
        bool, typer.Option(help="write passage text in the provenance (answer_in_context@k needs it)")
    ] = True,
    verify: Verify = True,
) -> None:
    """Answer KILT-format questions with the store and reader, write KILT predictions and a metrics report."""
    from data.kilt.records import KiltFormatError
    from encoders.options import QueryOptions
    from memory.artifact import ArtifactError
    from pipelines.evaluate import EvalSettings, evaluate, evaluate_predictions, summary_table

    if predictions is None and store is None:
        raise _fail("--store is required to run the model (or give --predictions to score existing predictions)")
    if predictions is None and out is None:
        raise _fail("--out is required to run the model")
    for path in [*data, *(predictions or [])]:
        if not path.is_file():
            raise _fail(f"file not found: {path}")
    try:
        settings = EvalSettings(
            batch_size=batch_size,
            query=QueryOptions(
                top_k=top_k, rerank_k=rerank_k, max_answer_tokens=max_answer_tokens, num_beams=num_beams
            ),
            limit=limit,
            ks=tuple(_int_list(ks, "--ks")),
            rank_keys=tuple(key.strip() for key in rank_keys.split(",") if key.strip()),
            passage_text=passage_text,
        )
    except ValueError as error:  # pydantic's ValidationError is a ValueError
        raise _fail(error) from error

    if predictions is not None:
        if store is not None or model is not None:
            typer.echo("note: --predictions given, so --store/--model are not used (no model is run)")
        try:
            report = evaluate_predictions(data, predictions, out, settings)
        except (KiltFormatError, ValueError) as error:
            raise _fail(error) from error
    else:
        from encoders.embedded import default_reader_path
        from pipelines.rag import RAGPipeline

        try:
            model_path = model if model is not None else default_reader_path()
            pipeline = RAGPipeline.load(store, model_path, device=device, verify=verify, precision=precision)
        except (FileNotFoundError, ArtifactError, ValueError, RuntimeError) as error:
            raise _fail(error) from error
        try:
            report = evaluate(pipeline, data, out, settings, model_path=model_path)
        except (FileNotFoundError, KiltFormatError, ValueError) as error:
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


@app.command("serve")
def serve_command(
    store: Annotated[Path, typer.Option(help="store built by `memvq build-index` (memory-mapped)")],
    model: Annotated[Path | None, typer.Option(help="saved reader directory; default: the embedded reader")] = None,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="port to listen on")] = 8000,
    device: Annotated[str, typer.Option(help="auto (the GPU when there is one), cpu, cuda, cuda:N")] = "auto",
    precision: PrecisionFlag = "auto",
    max_batch_size: Annotated[int, typer.Option(min=1, help="questions per model call; 1: no batching")] = 16,
    max_wait_ms: Annotated[float, typer.Option(min=0.0, help="longest wait for a batch to fill, ms")] = 10.0,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="MEMVQ_API_KEY", show_default=False, help="require this key on all but /, /healthz, /readyz"
        ),
    ] = None,
    verify: Verify = True,
    access_log: Annotated[bool, typer.Option(help="log every request (uvicorn access log)")] = True,
    header_timeout: Annotated[
        float, typer.Option(min=0.001, help="seconds for a request line and headers; slower connections are closed")
    ] = 10.0,
    body_timeout: Annotated[
        float, typer.Option(min=0.001, help="seconds for a request body after its headers; slower bodies get 408")
    ] = 30.0,
    watch_interval: Annotated[
        float, typer.Option(min=0.1, help="seconds between checks that the store's files did not change")
    ] = 5.0,
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
    from encoders.embedded import default_reader_path
    from memory.artifact import ArtifactError
    from pipelines.rag import RAGPipeline
    from pipelines.serve import ServeSettings, create_app, serve

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
        if replicas is not None:  # each replica loads the pipeline; here the store is checked once, up front
            from memory.store import MemoryStore
            from pipelines.serve.replicas import serve_replicas

            reader = model or default_reader_path()
            if not Path(reader).is_dir():
                raise FileNotFoundError(f"reader directory not found: {reader}")
            MemoryStore.open(store, verify=verify)
            serve_replicas(
                store,
                reader,
                replicas=replicas,
                host=host,
                port=port,
                ray_address=ray_address,
                device=device,
                verify=verify,
                settings=settings,
                precision=precision,
            )
            return
        pipeline = RAGPipeline.load(
            store, model or default_reader_path(), device=device, verify=verify, precision=precision
        )
    except (FileNotFoundError, ArtifactError, ValueError, RuntimeError) as error:
        raise _fail(error) from error
    logging.getLogger(__name__).info(
        "serving on http://%s:%d (max batch size %d, max wait %.1f ms, API key %s)",
        host,
        port,
        settings.max_batch_size,
        settings.max_wait_ms,
        "required" if settings.api_key else "off",
    )
    api = create_app(pipeline, settings, watch=pipeline.store.watch)
    serve(api, host=host, port=port, access_log=access_log)


if __name__ == "__main__":
    app()

"""The `memvq` command line: thin typer commands over the library API."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="memvq: compressed retrieval-augmented memory.")


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not verbose:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()


@app.command("build-index")
def build_index_command(
    corpus: Annotated[Path, typer.Option(help="corpus file or directory (KILT, SQuAD, DPR json/tsv, jsonl, parquet)")],
    out: Annotated[Path, typer.Option(help="store directory to create (or resume)")],
    model: Annotated[str | None, typer.Option(help="local encoder checkpoint; default: embedded MiniLM")] = None,
    config: Annotated[Path | None, typer.Option(help="build config, TOML or JSON (see configs/)")] = None,
    format: Annotated[str | None, typer.Option("--format", help="corpus format; default: detected")] = None,
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster address; default: a local Ray")] = None,
    workers: Annotated[int | None, typer.Option(help="encoder actors; default: one per GPU, else 1")] = None,
) -> None:
    """Build a compressed memory store and its FAISS passage index from a corpus (resumable)."""
    from memory.manifest import ManifestError
    from pipelines.build import build_index
    from pipelines.config import BuildConfig
    from retrieval.corpus import CorpusError

    overrides: dict[str, Any] = {"format": format, "num_workers": workers}
    if model is not None:
        overrides["encoder"] = {"model": model}
    try:
        build_config = BuildConfig.from_file(config, overrides)
        report = build_index(corpus, out, build_config, ray_address=ray_address)
    except (CorpusError, ManifestError, FileNotFoundError, ValueError) as error:
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from error
    rows = [
        ("documents", f"{report.documents:,}"),
        ("passages", f"{report.passages:,}"),
        ("bad records skipped", f"{report.bad_records:,}"),
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
    width = max(len(name) for name, _ in rows)
    typer.echo(f"\nstore ready at {out}")
    for name, value in rows:
        typer.echo(f"  {name:<{width}}  {value}")


if __name__ == "__main__":
    app()

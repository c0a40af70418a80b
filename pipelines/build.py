"""The build-memory-index job: corpus -> passages -> memory encoder -> VQ codes -> sharded store + FAISS index.

`build_index` runs the steps of `memvq.pipelines.indexing`, ColBERT-style, each resumable:

1. plan      the corpus recorded and cut into passage shards (`indexing.plan`)
2. codec     the codec: shipped, given or fitted on a passage sample (`indexing.codec`); none for a store
             without memory (`memory = false`: passages and the dense index, what a fid reader reads)
3. encode    Ray encoder actors write the shards: memory codes and dense embeddings (`indexing.actors`,
             `indexing.encode`)
4. index     the FAISS index from the shards' embeddings, the BM25 index of their passages (`BuildConfig.lexical`),
             then the manifest, last (`indexing.finalize`)

Every file is written atomically and each step leaves a marker, so a build killed at any point and started
again skips what is done and ends with the same bytes as an uninterrupted one; it is refused with another config
(its precision resolved: `BuildConfig.resolved`) or, once planned, another corpus. A store at a URI is built in a
staging directory and published piece by piece (`indexing.sync`). Ray is the build's own local one unless given a
cluster, stopped at the end, and what a killed build left of it is stopped by the next (`pipelines.local_ray`).
Memory stays bounded: the driver streams the corpus, each actor holds one shard at a time.
"""

from __future__ import annotations

import logging
from pathlib import Path

from memvq.encoders.embedded import portable_model_path
from memvq.encoders.hardware import resolve_device
from memvq.memory.artifact import ArtifactError, ManifestError, read_artifact, read_json
from memvq.memory.store import STORE_FORMAT, MemoryStore, StoreLayout
from memvq.pipelines.config import RETRIEVAL_BEFORE_THE_SETTING, BuildConfig
from memvq.pipelines.indexing.actors import encode_all_shards
from memvq.pipelines.indexing.codec import train_codec
from memvq.pipelines.indexing.encode import Encoders
from memvq.pipelines.indexing.finalize import (
    BuildReport,
    Built,
    build_lexical_index,
    build_passage_index,
    build_report,
    write_manifest,
)
from memvq.pipelines.indexing.kept import check_kept_shards
from memvq.pipelines.indexing.plan import check_corpus, plan_passages
from memvq.pipelines.indexing.sync import BuildTarget
from memvq.pipelines.local_ray import stop_orphaned_ray
from memvq.pipelines.resume import check_or_record
from memvq.pipelines.timing import Stopwatch

__all__ = ["BuildReport", "build_index"]

log = logging.getLogger(__name__)


def build_index(
    corpus: str | Path,
    out: str | Path,
    config: BuildConfig | None = None,
    ray_address: str | None = None,
    codec_from: str | Path | None = None,
    work_dir: str | Path | None = None,
) -> BuildReport:
    """Build (or resume building) a memory store at `out` from `corpus`; returns the report.

    `out`: a directory (local, or on a filesystem every Ray node mounts) or a `pyarrow.fs` URI (`s3://bucket/store`,
    built in a staging directory under `work_dir`: `indexing.sync`). `ray_address`: a Ray cluster (default: a local
    Ray the build starts and stops). `codec_from`: a fitted codec directory to encode with instead of taking or
    fitting one (its config must be the build's)."""
    config = config or BuildConfig()
    if codec_from is not None and not config.memory:
        raise ValueError("--codec-from encodes memory, but this build keeps none (memory = false)")
    corpus = Path(corpus)
    if not corpus.exists():
        raise FileNotFoundError(f"corpus {corpus} does not exist")
    target = BuildTarget.open(out, work_dir)
    layout = target.layout
    config = _kept_retrieval(layout, config).resolved()
    _record_config(layout, config)
    target.publish_config()
    stop_orphaned_ray()
    clock = Stopwatch()
    with clock.stage("plan"):  # with recording the corpus
        corpus_record = check_corpus(layout, corpus)
        target.publish_corpus()
        if layout.manifest.is_file():
            _check_finished(target, "it was finished before, and fails its check now: delete it and build again")
            log.info("store %s is already complete", out)
            header = read_artifact(layout.manifest, STORE_FORMAT, "store manifest")
            target.done()
            return BuildReport.model_validate(header.extra["report"])
        plan = plan_passages(corpus, layout, config)
        target.publish_plan(len(plan.shard_sizes))
    with clock.stage("codec"):
        encoders = Encoders.load(config, resolve_device(config.encoder.device))
        codec, source = None, None
        if config.memory:
            given = None if codec_from is None else Path(codec_from)
            codec, source = train_codec(layout, config, plan, encoders, given)
            target.publish_codec()
    shard_sizes = dict(enumerate(plan.shard_sizes))
    resumed = bool(check_kept_shards(layout, shard_sizes, config.memory, target.remote))
    with clock.stage("encode"):
        busy = encode_all_shards(layout, config, shard_sizes, ray_address, target.remote)
    with clock.stage("index"):
        build_passage_index(layout, config, shard_sizes, encoders.index.hidden_size, layout.index_dir, target.remote)
    if config.lexical:
        with clock.stage("lexical"):
            build_lexical_index(layout, shard_sizes, layout.lexical_dir, target.remote)
    markers = target.markers(len(plan.shard_sizes))
    report = build_report(plan, markers, codec, clock.seconds, None if resumed else busy)
    backbone = encoders.index.info.__dict__ | {
        "model_path": portable_model_path(config.encoder.model),
        "memory_digest": encoders.memory_digest,
    }
    write_manifest(layout, Built(config, plan, corpus_record, backbone, codec, source), markers, report)
    _check_finished(target, "its manifest is removed; run the build again: it encodes what fails again", remove=True)
    target.publish_store()
    return report


def _check_finished(target: BuildTarget, then: str, remove: bool = False) -> None:
    """Open a finished local store as a reader would (every file's sha256, remembered for its first opening):
    a build never calls a store ready that readers refuse. `remove`: a failing store loses its manifest. A store at
    a URI is checked when it is fetched (`memvq fetch`)."""
    if target.remote is not None:
        return
    try:
        MemoryStore.open(target.layout.root)
    except ArtifactError as error:
        if remove:
            target.layout.manifest.unlink()
        raise ManifestError(f"the store {target.layout.root} fails its check ({then}): {error}") from error


def _kept_retrieval(layout: StoreLayout, config: BuildConfig) -> BuildConfig:
    """A build run again keeps the default retrieval mode it recorded where the config leaves it to auto (the
    default changed from dense to auto on 2026-12-06: a store built before stays dense)."""
    if config.retrieval != "auto" or not layout.build_config.is_file():
        return config
    saved = read_json(layout.build_config, "build record")
    return config.model_copy(update={"retrieval": saved.get("retrieval", RETRIEVAL_BEFORE_THE_SETTING)})


def _record_config(layout: StoreLayout, config: BuildConfig) -> None:
    """Record the config on the first run (into an empty or new directory); refuse a resume with another one."""
    if not layout.build_config.is_file() and layout.root.exists() and any(layout.root.iterdir()):
        raise ManifestError(f"{layout.root} exists and is not a memvq build directory; choose an empty --out")
    check_or_record(
        layout.build_config,
        config.to_json(),
        "a build",
        current=lambda saved: BuildConfig.model_validate(
            {"retrieval": RETRIEVAL_BEFORE_THE_SETTING, **saved}
        ).to_json(),
    )

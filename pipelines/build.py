"""The build-memory-index job: corpus -> passages -> memory encoder -> VQ codes -> sharded store + FAISS index.

Four resumable steps, ColBERT-style (plan -> train codec -> encode chunks -> finalize):

1. plan     record the corpus (path, size and sha256 of each file), stream it once, chunk it into passages (at most
            `chunking.words_per_passage` words and `max_passage_chars` characters each), write them as parquet
            shards (bad records and duplicate document ids reported and skipped)
2. codec    encode a seeded sample of passages, fit the codec on their token vectors, save it
3. encode   Ray actors holding the encoder, sized per node (one per GPU, else one per `cpus_per_actor` CPUs of
            each node), take the shards one at a time and write them into the store (which every node must see,
            or at a pyarrow.fs URI such as s3://, where each actor uploads its shards; memory.location):
            memory layers -> codes, and the dense embedding from the same forward pass (a second pass by the
            pretrained encoder when `encoder.memory_from` gives fine-tuned memory layers)
4. finalize build the FAISS index from the shards' embeddings, then write the manifest (last)

Every file is written atomically and each step leaves a marker, so a build killed at any point and started
again skips what is done and ends with the same bytes as an uninterrupted one; it is refused with another config
or, once planned, another corpus. Ray is the build's own local one unless given a cluster, stopped at the end, and
what a killed build left of it is stopped by the next (pipelines.local_ray). Memory stays bounded: the driver
streams the corpus (keeping the set of document ids), each actor holds one shard at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import BaseModel
from tqdm.auto import tqdm

from data.ingest.corpus import IngestReport, corpus_files, iter_documents
from data.ingest.passages import ChunkReport, iter_passages
from encoders.backbone import Backbone
from encoders.embedded import portable_model_path, shipped_codec
from encoders.hardware import Resolved, autocast, native_bf16, resolve_device, resolve_precision
from encoders.reader_io import load_memory_layers
from memory.artifact import (
    MANIFEST_NAME,
    ManifestError,
    atomic_write,
    file_record,
    read_artifact,
    read_json,
    save_npy,
    write_artifact,
    write_json,
)
from memory.codecs import CODEC_FILE, MemoryCodec, compression_ratio, load_codec, make_codec
from memory.index import META_FILE, PassageIndex, training_rows
from memory.location import STAGING_ENV, RemoteStore, clear, default_staging, is_uri
from memory.store import SHARD_SUFFIXES, STORE_FORMAT, StoreLayout
from pipelines.config import BuildConfig
from pipelines.local_ray import ray_for_build, stop_orphaned_ray

log = logging.getLogger(__name__)

PLAN_MARKER = "plan.json"
CONFIG_NAME = "build_config.json"
CORPUS_NAME = "corpus.json"
PASSAGE_SCHEMA = pa.schema(
    [
        ("passage_id", pa.string()),
        ("doc_id", pa.string()),
        ("title", pa.string()),
        ("text", pa.string()),
        ("start_paragraph_id", pa.int32()),
        ("end_paragraph_id", pa.int32()),
        ("start_character", pa.int32()),
        ("end_character", pa.int32()),
    ]
)


class BuildReport(BaseModel):
    """What a build did, printed at the end and saved in the manifest."""

    documents: int
    passages: int
    tokens: int
    bad_records: int
    duplicate_ids: int  # of the bad records: documents whose id an earlier one had (the first is kept)
    split_words: int  # words longer than chunking's character limit, cut into pieces
    shards: int
    bytes_per_token: int
    compression_vs_bf16: float
    codes_bytes: int
    seconds: dict[str, float]
    passages_per_second: float
    encode_passages_per_second: float
    encode_busy_passages_per_second: float | None


@dataclass(frozen=True)
class _Plan:
    documents: int
    passages: int
    bad_records: int
    duplicate_ids: int
    split_words: int
    shard_sizes: list[int]

    @property
    def row_starts(self) -> list[int]:
        return np.concatenate([[0], np.cumsum(self.shard_sizes)[:-1]]).astype(int).tolist()


@dataclass
class Encoders:
    """The build's encoders: `index` embeds passages for the dense index (the pretrained backbone, which the
    retriever embeds questions with), `memory` makes the memory: the same backbone, or a copy with a reader's
    fine-tuned memory layers (`encoder.memory_from`)."""

    index: Backbone
    memory: Backbone

    @classmethod
    def load(cls, config: BuildConfig, device: torch.device) -> Encoders:
        def pretrained() -> Backbone:
            return Backbone.from_pretrained(config.encoder.model, alpha=config.encoder.alpha)

        index = pretrained().to(device)
        if config.encoder.memory_from is None:
            return cls(index, index)
        return cls(index, load_memory_layers(pretrained(), config.encoder.memory_from).to(device))

    @property
    def memory_digest(self) -> str | None:
        """What the store's manifest records of fine-tuned memory layers (None: the pretrained ones)."""
        return None if self.memory is self.index else self.memory.memory_digest()


def resolved_config(config: BuildConfig) -> BuildConfig:
    """The config with `encoder.precision` "auto" resolved for the device this machine encodes on: what the store
    records (its bytes depend on it), so that a resume elsewhere or with another precision is refused."""
    precision = resolve_precision(config.encoder.precision, resolve_device(config.encoder.device))
    return config.model_copy(update={"encoder": config.encoder.model_copy(update={"precision": precision})})


def _resolved_precision(config: BuildConfig) -> Resolved:
    if config.encoder.precision == "auto":
        raise ValueError("the build config's precision is not resolved (resolved_config)")
    return config.encoder.precision


# -- step 1: plan ------------------------------------------------------------------------------------------------


def plan_passages(corpus: Path, layout: StoreLayout, config: BuildConfig) -> _Plan:
    """Stream the corpus into passage shards; skip if an earlier run finished this step."""
    marker = layout.root / PLAN_MARKER
    if marker.is_file():
        saved = read_json(marker, "plan marker")
        return _Plan(**{field.name: saved[field.name] for field in dataclasses.fields(_Plan)})
    report, chunking = IngestReport(), ChunkReport()
    documents = iter_documents(corpus, fmt=config.format, report=report)
    passages = iter_passages(
        documents,
        words_per_passage=config.chunking.words_per_passage,
        skip_title_paragraph=config.chunking.skip_title_paragraph,
        max_passage_chars=config.chunking.max_passage_chars,
        report=chunking,
    )
    shard_sizes: list[int] = []
    with tqdm(desc="plan: chunking corpus", unit=" passages") as bar:
        for rows in _batched(passages, config.shard_size):
            table = pa.Table.from_pylist(
                [{name: getattr(passage, name) for name in PASSAGE_SCHEMA.names} for passage in rows],
                schema=PASSAGE_SCHEMA,
            )
            path = layout.shard_file(len(shard_sizes), "passages.parquet")
            atomic_write(path, lambda tmp, table=table: pq.write_table(table, tmp, compression="zstd"))
            shard_sizes.append(len(rows))
            bar.update(len(rows))
    bad = [f"{record.path}:{record.line}: {record.reason}" for record in report.bad_records]
    plan = _Plan(report.documents, sum(shard_sizes), len(bad), report.duplicate_ids, chunking.split_words, shard_sizes)
    write_json(marker, dataclasses.asdict(plan) | {"bad_record_examples": bad[:100]})
    if bad:
        log.warning(
            "skipped %d bad records, %d of them duplicate document ids (first: %s); listed in %s",
            len(bad),
            plan.duplicate_ids,
            bad[0],
            marker,
        )
    if plan.split_words:
        log.warning(
            "cut %d words longer than a passage's character limit into pieces (chunking.max_passage_chars)",
            plan.split_words,
        )
    return plan


def _batched(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# -- encoding, shared by the codec sample and the shard encoder -------------------------------------------------


def length_sorted_batches(titles: list[str], texts: list[str], batch_size: int) -> list[list[int]]:
    """Passage indices in batches of similar length (little padding); deterministic, so re-encoding gives the same
    bytes."""
    lengths = [len(title) + len(text) for title, text in zip(titles, texts, strict=True)]
    order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def encode_passages(
    encoders: Encoders, titles: list[str], texts: list[str], config: BuildConfig
) -> Iterator[tuple[list[int], list[torch.Tensor], torch.Tensor]]:
    """Yield (passage indices, memory 'l d' per passage, embeddings 'b d') in `length_sorted_batches`, computed in
    the config's precision (resolved: `resolved_config`)."""
    backbone = encoders.index
    precision = _resolved_precision(config)
    for chosen in length_sorted_batches(titles, texts, config.encoder.batch_size):
        batch = backbone.tokenize_passages(
            [titles[i] for i in chosen], [texts[i] for i in chosen], config.encoder.max_passage_tokens
        )
        batch = batch.to(backbone.device)
        args = (batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        with torch.inference_mode(), autocast(backbone.device, precision):
            memory, embedding = backbone.encode_with_embedding(*args)
            if encoders.memory is not backbone:
                memory = encoders.memory.encode_memory(*args)
        lengths_b = batch["attention_mask"].sum(dim=1).tolist()
        memory = memory.float()
        yield chosen, [memory[i, :n] for i, n in enumerate(lengths_b)], embedding.float()


# -- step 2: codec -----------------------------------------------------------------------------------------------


def shipped_codec_for(config: BuildConfig, encoders: Encoders) -> Path | None:
    """The codec shipped for this build's memory (`encoders.embedded.shipped_codec`) when `codec_source` is auto,
    the memory is the pretrained embedded encoder's and the shipped codec's config is this build's; else None."""
    if config.codec_source != "auto" or config.encoder.memory_from is not None:
        return None
    path = shipped_codec(config.encoder.model, encoders.memory.memory_layers)
    if path is None or load_codec(path).config != config.codec:
        return None
    return path


def train_codec(
    layout: StoreLayout, config: BuildConfig, plan: _Plan, encoders: Encoders, codec_from: Path | None = None
) -> tuple[MemoryCodec, str]:
    """The build's codec and where it came from: a codec an earlier run saved, the fitted one in `codec_from`
    (e.g. codebooks fine-tuned by `memvq train`), the one shipped for the embedded encoder's memory
    (`shipped_codec_for`), or else one fitted on token vectors of a seeded passage sample of this corpus."""
    if (layout.codec_dir / CODEC_FILE).is_file():
        return load_codec(layout.codec_dir), read_json(layout.codec_source, "codec source")["source"]
    shipped = shipped_codec_for(config, encoders) if codec_from is None else None
    if codec_from is not None or shipped is not None:
        given = codec_from or shipped
        codec = load_codec(given)
        if codec.config != config.codec:
            raise ManifestError(
                f"the codec in {codec_from} was made with another codec config than this build's; build with the "
                "config of the store it came from (--config STORE/build_config.json)"
            )
        source = f"shipped: {shipped.name}" if shipped is not None else f"codec_from: {codec_from}"
        log.info("codec: taking the fitted codec in %s", given)
        return _save_codec(codec, layout, source), source
    rng = np.random.default_rng(config.seed)
    rows = codec_sample_rows(config, plan.passages, rng)
    count = len(rows)
    titles, texts = _read_rows(layout, plan, rows)
    vectors = []
    with tqdm(total=count, desc="codec: encoding sample", unit=" passages") as bar:
        for chosen, memories, _ in encode_passages(encoders, titles, texts, config):
            vectors.extend(memory.cpu() for memory in memories)
            bar.update(len(chosen))
    sample = torch.cat(vectors)
    if len(sample) > config.codec_train_vectors:
        keep = np.sort(rng.choice(len(sample), size=config.codec_train_vectors, replace=False))
        sample = sample[torch.from_numpy(keep)]
    log.info("fitting codec %s on %d token vectors", config.codec.kind, len(sample))
    return _save_codec(make_codec(config.codec).fit(sample), layout, "fitted"), "fitted"


def codec_sample_rows(config: BuildConfig, passages: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """The store rows whose memory a codec is fitted on (sorted; seeded by `config.seed` unless `rng` is given)."""
    rng = rng if rng is not None else np.random.default_rng(config.seed)
    return np.sort(rng.choice(passages, size=min(config.codec_sample_passages, passages), replace=False))


def _save_codec(codec: MemoryCodec, layout: StoreLayout, source: str) -> MemoryCodec:
    """Save the build's codec with a record of where it came from (written first: the codec's header says the
    directory is complete)."""
    write_json(layout.codec_source, {"source": source})
    codec.save(layout.codec_dir)
    return codec


def _read_rows(layout: StoreLayout, plan: _Plan, rows: np.ndarray) -> tuple[list[str], list[str]]:
    titles: list[str] = []
    texts: list[str] = []
    starts = np.asarray(plan.row_starts)
    shards = np.searchsorted(starts, rows, side="right") - 1
    for shard in np.unique(shards).tolist():
        table = pq.read_table(layout.shard_file(shard, "passages.parquet"), columns=["title", "text"])
        local = rows[shards == shard] - starts[shard]
        picked = table.take(pa.array(local))
        titles.extend(picked.column("title").to_pylist())
        texts.extend(picked.column("text").to_pylist())
    return titles, texts


# -- step 3: encode shards (Ray) ---------------------------------------------------------------------------------


class ShardEncoder:
    """An encoder actor (`ray.remote` of this class, see `encode_all_shards`): holds the backbone and codec, turns
    shard ids into finished shards in the store, which must be on a filesystem its node sees, or at a `pyarrow.fs`
    URI: then the actor works in a staging directory of its own on its node (under MEMVQ_STAGING_DIR, else the
    temporary directory), downloads the codec and each shard's passages, uploads the finished shard and empties
    the directory."""

    def __init__(self, root: str, config: dict[str, Any]) -> None:
        import tempfile

        import ray

        self.node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        self.remote = RemoteStore(root) if is_uri(root) else None
        if self.remote is not None:
            if not self.remote.exists(PLAN_MARKER):
                raise FileNotFoundError(
                    f"the store {root} has no {PLAN_MARKER} seen from the node {self.node} ({os.uname().nodename}): "
                    "are the node's credentials for it set?"
                )
            parent = os.environ.get(STAGING_ENV)
            if parent:
                Path(parent).mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix="memvq-encoder-", dir=parent))
            self.layout = StoreLayout(staging)
            for name in self.remote.files(self.layout.relative(self.layout.codec_dir)):
                self.remote.download(name, staging / name)
        elif not (Path(root) / PLAN_MARKER).is_file():
            raise FileNotFoundError(
                f"the store {root} is not visible on the node {self.node} ({os.uname().nodename}): a cluster build "
                "needs --out on a filesystem all its nodes share (or a pyarrow.fs URI, e.g. s3://)"
            )
        else:
            self.layout = StoreLayout(Path(root))
        self.config = BuildConfig.model_validate(config)
        torch.set_num_threads(self.config.cpus_per_actor)  # CPU results depend on it: the same on every node
        device = resolve_device(self.config.encoder.device)
        if _resolved_precision(self.config) == "bf16" and not native_bf16(device):
            log.warning("encoder actor on node %s: its %s emulates bf16 (slower than fp32)", self.node, device.type)
        self.encoders = Encoders.load(self.config, device)
        self.codec = load_codec(self.layout.codec_dir).to(device)
        if self.remote is not None:
            clear(self.layout.root)  # between shards the actor's staging directory is left empty

    def ready(self) -> str:
        """The node this actor runs on (answered once the encoder is loaded)."""
        return self.node

    def encode(self, shard: int) -> tuple[int, int, float, str]:
        """Encode one shard: (shard, tokens, seconds spent, node)."""
        start = time.perf_counter()
        if self.remote is None:
            tokens = encode_shard(self.layout, shard, self.encoders, self.codec, self.config)
            return shard, tokens, time.perf_counter() - start, self.node
        layout, remote = self.layout, self.remote
        names = [layout.shard_file(shard, suffix) for suffix in SHARD_SUFFIXES] + [layout.shard_done(shard)]
        try:
            remote.download(layout.relative(names[0]), names[0])
            tokens = encode_shard(layout, shard, self.encoders, self.codec, self.config)
            for path in names[1:]:  # the done marker last: at the URI it says the shard is there
                remote.upload(path, layout.relative(path))
        finally:
            clear(layout.root)
        return shard, tokens, time.perf_counter() - start, self.node


def encode_shard(layout: StoreLayout, shard: int, encoders: Encoders, codec: MemoryCodec, config: BuildConfig) -> int:
    """Encode one planned shard into codes, offsets and embeddings; write them, then the done marker (first removing
    the temporary files of a writer of this shard that was killed)."""
    for stale in layout.shards_dir.glob(f".shard-{shard:05d}.*.tmp-*"):
        stale.unlink(missing_ok=True)
    table = pq.read_table(layout.shard_file(shard, "passages.parquet"), columns=["title", "text"])
    titles, texts = table.column("title").to_pylist(), table.column("text").to_pylist()
    codes: list[np.ndarray | None] = [None] * len(texts)
    embeddings = np.zeros((len(texts), encoders.index.hidden_size), dtype=np.float16)
    for chosen, memories, embedding in encode_passages(encoders, titles, texts, config):
        batch_codes = codec.encode(torch.cat(memories))
        bounds = np.cumsum([0] + [len(memory) for memory in memories])
        for j, i in enumerate(chosen):
            codes[i] = batch_codes[bounds[j] : bounds[j + 1]]
        embeddings[chosen] = embedding.cpu().numpy().astype(np.float16)
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in codes])]).astype(np.int64)
    arrays = {"codes.npy": np.concatenate(codes), "offsets.npy": offsets, "emb.npy": embeddings}
    for suffix, array in arrays.items():
        save_npy(layout.shard_file(shard, suffix), array)
    files = {
        layout.relative(layout.shard_file(shard, s)): file_record(layout.shard_file(shard, s)) for s in SHARD_SUFFIXES
    }
    write_json(layout.shard_done(shard), {"passages": len(texts), "tokens": int(offsets[-1]), "files": files})
    return int(offsets[-1])


class EncoderActorsError(ValueError):
    """The encoder actors cannot run on this Ray cluster: none fits on a node, none started in time, or all were
    lost. (A ValueError, as a request the cluster cannot serve, so the CLI reports it as an `error:` line.)"""


ACTOR_START_TIMEOUT_S = 300.0  # no encoder actor running for this long: an error (MEMVQ_ACTOR_START_TIMEOUT_S)
# Shards are handed out once every actor has loaded its encoder, or this long after the first did: the first actor
# up would otherwise take every shard of a small build before the others are ready.
ACTOR_START_GRACE_S = 30.0


@dataclass(frozen=True)
class ActorSlot:
    """One encoder actor: the node it is pinned to and what it asks Ray for there."""

    node_id: str
    node_ip: str
    num_cpus: float
    num_gpus: int


def describe_nodes(nodes: list[dict[str, Any]]) -> str:
    """The alive nodes of `ray.nodes()` and their total resources, for error messages."""
    described = [
        f"{node['NodeManagerAddress']} (node {node['NodeID'][:8]}): "
        f"{node['Resources'].get('CPU', 0):g} CPU, {node['Resources'].get('GPU', 0):g} GPU"
        for node in nodes
        if node.get("Alive")
    ]
    return "; ".join(described) or "no alive node"


def plan_actors(nodes: list[dict[str, Any]], config: BuildConfig, shards: int) -> list[ActorSlot]:
    """The encoder actors for a Ray cluster's nodes (`ray.nodes()`), from each alive node's total resources (never
    the driver's): with GPUs (`encoder.device` auto or cuda), one per GPU asking for 1 GPU and up to
    `cpus_per_actor` CPUs; without, one per `cpus_per_actor` CPUs of each node. Taken node by node in turn, then cut
    to `num_workers` and to the number of shards. EncoderActorsError at once if no node can hold one."""
    alive = [node for node in nodes if node.get("Alive")]
    per_actor = config.cpus_per_actor
    gpus = config.encoder.device != "cpu" and any(node["Resources"].get("GPU", 0) >= 1 for node in alive)
    if config.encoder.device == "cuda" and not gpus:
        raise EncoderActorsError(
            f"encoder.device is 'cuda' but no node of the Ray cluster has a GPU: {describe_nodes(nodes)}"
        )
    rows = []
    for node in alive:
        cpus, node_gpus = node["Resources"].get("CPU", 0.0), int(node["Resources"].get("GPU", 0))
        if gpus:
            share = min(per_actor, int(cpus // node_gpus)) if node_gpus else 0
            count, slot = node_gpus, ActorSlot(node["NodeID"], node["NodeManagerAddress"], share, 1)
        else:
            count, slot = int(cpus // per_actor), ActorSlot(node["NodeID"], node["NodeManagerAddress"], per_actor, 0)
        rows.append([slot] * count)
    slots = [slot for turn in itertools.zip_longest(*rows) for slot in turn if slot is not None]
    if not slots:
        request = "1 GPU" if gpus else f"{per_actor} CPU (cpus_per_actor)"
        raise EncoderActorsError(
            f"an encoder actor asks for {request}, more than any node of the Ray cluster has: {describe_nodes(nodes)}"
        )
    if config.num_workers and config.num_workers > len(slots):
        log.warning("num_workers is %d but the Ray cluster holds %d encoder actors", config.num_workers, len(slots))
    return slots[: min(config.num_workers or len(slots), shards)]


def encode_all_shards(
    layout: StoreLayout, config: BuildConfig, plan: _Plan, ray_address: str | None, remote: RemoteStore | None = None
) -> float:
    """Encode every shard without a done marker with encoder actors (`plan_actors`) on the build's Ray
    (`pipelines.local_ray.ray_for_build`: a local Ray it stops at the end, or the cluster at `ray_address`), each
    pinned to its node and writing its shards into the store (uploading them to `remote`, a store at a URI, when
    given). An actor lost with its node gives its shard to the others; none started within ACTOR_START_TIMEOUT_S,
    or all lost, is an EncoderActorsError.

    Returns the seconds the actors spent encoding (their busy time, without Ray start-up and model loading)."""
    import ray

    done_shards = _done_shards(layout, remote, len(plan.shard_sizes))
    todo = [shard for shard in range(len(plan.shard_sizes)) if shard not in done_shards]
    if not todo:
        return 0.0
    passages = {shard: plan.shard_sizes[shard] for shard in todo}
    with ray_for_build(ray_address):
        slots = plan_actors(ray.nodes(), config, len(todo))
        log.info(
            "encode: %d actors (%s) on %d nodes",
            len(slots),
            f"1 GPU, {slots[0].num_cpus:g} CPU each" if slots[0].num_gpus else f"{slots[0].num_cpus:g} CPU each",
            len({slot.node_id for slot in slots}),
        )
        with tqdm(total=sum(passages.values()), desc=f"encode: {len(todo)} shards", unit=" passages") as bar:
            root = str(layout.root) if remote is None else remote.uri
            results = _run_encoders(slots, root, config, todo, lambda shard: bar.update(passages[shard]))
    nodes: dict[str, int] = {}
    for _, _, _, node in results:
        nodes[node] = nodes.get(node, 0) + 1
    log.info("encode: shards per node: %s", ", ".join(f"{node[:8]} {count}" for node, count in nodes.items()))
    return sum(seconds for _, _, seconds, _ in results)


def _done_shards(layout: StoreLayout, remote: RemoteStore | None, count: int) -> set[int]:
    """The shards (of `count`) with a done marker, in the store or at `remote` (listed once)."""
    if remote is None:
        return {shard for shard in range(count) if layout.shard_done(shard).is_file()}
    listed = set(remote.files(layout.relative(layout.shards_dir)))
    return {shard for shard in range(count) if layout.relative(layout.shard_done(shard)) in listed}


def _run_encoders(
    slots: list[ActorSlot], root: str, config: BuildConfig, todo: list[int], done: Callable[[int], Any]
) -> list[tuple[int, int, float, str]]:
    """Start one ShardEncoder per slot (on the store at `root`, a directory or a URI) and hand each a shard whenever
    it is free (`done` called per finished shard); returns (shard, tokens, seconds, node) per shard. The actors are
    killed at the end."""
    import ray
    from ray.exceptions import ActorUnschedulableError, NodeDiedError, RayActorError, WorkerCrashedError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    timeout_s = float(os.environ.get("MEMVQ_ACTOR_START_TIMEOUT_S", ACTOR_START_TIMEOUT_S))
    encoder = ray.remote(ShardEncoder)
    queue, results, idle = deque(todo), [], []
    actors: dict[Any, ActorSlot] = {}
    pending: dict[Any, tuple[Any, int | None]] = {}  # object ref -> (actor, shard; None: the `ready` call)
    for slot in slots:
        strategy = NodeAffinitySchedulingStrategy(slot.node_id, soft=False)
        options = {"num_cpus": slot.num_cpus, "num_gpus": slot.num_gpus, "scheduling_strategy": strategy}
        actor = encoder.options(**options).remote(root, config.to_json())
        actors[actor] = slot
        pending[actor.ready.remote()] = (actor, None)
    running, waiting_since = 0, time.monotonic()  # running: actors that have loaded their encoder and are alive
    first_ready: float | None = None

    def give_work(actor: Any) -> None:
        if queue:
            shard = queue.popleft()
            pending[actor.encode.remote(shard)] = (actor, shard)
        else:
            idle.append(actor)

    def hand_out() -> None:
        """Idle actors get shards once all are ready, or the grace after the first one's start has passed."""
        if running == len(actors) or (first_ready is not None and time.monotonic() - first_ready > ACTOR_START_GRACE_S):
            while queue and idle:
                give_work(idle.pop())

    try:
        while pending:
            finished, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            hand_out()
            if not finished:
                if running == 0 and time.monotonic() - waiting_since > timeout_s:
                    raise EncoderActorsError(
                        f"no encoder actor started within {timeout_s:g} s ({len(actors)} asked for, each "
                        f"{slots[0].num_cpus:g} CPU and {slots[0].num_gpus} GPU, pinned to its node); the Ray "
                        f"cluster's nodes: {describe_nodes(ray.nodes())}; available now: {ray.available_resources()}"
                    )
                continue
            actor, shard = pending.pop(finished[0])
            try:
                result = ray.get(finished[0])
            except (RayActorError, ActorUnschedulableError, NodeDiedError, WorkerCrashedError) as error:
                slot = actors.pop(actor)
                with contextlib.suppress(Exception):  # "unavailable" may still run: stop it writing
                    ray.kill(actor)
                if getattr(error, "actor_init_failed", False):
                    raise EncoderActorsError(f"an encoder actor failed to start on {slot.node_ip}: {error}") from error
                if shard is not None:
                    queue.appendleft(shard)
                    running -= 1
                if not actors:
                    raise EncoderActorsError(
                        f"all encoder actors were lost ({len(queue)} shards left); the Ray cluster's nodes: "
                        f"{describe_nodes(ray.nodes())}"
                    ) from error
                log.warning(
                    "encoder actor on %s (node %s) lost%s; %d actors left: %s",
                    slot.node_ip,
                    slot.node_id[:8],
                    "" if shard is None else f", shard {shard} goes to another",
                    len(actors),
                    str(error).splitlines()[0],
                )
                if running == 0:
                    waiting_since = time.monotonic()
                hand_out()
                continue
            if shard is None:
                running += 1
                first_ready = first_ready or time.monotonic()
                idle.append(actor)
                hand_out()
                continue
            results.append(result)
            done(shard)
            give_work(actor)
    finally:
        for actor in actors:
            ray.kill(actor)
    return results


# -- step 4: finalize --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _shard_emb(layout: StoreLayout, remote: RemoteStore | None, shard: int) -> Iterator[Path]:
    """The path of a shard's emb.npy: in the store, or downloaded from `remote` into staging (removed after)."""
    path = layout.shard_file(shard, "emb.npy")
    if remote is None:
        yield path
        return
    try:
        yield remote.download(layout.relative(path), path)
    finally:
        path.unlink(missing_ok=True)


def build_passage_index(
    layout: StoreLayout, config: BuildConfig, plan: _Plan, dim: int, remote: RemoteStore | None = None
) -> PassageIndex:
    """FAISS index over the shards' embeddings, streamed shard by shard: memory is one shard's embeddings, the
    training sample (at most `config.index.train_size` rows) and the index itself, never the whole corpus. With
    `remote` (a store at a URI), each shard's embeddings are downloaded into staging one at a time."""

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for shard, start in enumerate(plan.row_starts):
            with _shard_emb(layout, remote, shard) as path:
                emb = np.load(path).astype(np.float32)
            yield np.arange(start, start + len(emb), dtype=np.int64), emb

    sample = None
    if config.index.factory != "Flat":
        # only the training rows are read (through memory maps), straight into one preallocated array
        rows = training_rows(plan.passages, config.index)
        sample = np.empty((len(rows), dim), dtype=np.float32)
        for shard, (start, size) in enumerate(zip(plan.row_starts, plan.shard_sizes, strict=True)):
            lo, hi = np.searchsorted(rows, [start, start + size])
            if hi > lo:
                with _shard_emb(layout, remote, shard) as path:
                    sample[lo:hi] = np.load(path, mmap_mode="r")[rows[lo:hi] - start]
    index = PassageIndex.build(batches(), dim=dim, config=config.index, train_sample=sample)
    index.save(layout.index_dir)
    return index


def write_manifest(
    layout: StoreLayout,
    config: BuildConfig,
    plan: _Plan,
    markers: list[dict[str, Any]],
    backbone_info: dict[str, Any],
    codec: MemoryCodec,
    codec_source: str,
    report: BuildReport,
    corpus: dict[str, Any],
) -> dict[str, Any]:
    """The store manifest (its memvq-store header), from the plan, the shards' done markers (in shard order, with
    the records of the shard files their encoder hashed), the build report and the corpus record (`record_corpus`)."""
    shards, files = [], {}
    for shard, (start, done) in enumerate(zip(plan.row_starts, markers, strict=True)):
        shards.append({"shard": shard, "row_start": start, "passages": done["passages"], "tokens": done["tokens"]})
        files.update(done["files"])
    for path in sorted([*layout.codec_dir.iterdir(), *layout.index_dir.iterdir()]):
        if path.is_file() and not path.name.startswith("."):
            files[layout.relative(path)] = path
    header = write_artifact(
        layout.root,
        MANIFEST_NAME,
        STORE_FORMAT,
        config.to_json(),
        files=files,
        extra={
            "backbone": backbone_info,
            "codec": {
                "config": codec.config.model_dump(mode="json"),
                "code_width": codec.code_width,
                "code_dtype": np.dtype(codec.code_dtype).name,
                "bytes_per_token": codec.bytes_per_token,
                "source": codec_source,
            },
            "corpus": corpus,
            "num_documents": plan.documents,
            "num_passages": plan.passages,
            "num_tokens": report.tokens,
            "shards": shards,
            "report": report.model_dump(),
        },
    )
    return header.to_json()


# -- the job -----------------------------------------------------------------------------------------------------


def build_index(
    corpus: str | Path,
    out: str | Path,
    config: BuildConfig | None = None,
    ray_address: str | None = None,
    codec_from: str | Path | None = None,
    work_dir: str | Path | None = None,
) -> BuildReport:
    """Build (or resume building) a memory store at `out` from `corpus`; returns the report. `codec_from`: a
    fitted codec directory to encode with instead of fitting one (its config must be the build's).

    `out` is a directory (local, or on a filesystem every Ray node mounts), or a `pyarrow.fs` URI (a `str`, e.g.
    `s3://bucket/store`; memory.location): then the build works in a staging directory under `work_dir` (default
    MEMVQ_STAGING_DIR, else ~/.cache/memvq/staging), started afresh from what the URI holds, and publishes each
    finished piece to the URI: the records, the passages then the plan, the codec, each shard (by the actor that
    encoded it, its done marker last), the index, the manifest last of all. The URI is the build's only state."""
    config = resolved_config(config or BuildConfig())
    corpus = Path(corpus)
    if not corpus.exists():
        raise FileNotFoundError(f"corpus {corpus} does not exist")
    remote = RemoteStore(str(out)) if is_uri(out) else None
    if remote is None:
        layout = StoreLayout(Path(out))
    else:
        layout = StoreLayout(default_staging(remote.uri, None if work_dir is None else Path(work_dir)))
        _pull(remote, layout)
    _check_resume(layout, config)
    if remote is not None and not remote.exists(CONFIG_NAME):
        remote.upload(layout.root / CONFIG_NAME, CONFIG_NAME)
    stop_orphaned_ray()
    clock = time.perf_counter()
    corpus_record = _check_corpus(layout, corpus)
    if remote is not None and not remote.exists(PLAN_MARKER):
        remote.upload(layout.root / CORPUS_NAME, CORPUS_NAME)
    if layout.manifest.is_file():
        log.info("store %s is already complete", out)
        header = read_artifact(layout.manifest, STORE_FORMAT, "store manifest")
        if remote is not None:
            clear(layout.root)
        return BuildReport.model_validate(header.extra["report"])
    seconds: dict[str, float] = {}
    plan = plan_passages(corpus, layout, config)
    if remote is not None and not remote.exists(PLAN_MARKER):
        for shard in range(len(plan.shard_sizes)):
            path = layout.shard_file(shard, "passages.parquet")
            remote.upload(path, layout.relative(path))
        remote.upload(layout.root / PLAN_MARKER, PLAN_MARKER)  # after the passages: it says they are there
    seconds["plan"] = time.perf_counter() - clock  # with recording the corpus

    clock = time.perf_counter()
    encoders = Encoders.load(config, resolve_device(config.encoder.device))
    codec, codec_source = train_codec(layout, config, plan, encoders, None if codec_from is None else Path(codec_from))
    codec_dir = layout.relative(layout.codec_dir)
    if remote is not None and not remote.exists(f"{codec_dir}/{CODEC_FILE}"):
        remote.upload_dir(layout.codec_dir, codec_dir, last=CODEC_FILE)
    seconds["codec"] = time.perf_counter() - clock

    done_before = len(_done_shards(layout, remote, len(plan.shard_sizes)))
    clock = time.perf_counter()
    busy = encode_all_shards(layout, config, plan, ray_address, remote)
    seconds["encode"] = time.perf_counter() - clock

    clock = time.perf_counter()
    build_passage_index(layout, config, plan, encoders.index.hidden_size, remote)
    seconds["index"] = time.perf_counter() - clock
    total = sum(seconds.values())
    seconds["total"] = total

    markers = [
        read_json(layout.shard_done(shard), "shard marker")
        if remote is None
        else remote.read_json(layout.relative(layout.shard_done(shard)))
        for shard in range(len(plan.shard_sizes))
    ]
    tokens = sum(marker["tokens"] for marker in markers)
    report = BuildReport(
        documents=plan.documents,
        passages=plan.passages,
        tokens=tokens,
        bad_records=plan.bad_records,
        duplicate_ids=plan.duplicate_ids,
        split_words=plan.split_words,
        shards=len(plan.shard_sizes),
        bytes_per_token=codec.bytes_per_token,
        compression_vs_bf16=compression_ratio(codec),
        codes_bytes=tokens * codec.bytes_per_token,
        seconds={key: round(value, 3) for key, value in seconds.items()},
        passages_per_second=plan.passages / total,
        encode_passages_per_second=plan.passages / max(seconds["encode"], 1e-9),
        # only meaningful when this run encoded every shard (not after a resume)
        encode_busy_passages_per_second=plan.passages / busy if busy and done_before == 0 else None,
    )
    info = encoders.index.info.__dict__ | {
        "model_path": portable_model_path(config.encoder.model),
        "memory_digest": encoders.memory_digest,
    }
    write_manifest(layout, config, plan, markers, info, codec, codec_source, report, corpus_record)
    if remote is not None:
        index_dir = layout.relative(layout.index_dir)
        remote.upload_dir(layout.index_dir, index_dir, last=META_FILE)
        remote.upload(layout.manifest, MANIFEST_NAME)  # last of all: the store is complete
        clear(layout.root)
    return report


def _pull(remote: RemoteStore, layout: StoreLayout) -> None:
    """Start the staging directory of a build to a URI afresh from what the URI holds: its records, codec and
    manifest, and its passages while the codec is still to be fitted. Refuse a URI holding something else."""
    clear(layout.root)
    names = remote.files()
    if names and CONFIG_NAME not in names:
        raise ManifestError(f"{remote.uri} exists and is not a memvq build directory; choose an empty --out")
    codec_dir = layout.relative(layout.codec_dir)
    passages = f"{codec_dir}/{CODEC_FILE}" not in names and MANIFEST_NAME not in names
    for name in names:
        wanted = name in (CONFIG_NAME, CORPUS_NAME, PLAN_MARKER, MANIFEST_NAME) or name.startswith(f"{codec_dir}/")
        if wanted or (passages and name.endswith(".passages.parquet")):
            remote.download(name, layout.root / name)


def _check_resume(layout: StoreLayout, config: BuildConfig) -> None:
    """Record the config on the first run; refuse to resume a build that was started with another one."""
    path = layout.root / CONFIG_NAME
    if path.is_file():
        saved = read_json(path, "build config")
        if saved != config.to_json():
            raise ManifestError(
                f"{layout.root} holds a build started with a different config; "
                "use a new --out directory (or delete this one) to build with the new config"
            )
        return
    if layout.root.exists() and any(layout.root.iterdir()):
        raise ManifestError(f"{layout.root} exists and is not a memvq build directory; choose an empty --out")
    write_json(path, config.to_json())


def record_corpus(corpus: Path) -> dict[str, Any]:
    """What a store is built from: the corpus path and the path, size and sha256 of each of its files (in reading
    order; each file streamed once to hash it)."""
    files = [{"path": str(path.resolve()), **file_record(path)} for path in corpus_files(corpus)]
    return {"path": str(corpus.resolve()), "files": files}


def _check_corpus(layout: StoreLayout, corpus: Path) -> dict[str, Any]:
    """Record the corpus (`record_corpus`) until the build is planned; from then on refuse another one, even to say
    the store is complete. The same bytes (each file's size and sha256, in order) at another path are the same
    corpus: accepted, the record keeps the first path. Sizes are compared first: only the same sizes are hashed."""
    path = layout.root / CORPUS_NAME
    if not (layout.root / PLAN_MARKER).is_file():
        record = record_corpus(corpus)
        write_json(path, record)
        return record
    if not path.is_file():
        raise ManifestError(
            f"{layout.root} was started by an older memvq that did not record its corpus, so resuming it could mix "
            f"corpora: remove {layout.root} or pass another --out"
        )
    saved = read_json(path, "corpus record")
    sizes = [file.stat().st_size for file in corpus_files(corpus)]
    if sizes == [file["bytes"] for file in saved["files"]]:
        current = record_corpus(corpus)
        if [file["sha256"] for file in current["files"]] == [file["sha256"] for file in saved["files"]]:
            if current["path"] != saved["path"]:
                log.info("corpus %s holds the bytes %s was built from (%s)", corpus, layout.root, saved["path"])
            return saved
        what = _describe(current["files"])
    else:
        what = f"{len(sizes)} file(s), {sum(sizes):,} bytes"
    raise ManifestError(
        f"{layout.root} was built from {saved['path']} ({_describe(saved['files'])}), not {corpus} ({what}): "
        f"remove {layout.root} or pass another --out to build from {corpus}"
    )


def _describe(files: list[dict[str, Any]]) -> str:
    if len(files) == 1:
        return f"sha256 {files[0]['sha256'][:16]}…, {files[0]['bytes']:,} bytes"
    return f"{len(files)} files, {sum(file['bytes'] for file in files):,} bytes"

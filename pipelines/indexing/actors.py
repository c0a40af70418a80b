"""Step 3 of a build, encode: Ray actors holding the encoder, sized per node (one per GPU, else one per
`cpus_per_actor` CPUs of each node), take the shards without a done marker one at a time and write them into the
store (which every node must see, or at a `pyarrow.fs` URI, where each actor uploads its shards). An actor lost
with its node gives its shard to the others; none started in time, or all lost, is an `EncoderActorsError`."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
from tqdm.auto import tqdm

from memvq.encoders.hardware import native_bf16, resolve_device
from memvq.memory.codecs import load_codec
from memvq.memory.location import STAGING_ENV, RemoteStore, clear, is_uri
from memvq.memory.store import StoreLayout, shard_suffixes
from memvq.pipelines.config import BuildConfig
from memvq.pipelines.indexing.encode import Encoders, encode_shard
from memvq.pipelines.local_ray import ray_for_build

log = logging.getLogger(__name__)

ACTOR_START_TIMEOUT_S = 300.0  # no encoder actor running for this long: an error (MEMVQ_ACTOR_START_TIMEOUT_S)
# Shards are handed out once every actor has loaded its encoder, or this long after the first did: the first actor
# up would otherwise take every shard of a small build before the others are ready.
ACTOR_START_GRACE_S = 30.0

ShardResult = tuple[int, int, float, str]  # shard, tokens, seconds spent encoding it, node


class EncoderActorsError(ValueError):
    """The encoder actors cannot run on this Ray cluster: none fits on a node, none started in time, or all were
    lost. (A ValueError, as a request the cluster cannot serve, so the CLI reports it as an `error:` line.)"""


class ShardEncoder:
    """An encoder actor (`ray.remote` of this class): holds the encoders and codec, turns shard ids into finished
    shards in the store, which must be on a filesystem its node sees, or at a `pyarrow.fs` URI: then the actor works
    in a staging directory of its own on its node (under MEMVQ_STAGING_DIR, else the temporary directory), downloads
    the codec and each shard's passages, uploads the finished shard and empties the directory."""

    def __init__(self, root: str, config: dict[str, Any], driver: tuple[str, int] | None = None) -> None:
        """`driver`: the build's driver (node id, pid); an actor on its node stops when that process is gone."""
        import ray

        self.node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        if driver is not None and driver[0] == self.node:
            threading.Thread(target=_exit_when_gone, args=(driver[1],), daemon=True, name="driver-watch").start()
        self.remote = RemoteStore(root) if is_uri(root) else None
        if self.remote is not None:
            self.layout = self._staging(root)
        else:
            self.layout = StoreLayout(Path(root))
            if not self.layout.plan.is_file():
                raise FileNotFoundError(
                    f"the store {root} is not visible on the node {self.node} ({os.uname().nodename}): a cluster "
                    "build needs --out on a filesystem all its nodes share (or a pyarrow.fs URI, e.g. s3://)"
                )
        self.config = BuildConfig.model_validate(config)
        torch.set_num_threads(self.config.cpus_per_actor)  # CPU results depend on it: the same on every node
        device = resolve_device(self.config.encoder.device)
        if self.config.encoder.resolved_precision == "bf16" and not native_bf16(device):
            log.warning("encoder actor on node %s: its %s emulates bf16 (slower than fp32)", self.node, device.type)
        self.encoders = Encoders.load(self.config, device)
        self.codec = load_codec(self.layout.codec_dir).to(device) if self.config.memory else None
        if self.remote is not None:
            clear(self.layout.root)  # between shards the actor's staging directory is left empty

    def _staging(self, root: str) -> StoreLayout:
        """A staging directory of this actor's holding the codec of the store at the URI `root`."""
        layout = StoreLayout(Path(tempfile.mkdtemp(prefix="memvq-encoder-", dir=_staging_parent())))
        assert self.remote is not None
        if not self.remote.exists(layout.relative(layout.plan)):
            raise FileNotFoundError(
                f"the store {root} has no {layout.relative(layout.plan)} seen from the node {self.node} "
                f"({os.uname().nodename}): are the node's credentials for it set?"
            )
        for name in self.remote.files(layout.relative(layout.codec_dir)):
            self.remote.download(name, layout.root / name)
        return layout

    def ready(self) -> str:
        """The node this actor runs on (answered once the encoder is loaded)."""
        return self.node

    def encode(self, shard: int) -> ShardResult:
        """Encode one shard: (shard, tokens, seconds spent, node)."""
        start = time.perf_counter()
        if self.remote is None:
            tokens = encode_shard(self.layout, shard, self.encoders, self.codec, self.config)
            return shard, tokens, time.perf_counter() - start, self.node
        layout, remote = self.layout, self.remote
        suffixes = shard_suffixes(self.config.memory)
        names = [layout.shard_file(shard, suffix) for suffix in suffixes] + [layout.shard_done(shard)]
        try:
            remote.download(layout.relative(names[0]), names[0])
            tokens = encode_shard(layout, shard, self.encoders, self.codec, self.config)
            for path in names[1:]:  # the done marker last: at the URI it says the shard is there
                remote.upload(path, layout.relative(path))
        finally:
            clear(layout.root)
        return shard, tokens, time.perf_counter() - start, self.node


def _exit_when_gone(pid: int, every_s: float = 1.0) -> None:
    """End this process once the process `pid` has (a SIGKILLed driver would leave its actors encoding)."""
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(every_s)
    log.warning("the build's driver (pid %d) is gone: this encoder actor stops", pid)
    os._exit(1)


def _staging_parent() -> str | None:
    parent = os.environ.get(STAGING_ENV)
    if parent:
        Path(parent).mkdir(parents=True, exist_ok=True)
    return parent


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


def done_shards(layout: StoreLayout, remote: RemoteStore | None, shards: Iterable[int]) -> set[int]:
    """The `shards` with a done marker, in the store or at `remote` (listed once)."""
    if remote is None:
        return {shard for shard in shards if layout.shard_done(shard).is_file()}
    listed = set(remote.files(layout.relative(layout.shards_dir)))
    return {shard for shard in shards if layout.relative(layout.shard_done(shard)) in listed}


def encode_all_shards(
    layout: StoreLayout,
    config: BuildConfig,
    shard_sizes: Mapping[int, int],
    ray_address: str | None,
    remote: RemoteStore | None = None,
) -> float:
    """Encode every shard of `shard_sizes` (shard -> passages: a plan's, or an update's new shards) without a done
    marker with encoder actors (`plan_actors`) on the build's Ray
    (`memvq.pipelines.local_ray.ray_for_build`: a local Ray it stops at the end, or the cluster at `ray_address`),
    each pinned to its node and writing its shards into the store (uploading them to `remote`, a store at a URI).

    Returns the seconds the actors spent encoding (their busy time, without Ray start-up and model loading)."""
    import ray

    finished = done_shards(layout, remote, shard_sizes)
    todo = [shard for shard in shard_sizes if shard not in finished]
    if not todo:
        return 0.0
    passages = {shard: shard_sizes[shard] for shard in todo}
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
            results = _ActorPool(slots, root, config, todo, lambda shard: bar.update(passages[shard])).run()
    nodes: dict[str, int] = {}
    for _, _, _, node in results:
        nodes[node] = nodes.get(node, 0) + 1
    log.info("encode: shards per node: %s", ", ".join(f"{node[:8]} {count}" for node, count in nodes.items()))
    return sum(seconds for _, _, seconds, _ in results)


@dataclass
class _ActorPool:
    """One ShardEncoder per slot (on the store at `root`, a directory or a URI), each handed a shard whenever it is
    free (`done` called per finished shard); the actors are killed at the end."""

    slots: list[ActorSlot]
    root: str
    config: BuildConfig
    todo: list[int]
    done: Callable[[int], Any]
    actors: dict[Any, ActorSlot] = field(default_factory=dict)
    pending: dict[Any, tuple[Any, int | None]] = field(default_factory=dict)  # ref -> (actor, shard; None: ready)
    idle: list[Any] = field(default_factory=list)
    running: int = 0  # actors that have loaded their encoder and are alive
    first_ready: float | None = None
    queue: deque[int] = field(init=False)  # the shards not handed out yet

    def __post_init__(self) -> None:
        self.queue = deque(self.todo)

    def run(self) -> list[ShardResult]:
        """(shard, tokens, seconds, node) per shard encoded."""
        import ray

        timeout_s = float(os.environ.get("MEMVQ_ACTOR_START_TIMEOUT_S", ACTOR_START_TIMEOUT_S))
        results: list[ShardResult] = []
        self._start()
        waiting_since = time.monotonic()
        try:
            while self.pending:
                finished, _ = ray.wait(list(self.pending), num_returns=1, timeout=1.0)
                self._hand_out()
                if not finished:
                    if self.running == 0 and time.monotonic() - waiting_since > timeout_s:
                        raise self._none_started(timeout_s)
                    continue
                actor, shard = self.pending.pop(finished[0])
                result = self._collect(finished[0], actor, shard)
                if result is None and self.running == 0:
                    waiting_since = time.monotonic()
                elif result is not None:
                    results.append(result)
        finally:
            for actor in self.actors:
                ray.kill(actor)
        return results

    def _start(self) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        encoder = ray.remote(ShardEncoder)
        driver = (ray.get_runtime_context().get_node_id(), os.getpid())
        for slot in self.slots:
            strategy = NodeAffinitySchedulingStrategy(slot.node_id, soft=False)
            options = {"num_cpus": slot.num_cpus, "num_gpus": slot.num_gpus, "scheduling_strategy": strategy}
            actor = encoder.options(**options).remote(self.root, self.config.to_json(), driver)
            self.actors[actor] = slot
            self.pending[actor.ready.remote()] = (actor, None)

    def _collect(self, ref: Any, actor: Any, shard: int | None) -> ShardResult | None:
        """The outcome of a finished call: a shard's result, or None (an actor ready, or lost)."""
        import ray
        from ray.exceptions import (
            ActorUnschedulableError,
            NodeDiedError,
            RayActorError,
            RayTaskError,
            WorkerCrashedError,
        )

        try:
            result = ray.get(ref)
        except (RayActorError, ActorUnschedulableError, NodeDiedError, WorkerCrashedError) as error:
            self._lost(actor, shard, error)
            return None
        except RayTaskError as error:  # the encoder's own error (a full disk, a bad file): the build's, as raised
            log.debug("shard %s failed in its encoder actor:\n%s", shard, error)
            cause = error.cause
            raise (cause if isinstance(cause, Exception) else error) from None
        if shard is None:
            self.running += 1
            self.first_ready = self.first_ready or time.monotonic()
            self.idle.append(actor)
            self._hand_out()
            return None
        self.done(shard)
        self._give_work(actor)
        return result

    def _lost(self, actor: Any, shard: int | None, error: Exception) -> None:
        """An actor died (or its node did): its shard goes back to the queue, the others go on."""
        import ray

        slot = self.actors.pop(actor)
        with contextlib.suppress(Exception):  # "unavailable" may still run: stop it writing
            ray.kill(actor)
        if getattr(error, "actor_init_failed", False):
            raise EncoderActorsError(f"an encoder actor failed to start on {slot.node_ip}: {error}") from error
        if shard is not None:
            self.queue.appendleft(shard)
            self.running -= 1
        if not self.actors:
            raise EncoderActorsError(
                f"all encoder actors were lost ({len(self.queue)} shards left); the Ray cluster's nodes: "
                f"{describe_nodes(ray.nodes())}"
            ) from error
        log.warning(
            "encoder actor on %s (node %s) lost%s; %d actors left: %s",
            slot.node_ip,
            slot.node_id[:8],
            "" if shard is None else f", shard {shard} goes to another",
            len(self.actors),
            str(error).splitlines()[0],
        )
        self._hand_out()

    def _give_work(self, actor: Any) -> None:
        if self.queue:
            shard = self.queue.popleft()
            self.pending[actor.encode.remote(shard)] = (actor, shard)
        else:
            self.idle.append(actor)

    def _hand_out(self) -> None:
        """Idle actors get shards once all are ready, or the grace after the first one's start has passed."""
        started = self.first_ready is not None and time.monotonic() - self.first_ready > ACTOR_START_GRACE_S
        if self.running == len(self.actors) or started:
            while self.queue and self.idle:
                self._give_work(self.idle.pop())

    def _none_started(self, timeout_s: float) -> EncoderActorsError:
        import ray

        slot = self.slots[0]
        return EncoderActorsError(
            f"no encoder actor started within {timeout_s:g} s ({len(self.actors)} asked for, each "
            f"{slot.num_cpus:g} CPU and {slot.num_gpus} GPU, pinned to its node); the Ray cluster's nodes: "
            f"{describe_nodes(ray.nodes())}; available now: {ray.available_resources()}"
        )

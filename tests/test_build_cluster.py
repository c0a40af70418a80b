"""build-index on a multi-node Ray cluster: actors sized per node from Ray's resources, requests no node can hold
refused at once, and on a real two-node cluster on this machine (`ray.cluster_utils.Cluster`, 1 CPU per node) a
store byte-identical to a local build, also after its driver or one of its nodes is killed mid-build."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import assert_same_store, tiny_config, two_node_cluster

from memvq.pipelines import local_ray
from memvq.pipelines.build import build_index
from memvq.pipelines.indexing.actors import EncoderActorsError, plan_actors

# -- sizing (no Ray) ---------------------------------------------------------------------------------------------


def node(name: str, cpus: float, gpus: float = 0, alive: bool = True) -> dict:
    """A `ray.nodes()` entry."""
    resources = {"CPU": cpus, "memory": 1e9} | ({"GPU": gpus} if gpus else {})
    return {"NodeID": f"{name}-id", "NodeManagerAddress": name, "Alive": alive, "Resources": resources}


def shape(slots) -> list[tuple[str, float, int]]:
    return [(slot.node_ip, slot.num_cpus, slot.num_gpus) for slot in slots]


def test_cpu_actors_are_sized_per_node(tmp_path):
    nodes = [node("big", 8), node("small", 2), node("tiny", 0.5), node("gone", 64, alive=False)]
    config = tiny_config(tmp_path, cpus_per_actor=2)
    assert shape(plan_actors(nodes, config, shards=100)) == [("big", 2, 0), ("small", 2, 0)] + [("big", 2, 0)] * 3
    assert len(plan_actors(nodes, config, shards=3)) == 3  # never more actors than shards
    assert shape(plan_actors(nodes, tiny_config(tmp_path, num_workers=2, cpus_per_actor=2), 100)) == [
        ("big", 2, 0),
        ("small", 2, 0),
    ]
    assert len(plan_actors(nodes, tiny_config(tmp_path), 100)) == 8 + 2  # one per CPU by default
    assert len(plan_actors(nodes, tiny_config(tmp_path, num_workers=50), 100)) == 10  # what fits


def test_gpu_actors_come_from_the_clusters_gpus_not_the_drivers(tmp_path):
    nodes = [node("cpu-only", 16), node("two-gpus", 4, gpus=2), node("one-gpu", 8, gpus=1)]
    slots = plan_actors(nodes, tiny_config(tmp_path, cpus_per_actor=4), shards=100)
    assert shape(slots) == [("two-gpus", 2, 1), ("one-gpu", 4, 1), ("two-gpus", 2, 1)]
    on_cpu = plan_actors(nodes, tiny_config(tmp_path, encoder={"device": "cpu"}, cpus_per_actor=4), shards=100)
    assert {slot.num_gpus for slot in on_cpu} == {0} and len(on_cpu) == 4 + 1 + 2


def test_a_request_no_node_holds_is_refused_at_once(tmp_path):
    nodes = [node("10.0.0.1", 1), node("10.0.0.2", 1)]
    with pytest.raises(EncoderActorsError, match=r"asks for 2 CPU \(cpus_per_actor\).*10\.0\.0\.1 .*1 CPU, 0 GPU"):
        plan_actors(nodes, tiny_config(tmp_path, cpus_per_actor=2), shards=10)
    with pytest.raises(EncoderActorsError, match="'cuda' but no node of the Ray cluster has a GPU"):
        plan_actors(nodes, tiny_config(tmp_path, encoder={"device": "cuda"}), shards=10)


def test_an_actor_that_cannot_see_the_store_says_so(tmp_path):
    from memvq.pipelines.indexing.actors import ShardEncoder

    with pytest.raises(FileNotFoundError, match="needs --out on a filesystem all its nodes share"):
        ShardEncoder(str(tmp_path / "elsewhere"), tiny_config(tmp_path).to_json())


# -- a real two-node cluster ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes of 1 CPU each on this machine, their files in a directory of their own; at the end every
    process of theirs must be gone."""
    with two_node_cluster() as started:
        yield started


@pytest.fixture(scope="module")
def config(tiny_bert_path):
    """10-word passages in 2-passage shards: ~180 shards, so that encoding lasts long enough to kill it midway."""
    return tiny_config(tiny_bert_path, chunking={"words_per_passage": 10}, shard_size=2)


@pytest.fixture(scope="module")
def local_store(mini_corpus, config, tmp_path_factory) -> Path:
    """The store of a local build (its own Ray), to compare cluster builds with. Its Ray's token authentication
    does not outlive it (else this process's actors on the cluster, which has none, would be cancelled)."""
    out = tmp_path_factory.mktemp("local") / "store"
    auth_mode = os.environ.get("RAY_AUTH_MODE")
    build_index(mini_corpus, out, config)
    assert os.environ.get("RAY_AUTH_MODE") == auth_mode
    return out


def done_shards(store: Path) -> int:
    return len(list((store / "shards").glob("*.done.json")))


def start_cli_build(config, corpus: Path, out: Path, address: str) -> subprocess.Popen:
    path = out.parent / "build.json"
    path.write_text(json.dumps(config.to_json()))
    command = [
        sys.executable,
        "-m",
        "memvq.cli",
        "-v",
        "build-index",
        "--corpus",
        str(corpus),
        "--out",
        str(out),
    ]
    command += ["--config", str(path), "--ray-address", address]
    return subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_for_first_shard(process: subprocess.Popen, out: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not (out / "shards").is_dir() or done_shards(out) == 0:
        assert process.poll() is None, process.stdout.read().decode()
        assert time.monotonic() < deadline, "the build never finished a shard"
        time.sleep(0.02)


def wait_until_encoding_on(node, process: subprocess.Popen, timeout_s: float = 120) -> None:
    """Until an encoder actor on `node` (a child of its raylet) runs a shard."""
    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    deadline = time.monotonic() + timeout_s
    while True:
        titles = []
        for child in raylet.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                titles.append(" ".join(child.cmdline()))
        if any("ShardEncoder.encode" in title for title in titles):
            return
        assert process.poll() is None, process.stdout.read().decode()
        assert time.monotonic() < deadline, f"no encoder ran a shard on the node: {titles}"
        time.sleep(0.02)


def encoder_processes(cluster) -> list[str]:
    """The cluster's encoder actor processes still running."""
    left = []
    for pid, _ in local_ray.processes_using(cluster.temp_dir):
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(pid)
            if "ShardEncoder" in " ".join(process.cmdline()) and process.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{pid} {process.name()}")
    return left


def test_cluster_build_runs_on_both_nodes_and_matches_a_local_build(
    cluster, config, local_store, mini_corpus, tmp_path, caplog
):
    import ray

    caplog.set_level(logging.INFO, logger="memvq.pipelines")
    out = tmp_path / "store"
    build_index(mini_corpus, out, config, ray_address=cluster.address)
    assert not ray.is_initialized()  # only connected to, and disconnected from
    per_node = next(r.getMessage() for r in caplog.records if "shards per node" in r.getMessage())
    counts = [int(part.split()[-1]) for part in per_node.split(": ", 1)[1].split(", ")]
    assert len(counts) == 2 and all(count > 0 for count in counts), per_node
    assert sum(counts) == len(json.loads((out / "plan.json").read_text())["shard_sizes"]) == done_shards(out)
    assert "2 actors (1 CPU each) on 2 nodes" in caplog.text
    assert_same_store(out, local_store)
    assert len([n for n in cluster.list_all_nodes() if n.remaining_processes_alive()]) == 2  # the cluster runs on


def test_actors_that_cannot_start_fail_within_the_timeout(cluster, config, mini_corpus, tmp_path, monkeypatch):
    """Both nodes' CPUs held by other actors: the build's actors fit on the nodes but never start."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.init(address=cluster.address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:

        @ray.remote(num_cpus=1)
        class Holder:
            def ping(self) -> bool:
                return True

        holders = [
            Holder.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
            for n in ray.nodes()
            if n["Alive"]
        ]
        ray.get([holder.ping.remote() for holder in holders])
        monkeypatch.setenv("MEMVQ_ACTOR_START_TIMEOUT_S", "3")
        start = time.monotonic()
        with pytest.raises(EncoderActorsError, match=r"no encoder actor started within 3 s \(2 asked for, each 1 CPU"):
            build_index(mini_corpus, tmp_path / "store", config, ray_address=cluster.address)
        assert time.monotonic() - start < 60
        for holder in holders:
            ray.kill(holder)
    finally:
        ray.shutdown()


def test_killed_driver_resumes_to_identical_bytes(cluster, config, local_store, mini_corpus, tmp_path):
    out = tmp_path / "store"
    driver = start_cli_build(config, mini_corpus, out, cluster.address)
    try:
        wait_for_first_shard(driver, out)
        os.killpg(driver.pid, signal.SIGKILL)
    finally:
        driver.kill()
        driver.wait()
    total = len(json.loads((out / "plan.json").read_text())["shard_sizes"])
    assert 0 < done_shards(out) < total, "the kill must land while shards remain to be encoded"
    build_index(mini_corpus, out, config, ray_address=cluster.address)
    assert_same_store(out, local_store)
    deadline = time.monotonic() + 10
    while encoder_processes(cluster) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert encoder_processes(cluster) == []  # the killed driver's actors are gone with it, the rerun's at its end


def test_a_node_lost_mid_build_leaves_the_rest_to_finish(cluster, config, local_store, mini_corpus, tmp_path):
    """A third node is killed (not drained) while its actor encodes a shard: the shard goes to the other nodes'
    actors, the build finishes on them."""
    third = cluster.add_node(num_cpus=1, temp_dir=str(cluster.temp_dir))
    cluster.wait_for_nodes()
    out = tmp_path / "store"
    driver = start_cli_build(config, mini_corpus, out, cluster.address)
    try:
        wait_until_encoding_on(third, driver)
        cluster.remove_node(third, allow_graceful=False)
        output = driver.communicate(timeout=300)[0].decode()
    finally:
        driver.kill()
        driver.wait()
    assert driver.returncode == 0, output
    assert "3 actors (1 CPU each) on 3 nodes" in output
    assert "lost, shard" in output and "goes to another; 2 actors left" in output, output
    assert_same_store(out, local_store)

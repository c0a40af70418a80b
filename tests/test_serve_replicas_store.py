"""`memvq serve --replicas` on a store whose files change under it: the replica says so on every route but /healthz
(503 store_changed, fast) and is not restarted over and over (it used to fail Serve's health check: a restart loop
in which every request hung)."""

from __future__ import annotations

import shutil
import time

import httpx
import pytest
from conftest import flip_byte
from test_serve_replicas import REPLICA_HEADER, local_replicas

from memvq.serve.settings import ServeSettings


@pytest.mark.slow
def test_a_replica_whose_store_changed_answers_503_and_is_not_restarted(tiny_store, tiny_reader_path, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(tiny_store[0], store)
    settings = ServeSettings(watch_interval_s=0.2)
    with (
        local_replicas(store, tiny_reader_path, 1, settings) as url,
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        question = {"question": "who got the first nobel prize in physics"}
        first = client.post("/v1/answer", json=question)
        assert first.status_code == 200, first.text
        replica = first.headers[REPLICA_HEADER]
        flip_byte(store / "shards" / "shard-00001.codes.npy", keep_mtime=True)
        deadline = time.monotonic() + 20
        while client.post("/v1/answer", json=question).status_code == 200:
            assert time.monotonic() < deadline, "the change was not seen"
            time.sleep(0.1)
        until = time.monotonic() + 8  # longer than Serve's health-check period (the old restart loop)
        while time.monotonic() < until:
            for path in ["/v1/answer", "/readyz", "/metrics", "/v1/models"]:
                started = time.monotonic()
                response = client.post(path, json=question) if path == "/v1/answer" else client.get(path)
                assert time.monotonic() - started < 5, f"{path} took {time.monotonic() - started:.1f} s"
                assert response.status_code == 503, (path, response.text)
                assert "shards/shard-00001.codes.npy" in response.text, path
                assert response.headers[REPLICA_HEADER] == replica  # the same replica: not restarted
            assert client.get("/healthz").status_code == 200
            time.sleep(0.5)


@pytest.mark.slow
def test_replicas_serve_the_next_generation_without_a_restart(tiny_store, tiny_reader_path, tmp_path):
    """Two replicas; an update deletes a page: each replica moves to generation 1 on its own (/readyz and /v1/models
    name it), the page is no longer retrieved, no request fails, and neither replica is restarted."""
    import json

    from memvq.memory.store import MemoryStore
    from memvq.pipelines.update import update_store

    store = tmp_path / "store"
    shutil.copytree(tiny_store[0], store)
    page = MemoryStore.open(store).passages([0])[0]["doc_id"]
    (tmp_path / "delete.txt").write_text(page + "\n")
    settings = ServeSettings(watch_interval_s=0.2, max_top_k=1000)
    question = {"question": "who got the first nobel prize in physics", "top_k": 1000}
    with (
        local_replicas(store, tiny_reader_path, 2, settings) as url,
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        before = client.post("/v1/retrieve", json=question)
        assert page in {p["wikipedia_id"] for p in before.json()["passages"]}
        replicas = {client.get("/readyz").headers[REPLICA_HEADER] for _ in range(20)}
        update_store(store, delete=tmp_path / "delete.txt")  # deletions only: no encoding, no Ray of its own
        deadline, moved = time.monotonic() + 30, set()
        while moved != replicas:
            assert time.monotonic() < deadline, f"replicas at generation 1: {moved} of {replicas}"
            ready = client.get("/readyz")
            assert ready.status_code == 200, ready.text
            if ready.json()["generation"] == 1:
                moved.add(ready.headers[REPLICA_HEADER])
        for _ in range(10):
            after = client.post("/v1/retrieve", json=question)
            assert after.status_code == 200 and after.headers[REPLICA_HEADER] in replicas
            assert page not in {p["wikipedia_id"] for p in after.json()["passages"]}
        assert json.loads(client.get("/v1/models").text)["data"][0]["generation"] == 1

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

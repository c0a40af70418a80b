"""`memvq serve --replicas` on a store whose files change under it: the replica says so on every route but /healthz
(503 store_changed, fast) and is not restarted over and over (it used to fail Serve's health check: a restart loop
in which every request hung)."""

from __future__ import annotations

import os
import shutil
import time

import httpx
import pytest
from test_serve_replicas import REPLICA_HEADER, free_port, ray_children
from test_store_integrity import flip_byte

from memvq.pipelines.config import LoadOptions
from memvq.serve.settings import ServeSettings


@pytest.mark.slow
def test_a_replica_whose_store_changed_answers_503_and_is_not_restarted(tiny_store, tiny_reader_path, tmp_path):
    from memvq.serve.replicas import replicas_running

    store = tmp_path / "store"
    shutil.copytree(tiny_store[0], store)
    address = os.environ.pop("RAY_ADDRESS", None)
    port = free_port()
    settings = ServeSettings(watch_interval_s=0.2)
    try:
        with (
            replicas_running(
                store,
                tiny_reader_path,
                replicas=1,
                host="127.0.0.1",
                port=port,
                load=LoadOptions(device="cpu"),
                settings=settings,
            ),
            httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client,
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
    finally:
        if address is not None:
            os.environ["RAY_ADDRESS"] = address
    deadline = time.monotonic() + 15
    while ray_children() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not ray_children(), f"Ray processes left: {[p.cmdline()[:2] for p in ray_children()]}"

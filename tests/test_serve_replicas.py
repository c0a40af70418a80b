"""`memvq serve --replicas N`: the API on Ray Serve replicas. Ray Serve's batching behind the server's batcher
interface (in process, quick), the command's wiring, then two replicas of the tiny store and reader on a local Ray
behind Serve's HTTP proxy on loopback: the same answers and errors as the single-process app, both replicas
serving, and a replica killed under load replaced without losing a request."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from memvq.pipelines.config import LoadOptions
from memvq.pipelines.rag import RAGAnswer, RAGPipeline
from memvq.serve.app import create_app
from memvq.serve.replicas import REPLICA_HEADER, ServeBatcher
from memvq.serve.settings import ServeSettings

QUESTION = "who got the first nobel prize in physics"
KEY = "s3cret"
SETTINGS = {"api_key": KEY, "max_batch_size": 8, "max_wait_ms": 20, "max_question_chars": 200, "max_body_bytes": 4096}

# -- Ray Serve's batching, in process ------------------------------------------------------------------------------


class FakePipeline:
    """Answers `answer to Q`; records each model call; raises on a question containing 'boom'."""

    config = SimpleNamespace(mode="fid", top_k=3, rerank_k=2, max_answer_tokens=8, num_beams=1, min_confidence=0.0)
    precision = "fp32"

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def answer(self, questions, options=None):
        self.calls.append(list(questions))
        time.sleep(0.02)
        if any("boom" in q for q in questions):
            raise ValueError("boom")
        return [RAGAnswer(question=q, answer=f"answer to {q}", passages=[]) for q in questions]

    def retrieve(self, questions, options=None):
        return [[] for _ in questions]


def test_serve_batching_groups_by_options_and_fails_only_the_failing_call(monkeypatch):
    from ray import serve

    # Outside a replica `@serve.batch` only reads the replica's max_ongoing_requests (to warn when it is too low).
    context = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=64))
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)
    pipeline = FakePipeline()
    app = create_app(pipeline, ServeSettings(max_batch_size=8, max_wait_ms=200), batcher=ServeBatcher)

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            bodies = [{"question": f"q{i}", "top_k": 2 + i % 2} for i in range(8)]
            answers = await asyncio.gather(*(c.post("/v1/answer", json=body) for body in bodies))
            boom, fine = await asyncio.gather(
                c.post("/v1/answer", json={"question": "boom"}),
                c.post("/v1/answer", json={"question": "fine", "top_k": 2}),
            )
            batch = await c.post("/v1/answer:batch", json={"questions": ["x", "y", "z"]})
            return answers, boom, fine, batch, await c.get("/metrics")

    answers, boom, fine, batch, metrics = asyncio.run(main())
    assert [r.json()["answer"] for r in answers] == [f"answer to q{i}" for i in range(8)]
    assert [r.json()["batch_size"] for r in answers] == [4] * 8  # one Serve batch, one model call per top_k
    assert sorted(sorted(call) for call in pipeline.calls[:2]) == [["q0", "q2", "q4", "q6"], ["q1", "q3", "q5", "q7"]]
    assert boom.status_code == 500 and boom.json()["error"]["type"] == "model_error"
    assert (
        fine.status_code == 200 and fine.json()["answer"] == "answer to fine"
    )  # same batch, other options: own model call
    assert [a["batch_size"] for a in batch.json()["answers"]] == [3, 3, 3]
    assert 'memvq_batch_failures_total{op="answer"} 1.0' in metrics.text and "memvq_queue_depth 0.0" in metrics.text


def test_serve_command_deploys_replicas_only_when_asked(tiny_store, tiny_reader_path, monkeypatch):
    from memvq.cli import app
    from memvq.serve import replicas

    result = CliRunner().invoke(app, ["serve", "--store", str(tiny_store[0]), "--ray-address", "auto"])
    assert result.exit_code == 2 and "--ray-address needs --replicas" in result.output
    calls = []
    monkeypatch.setattr(replicas, "serve_replicas", lambda *args, **kwargs: calls.append(kwargs))
    args = ["serve", "--store", str(tiny_store[0]), "--model", str(tiny_reader_path), "--replicas", "2"]
    result = CliRunner().invoke(app, [*args, "--port", "8124", "--ray-address", "ray://head:10001", "--no-verify"])
    assert result.exit_code == 0, result.output
    [options] = calls
    assert options["replicas"] == 2 and options["port"] == 8124 and options["ray_address"] == "ray://head:10001"
    assert options["load"].verify is False and options["settings"].max_batch_size == 16


# -- two replicas on a local Ray, behind Serve's proxy -------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_children() -> list:
    import psutil

    return [p for p in psutil.Process().children(recursive=True) if p.is_running() and "ray" in " ".join(p.cmdline())]


@contextmanager
def local_replicas(store, reader, replicas: int, settings: ServeSettings) -> Iterator[str]:
    """`replicas` replicas of a store and reader on a local Ray of the caller's own (RAY_ADDRESS set aside), started
    and stopped here: the proxy's URL. Afterwards no Ray process of the test's is left."""
    from memvq.serve.replicas import replicas_running

    address = os.environ.pop("RAY_ADDRESS", None)
    port = free_port()
    try:
        with replicas_running(
            store,
            reader,
            replicas=replicas,
            host="127.0.0.1",
            port=port,
            load=LoadOptions(device="cpu"),
            settings=settings,
        ):
            yield f"http://127.0.0.1:{port}"
    finally:
        if address is not None:
            os.environ["RAY_ADDRESS"] = address
    deadline = time.monotonic() + 15
    while ray_children() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not ray_children(), f"Ray processes left: {[p.cmdline()[:2] for p in ray_children()]}"


@pytest.fixture(scope="module")
def cluster(tiny_store, tiny_reader_path):
    """Two replicas of the tiny store and reader (API key on): the proxy's URL."""
    with local_replicas(tiny_store[0], tiny_reader_path, 2, ServeSettings(**SETTINGS)) as url:
        yield url


@pytest.fixture(scope="module")
def single(tiny_store, tiny_reader_path):
    """The single-process app over the same store, reader and settings."""
    pipeline = RAGPipeline.load(tiny_store[0], tiny_reader_path, device="cpu")
    with TestClient(create_app(pipeline, ServeSettings(**SETTINGS)), headers={"X-API-Key": KEY}) as client:
        yield client


@pytest.fixture(scope="module")
def client(cluster):
    with httpx.Client(base_url=cluster, headers={"X-API-Key": KEY}, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def questions(shared_data) -> list[str]:
    with open(shared_data / "nq_open_oracle" / "nq-oracle-dev-kilt.jsonl") as lines:
        return [json.loads(line)["input"] for line, _ in zip(lines, range(8), strict=False)]


def comparable(body):
    """A response body without its timings, scores rounded (the replicas' thread counts differ from the test's)."""
    if isinstance(body, dict):
        return {key: comparable(value) for key, value in body.items() if key != "timings_ms"}
    if isinstance(body, list):
        return [comparable(value) for value in body]
    return round(body, 4) if isinstance(body, float) else body


@pytest.mark.slow
def test_replicas_answer_as_the_single_process_server(client, single, questions):
    for question in questions:  # one at a time: batch size 1 on both
        body = {"question": question, "return_passages": True}
        replicated, local = client.post("/v1/answer", json=body), single.post("/v1/answer", json=body)
        assert replicated.status_code == local.status_code == 200, replicated.text
        assert comparable(replicated.json()) == comparable(local.json()), question
        body = {"question": question, "top_k": 4}
        replicated, local = client.post("/v1/retrieve", json=body), single.post("/v1/retrieve", json=body)
        assert comparable(replicated.json()) == comparable(local.json()), question
    body = {"questions": questions, "top_k": 4, "rerank_k": 2}
    replicated, local = (
        client.post("/v1/answer:batch", json=body).json(),
        single.post("/v1/answer:batch", json=body).json(),
    )
    assert comparable(replicated) == comparable(local)
    chat = {"model": "memvq", "messages": [{"role": "user", "content": QUESTION}]}
    replicated, local = client.post("/v1/chat/completions", json=chat), single.post("/v1/chat/completions", json=chat)
    assert replicated.status_code == 200
    assert replicated.json()["choices"][0]["message"] == local.json()["choices"][0]["message"]


@pytest.mark.slow
def test_the_api_key_and_the_errors_hold_through_the_proxy(cluster, client, single):
    with httpx.Client(base_url=cluster, timeout=60) as anonymous:
        for headers in [{}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}]:
            response = anonymous.post("/v1/answer", json={"question": QUESTION}, headers=headers)
            assert response.status_code == 401 and response.json()["error"]["type"] == "unauthorized", headers
            assert response.headers[REPLICA_HEADER]  # answered by a replica's app, not by the proxy
        assert anonymous.get("/metrics").status_code == 401
        assert anonymous.post("/v1/chat/completions", json={}).json()["error"]["type"] == "authentication_error"
        assert anonymous.get("/healthz").status_code == 200 and anonymous.get("/readyz").json()["status"] == "ready"
        assert anonymous.post("/v1/answer", json={"question": QUESTION}, headers={"Authorization": f"Bearer {KEY}"})
    for method, path, body in [
        ("post", "/v1/answer", {"question": ""}),
        ("post", "/v1/answer", {"question": QUESTION, "top_k": 1000}),
        ("post", "/v1/answer", {"question": "x" * 5000}),  # over max_body_bytes: 413
        ("post", "/v1/answer:batch", {"questions": []}),
        ("get", "/v1/nothing", None),
    ]:
        replicated, local = client.request(method, path, json=body), single.request(method, path, json=body)
        assert (replicated.status_code, replicated.json()) == (local.status_code, local.json()), path
    broken = client.post("/v1/answer", content=b'{"question": ', headers={"content-type": "application/json"})
    assert broken.status_code == 422 and broken.json()["error"]["type"] == "invalid_request"


def replica_metrics(client: httpx.Client, replicas: int = 2) -> dict[str, float]:
    """Each replica's count of 200s on /v1/answer (its own registry: asked until every replica answered)."""
    counts: dict[str, float] = {}
    for _ in range(100):
        response = client.get("/metrics")
        value = 0.0
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                if sample.name == "memvq_http_requests_total" and sample.labels["endpoint"] == "/v1/answer":
                    value += sample.value if sample.labels["status"] == "200" else 0.0
        counts[response.headers[REPLICA_HEADER]] = value
        if len(counts) == replicas:
            return counts
    raise AssertionError(f"/metrics answered by {len(counts)} replicas only")


@pytest.mark.slow
def test_both_replicas_serve_requests_and_keep_their_own_metrics(cluster, client):
    before = replica_metrics(client)

    async def burst():
        async with httpx.AsyncClient(base_url=cluster, headers={"X-API-Key": KEY}, timeout=60) as c:
            return await asyncio.gather(
                *(c.post("/v1/answer", json={"question": f"{QUESTION} {i}"}) for i in range(24))
            )

    responses = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    served = Counter(r.headers[REPLICA_HEADER] for r in responses)
    assert len(served) == 2, served
    after = replica_metrics(client)
    assert set(after) == set(before) == set(served)
    assert {replica: after[replica] - before[replica] for replica in after} == dict(served)


def replica_actor(replica: str):
    """The Ray actor of a replica (named after the id in its responses' X-Memvq-Replica header)."""
    import ray

    [name] = [
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith("SERVE_REPLICA::") and actor["name"].endswith(f"#{replica}")
    ]
    return ray.get_actor(name, namespace="serve")


KILL_RUNS = int(os.environ.get("MEMVQ_KILL_RUNS", "2"))  # 10 for the measurement


@pytest.mark.slow
@pytest.mark.parametrize("run", range(KILL_RUNS))
def test_a_killed_replica_is_replaced_and_no_request_is_lost(cluster, run):
    """100 requests from 8 clients (every 4th a streamed chat completion), one replica SIGKILLed after 20 answers:
    every request is answered 200 (the router retries the killed replica's on the other), every stream complete."""
    import ray

    total, clients, kill_after = 100, 8, 20
    outcomes: list[tuple[int | None, str]] = []  # (status or None: no response, replica or error)
    killed: list[str] = []
    chat = {"model": "memvq", "messages": [{"role": "user", "content": QUESTION}], "stream": True}

    async def load():
        done = asyncio.Event()
        queue = iter(range(total))

        async def worker(c: httpx.AsyncClient) -> None:
            for i in queue:
                try:
                    if i % 4 == 3:
                        response = await c.post("/v1/chat/completions", json=chat)
                        complete = response.text.rstrip().endswith("data: [DONE]")
                        if response.status_code == 200 and not complete:
                            outcomes.append((None, f"stream cut: {response.text[-200:]}"))
                            continue
                    else:
                        response = await c.post("/v1/answer", json={"question": f"{QUESTION} {i}"})
                except httpx.HTTPError as error:
                    outcomes.append((None, f"{type(error).__name__}: {error}"))
                else:
                    outcomes.append((response.status_code, response.headers.get(REPLICA_HEADER) or response.text))
                if len(outcomes) == kill_after:
                    done.set()

        async def killer() -> None:
            await done.wait()
            victim = next(replica for status, replica in reversed(outcomes) if status == 200)
            await asyncio.to_thread(ray.kill, replica_actor(victim), no_restart=True)
            killed.append(victim)

        async with httpx.AsyncClient(base_url=cluster, headers={"X-API-Key": KEY}, timeout=60) as c:
            await asyncio.gather(killer(), *(worker(c) for _ in range(clients)))

    start = time.monotonic()
    asyncio.run(load())
    statuses = Counter(status for status, _ in outcomes)
    print(f"\nrun {run}: {total} requests, {clients} clients, replica {killed} killed after {kill_after}: {statuses}")
    assert len(outcomes) == total and killed
    assert statuses == {200: total}, [detail for status, detail in outcomes if status != 200]  # none lost

    # Serve starts a new replica in its place: two replicas answer again, the killed one not among them. (A new
    # connection per request: a kept-alive one may be closed by the proxy's idle timeout just as it is reused.)
    seen: set[str] = set()
    fresh = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(base_url=cluster, headers={"X-API-Key": KEY}, timeout=60, limits=fresh) as once:
        while len(seen) < 2:
            assert time.monotonic() - start < 90, f"no replacement replica: answered by {seen}"
            response = once.post("/v1/answer", json={"question": QUESTION})
            if response.status_code == 200:
                seen.add(response.headers[REPLICA_HEADER])
            time.sleep(0.1)
    assert killed[0] not in seen

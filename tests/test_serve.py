"""The query API: the dynamic batcher alone (a fake model), then the FastAPI app over the tiny store and reader."""

from __future__ import annotations

import asyncio
import threading
import time
from contextlib import contextmanager

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from memvq.pipelines.rag import RAGPipeline
from memvq.serve.app import create_app
from memvq.serve.batcher import BatcherClosedError, DynamicBatcher
from memvq.serve.settings import ServeSettings

QUESTION = "who got the first nobel prize in physics"

# -- the batcher, with a fake model --------------------------------------------------------------------------------


class FakeModel:
    """Records each call; answers `question:key`; raises on a question containing 'boom'."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls: list[tuple[list[str], object]] = []
        self.delay = delay

    def __call__(self, questions: list[str], key: object) -> list[str]:
        self.calls.append((list(questions), key))
        time.sleep(self.delay)
        if any("boom" in q for q in questions):
            raise ValueError("boom")
        return [f"{q}:{key}" for q in questions]


def run_batcher(model: FakeModel, work, **options) -> tuple[object, list[int]]:
    """Run `work(batcher)` on a fresh event loop with a started batcher; returns its result and the batch sizes."""
    sizes: list[int] = []

    async def main():
        batcher = DynamicBatcher(model, observe=lambda key, size, seconds, failed: sizes.append(size), **options)
        await batcher.start()
        try:
            return await work(batcher)
        finally:
            await batcher.stop()

    return asyncio.run(main()), sizes


def test_concurrent_submissions_become_few_batches():
    model = FakeModel()

    async def work(batcher):
        return await asyncio.gather(*(batcher.submit(f"q{i}", "k") for i in range(16)))

    done, sizes = run_batcher(model, work, max_batch_size=16, max_wait_ms=50)
    assert [d.value for d in done] == [f"q{i}:k" for i in range(16)]  # each request gets its own answer
    assert sum(sizes) == 16 and len(sizes) <= 2
    assert max(d.batch_size for d in done) >= 8


def test_batches_never_exceed_max_size_and_batching_off_is_one_by_one():
    async def work(batcher):
        return await asyncio.gather(*(batcher.submit(f"q{i}", "k") for i in range(40)))

    _, sizes = run_batcher(FakeModel(), work, max_batch_size=16, max_wait_ms=50)
    assert sum(sizes) == 40 and max(sizes) == 16 and len(sizes) == 3
    done, sizes = run_batcher(FakeModel(), work, max_batch_size=1, max_wait_ms=50)
    assert sizes == [1] * 40 and {d.batch_size for d in done} == {1}


def test_parameters_are_not_mixed_in_a_batch():
    model = FakeModel()
    keys = [("answer", 5), ("answer", 3), ("retrieve", 5)]

    async def work(batcher):
        return await asyncio.gather(*(batcher.submit(f"q{i}", keys[i % 3]) for i in range(30)))

    done, _ = run_batcher(model, work, max_batch_size=16, max_wait_ms=50)
    assert [d.value for d in done] == [f"q{i}:{keys[i % 3]}" for i in range(30)]
    assert len(model.calls) == 3  # one batch per key
    for questions, key in model.calls:
        assert {keys[int(q[1:]) % 3] for q in questions} == {key}


def test_a_failing_batch_fails_its_requests_only_and_the_worker_goes_on():
    model = FakeModel()

    async def work(batcher):
        results = await asyncio.gather(
            batcher.submit("boom", "bad"), batcher.submit("fine", "good"), return_exceptions=True
        )
        later = await batcher.submit("later", "bad")
        return results, later

    (results, later), sizes = run_batcher(model, work, max_batch_size=8, max_wait_ms=20)
    assert isinstance(results[0], ValueError) and results[1].value == "fine:good"
    assert later.value == "later:bad"
    assert sorted(sizes) == [1, 1, 1]


def test_a_lone_request_does_not_wait_when_batching_is_off_and_waits_at_most_max_wait():
    async def work(batcher):
        start = time.perf_counter()
        await batcher.submit("alone", None)
        return time.perf_counter() - start

    elapsed, _ = run_batcher(FakeModel(), work, max_batch_size=1, max_wait_ms=5000)
    assert elapsed < 1.0
    elapsed, _ = run_batcher(FakeModel(), work, max_batch_size=16, max_wait_ms=100)
    assert 0.09 < elapsed < 2.0


def test_a_stopped_batcher_refuses_work_and_wrong_result_counts_fail():
    async def main():
        batcher = DynamicBatcher(lambda questions, key: [], max_batch_size=4)
        with pytest.raises(BatcherClosedError):
            await batcher.submit("early")
        await batcher.start()
        with pytest.raises(RuntimeError, match="0 results for 1 questions"):
            await batcher.submit("q")
        await batcher.stop()
        with pytest.raises(BatcherClosedError):
            await batcher.submit("late")

    asyncio.run(main())


# -- the app over the tiny store -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rag(tiny_store, tiny_reader_path) -> RAGPipeline:
    return RAGPipeline.load(tiny_store[0], tiny_reader_path, device="cpu")


@contextmanager
def serving(pipeline, **settings):
    with TestClient(create_app(pipeline, ServeSettings(**settings))) as client:
        yield client


@pytest.fixture(scope="module")
def client(rag):
    with serving(rag, max_question_chars=200, max_top_k=10, max_batch_questions=4, max_body_bytes=4096) as client:
        yield client


def test_answer_returns_answer_provenance_and_timings(client):
    response = client.post("/v1/answer", json={"question": f"  {QUESTION} ", "top_k": 5, "rerank_k": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"question", "answer", "abstained", "provenance", "timings_ms", "batch_size"}
    assert body["abstained"] is False  # a generate reader: no confidence, never abstains
    assert body["question"] == QUESTION and isinstance(body["answer"], str)
    assert len(body["provenance"]) == 2
    first = body["provenance"][0]
    assert {"passage_id", "wikipedia_id", "title", "score"} <= set(first) and "text" not in first
    assert [p["score"] for p in body["provenance"]] == sorted((p["score"] for p in body["provenance"]), reverse=True)
    assert {"retrieve", "memory", "live", "rerank", "decode", "total", "queue"} <= set(body["timings_ms"])
    with_text = client.post("/v1/answer", json={"question": QUESTION, "return_passages": True}).json()
    assert all(isinstance(p["text"], str) and p["text"] for p in with_text["provenance"])
    assert len(with_text["provenance"]) == 3  # the reader's rerank_k


def test_an_extract_reader_answers_with_the_span_it_read(tiny_store, tiny_extract_reader_path):
    with serving(RAGPipeline.load(tiny_store[0], tiny_extract_reader_path, device="cpu")) as client:
        body = client.post("/v1/answer", json={"question": QUESTION, "return_passages": True}).json()
    span = body["answer_span"]
    [passage] = [p for p in body["provenance"] if p["passage_id"] == span["passage_id"]]
    assert passage["text"][span["start"] : span["end"]] == body["answer"] != ""


def test_batch_answers_in_order_and_retrieve_returns_passages(client):
    questions = [QUESTION, "what is the capital of france", "who wrote hamlet"]
    response = client.post("/v1/answer:batch", json={"questions": questions, "top_k": 4, "rerank_k": 2})
    assert response.status_code == 200, response.text
    answers = response.json()["answers"]
    assert [a["question"] for a in answers] == questions
    assert all(len(a["provenance"]) == 2 for a in answers) and answers[0]["batch_size"] == 3

    response = client.post("/v1/retrieve", json={"question": QUESTION, "top_k": 4})
    assert response.status_code == 200, response.text
    passages = response.json()["passages"]
    assert len(passages) == 4 and all(p["text"] for p in passages)
    assert [p["score"] for p in passages] == sorted((p["score"] for p in passages), reverse=True)
    bare = client.post("/v1/retrieve", json={"question": QUESTION, "top_k": 2, "return_passages": False}).json()
    assert [p["passage_id"] for p in bare["passages"]] == [p["passage_id"] for p in passages[:2]]
    assert "text" not in bare["passages"][0]


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/answer", {"question": ""}, "question"),
        ("/v1/answer", {"question": "   "}, "question"),
        ("/v1/answer", {"question": "x" * 201}, "question"),
        ("/v1/answer", {"question": 5}, "question"),
        ("/v1/answer", {}, "question"),
        ("/v1/answer", {"question": QUESTION, "top_k": 0}, "top_k"),
        ("/v1/answer", {"question": QUESTION, "top_k": 11}, "top_k"),
        ("/v1/answer", {"question": QUESTION, "top_k": "5"}, "top_k"),
        ("/v1/answer", {"question": QUESTION, "top_k": 2.5}, "top_k"),
        ("/v1/answer", {"question": QUESTION, "return_passages": "yes"}, "return_passages"),
        ("/v1/answer", {"question": QUESTION, "max_answer_tokens": 1000}, "max_answer_tokens"),
        ("/v1/answer", {"question": QUESTION, "topk": 5}, "topk"),
        ("/v1/answer", {"question": QUESTION, "top_k": 2, "rerank_k": 3}, "rerank_k"),
        ("/v1/answer", ["not", "an", "object"], "body"),
        ("/v1/answer:batch", {"questions": []}, "questions"),
        ("/v1/answer:batch", {"questions": [QUESTION] * 5}, "questions"),
        ("/v1/answer:batch", {"questions": [QUESTION, ""]}, "questions"),
        ("/v1/retrieve", {"question": QUESTION, "top_k": -1}, "top_k"),
    ],
)
def test_invalid_requests_get_422_with_a_json_error(client, path, body, field):
    response = client.post(path, json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request" and field in error["message"]


def test_malformed_json_unknown_paths_and_large_bodies_get_json_errors(client):
    response = client.post("/v1/answer", content=b'{"question": ', headers={"content-type": "application/json"})
    assert response.status_code == 422 and response.json()["error"]["type"] == "invalid_request"
    response = client.post("/v1/answer", content=b'{"question": "q"}')  # no Content-Type: not read as JSON
    assert response.status_code == 422 and "Content-Type: application/json" in response.json()["error"]["message"]
    response = client.get("/v1/nothing")
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found"
    response = client.post("/v1/answer/", json={"question": "q"}, headers={"host": "evil.example"})
    assert response.status_code == 404 and "location" not in response.headers  # no redirect to the client's Host
    response = client.post("/v1/answer", json={"question": "x" * 5000})
    assert response.status_code == 413 and response.json()["error"]["type"] == "payload_too_large"

    def chunks():  # no Content-Length: the limit counts the bytes as they come
        yield b'{"question": "'
        yield b"x" * 5000
        yield b'"}'

    response = client.post("/v1/answer", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert client.post("/v1/answer", json={"question": QUESTION}).status_code == 200


def test_api_key_guards_everything_but_health(rag, monkeypatch):
    with serving(rag, api_key="s3cret") as client:
        for method, path in [("post", "/v1/answer"), ("post", "/v1/retrieve"), ("get", "/metrics")]:
            for headers in [{}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}]:
                response = client.request(method, path, json={"question": QUESTION}, headers=headers)
                assert response.status_code == 401, (path, headers)
                assert response.json()["error"]["type"] == "unauthorized"
        assert client.get("/openapi.json").status_code == 401
        assert client.post("/v1/answer", content=b"{not json").status_code == 401  # before the body is read
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
        ok = client.post("/v1/answer", json={"question": QUESTION}, headers={"X-API-Key": "s3cret"})
        assert ok.status_code == 200, ok.text
        ok = client.post("/v1/retrieve", json={"question": QUESTION}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200, ok.text
        schema = client.get("/openapi.json", headers={"X-API-Key": "s3cret"}).json()
        assert schema["components"]["securitySchemes"]


def test_health_ready_openapi_and_metrics(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    schema = client.get("/openapi.json").json()
    assert {"/v1/answer", "/v1/answer:batch", "/v1/retrieve", "/healthz", "/readyz", "/metrics"} <= set(schema["paths"])
    question = schema["components"]["schemas"]["AnswerRequest"]["properties"]["question"]
    assert question["maxLength"] == 200  # the server's limits are the schema's

    client.post("/v1/answer", json={"question": QUESTION})
    client.post("/v1/answer", json={"question": ""})
    text = client.get("/metrics").text
    assert 'memvq_http_requests_total{endpoint="/v1/answer",method="POST",status="200"}' in text
    assert 'memvq_http_requests_total{endpoint="/v1/answer",method="POST",status="422"}' in text
    assert 'memvq_http_request_duration_seconds_bucket{endpoint="/v1/answer"' in text
    assert 'memvq_batch_size_bucket{le="1.0",op="answer"}' in text
    assert 'memvq_batch_size_count{op="answer"}' in text
    assert "memvq_queue_depth 0.0" in text


class FlakyPipeline:
    """The tiny pipeline, except that its next `answer` call raises."""

    def __init__(self, rag: RAGPipeline) -> None:
        self.rag = rag
        self.config = rag.config
        self.precision = rag.precision
        self.generation = rag.generation
        self.fail_next = True

    def answer(self, questions, **options):
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("CUDA out of memory (simulated)")
        return self.rag.answer(questions, **options)

    def retrieve(self, questions, options=None):
        return self.rag.retrieve(questions, options)


def test_a_model_failure_is_a_500_and_the_next_request_works(rag):
    with serving(FlakyPipeline(rag)) as client:
        response = client.post("/v1/answer", json={"question": QUESTION})
        assert response.status_code == 500
        assert response.json()["error"]["type"] == "model_error"
        again = client.post("/v1/answer", json={"question": QUESTION})
        assert again.status_code == 200, again.text
        assert client.get("/readyz").status_code == 200
        assert 'memvq_batch_failures_total{op="answer"} 1.0' in client.get("/metrics").text


def concurrent_posts(client, count: int) -> list:
    barrier = threading.Barrier(count)
    responses: list = [None] * count

    def post(i: int) -> None:
        barrier.wait()
        responses[i] = client.post("/v1/answer", json={"question": f"{QUESTION} {i}", "top_k": 4})

    threads = [threading.Thread(target=post, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return responses


def test_concurrent_requests_are_batched(rag):
    with serving(rag, max_batch_size=8, max_wait_ms=300) as client:
        responses = concurrent_posts(client, 8)
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
        assert [r.json()["question"] for r in responses] == [f"{QUESTION} {i}" for i in range(8)]
        assert max(r.json()["batch_size"] for r in responses) > 1
        text = client.get("/metrics").text
        count = next(line for line in text.splitlines() if line.startswith('memvq_batch_size_count{op="answer"}'))
        assert float(count.split()[-1]) < 8  # fewer model calls than requests
    with serving(rag, max_batch_size=1) as client:
        responses = concurrent_posts(client, 4)
        assert [r.json()["batch_size"] for r in responses] == [1, 1, 1, 1]


def test_serve_command_reports_a_missing_reader_and_wires_the_app(tiny_store, tiny_reader_path, monkeypatch, tmp_path):
    import uvicorn

    from memvq.cli import app
    from memvq.encoders import embedded

    monkeypatch.setattr(embedded, "DEFAULT_READER_DIR", tmp_path / "no-reader")
    result = CliRunner().invoke(app, ["serve", "--store", str(tiny_store[0])])
    assert result.exit_code == 2 and "embedded default reader is missing" in result.output
    result = CliRunner().invoke(app, ["serve", "--store", str(tmp_path / "nothing"), "--model", str(tiny_reader_path)])
    assert result.exit_code == 2 and "error:" in result.output

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda api, **options: calls.append((api, options)))
    monkeypatch.setenv("MEMVQ_API_KEY", "from-env")
    args = ["serve", "--store", str(tiny_store[0]), "--model", str(tiny_reader_path), "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--port", "8123", "--max-batch-size", "4", "--no-verify"])
    assert result.exit_code == 0, result.output
    [(api, options)] = calls
    settings = api.state.server.settings
    assert options["host"] == "127.0.0.1" and options["port"] == 8123
    assert settings.max_batch_size == 4 and settings.api_key.get_secret_value() == "from-env"

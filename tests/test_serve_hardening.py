"""The query API against hostile clients: abandoned and refused work, metric labels, slow clients, unparsable bodies,
client disconnects and secrets in query strings. A fake pipeline stands in for the model; the tests that need a
real connection run the app under uvicorn (with the `memvq serve` options) on a free local port."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import select
import socket
import string
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from memvq.pipelines.rag import RAGAnswer
from memvq.serve.app import create_app
from memvq.serve.batcher import DynamicBatcher, QueueFullError
from memvq.serve.runner import HeaderDeadlineProtocol, StripQueryString, serve, uvicorn_options
from memvq.serve.settings import ServeSettings


class FakePipeline:
    """Each model call takes `seconds`; every question it was given is recorded, in order."""

    config = SimpleNamespace(mode="fid", top_k=3, rerank_k=2, max_answer_tokens=8, num_beams=1, min_confidence=0.0)
    precision = "fp32"
    generation = 0

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = seconds
        self.received: list[str] = []

    def answer(self, questions, options=None):
        self.received.extend(questions)
        time.sleep(self.seconds)
        return [RAGAnswer(question=q, answer=f"answer to {q}", passages=[]) for q in questions]

    def retrieve(self, questions, options=None):
        self.received.extend(questions)
        time.sleep(self.seconds)
        return [[] for _ in questions]


@contextmanager
def live(app) -> Iterator[str]:
    """Serve `app` as `memvq serve` does, on a free local port, in a thread; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, **uvicorn_options(app, host="127.0.0.1", port=port)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=5)


def request_head(method: str, path: str, length: int) -> bytes:
    return (
        f"{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """The status, headers and body of one response on a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    while len(body) < int(headers.get("content-length", 0)):
        body += sock.recv(65536)
    return int(status_line.split()[1]), headers, body


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed the connection (reads what is left of a response first)."""
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def series(text: str) -> set[str]:
    """The metric series (name and labels) of a Prometheus text page."""
    return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}


# -- 1, 5. abandoned and refused work does not run; a client that went away is a 499 -------------------------------


def test_a_cancelled_submission_is_withdrawn_before_it_runs():
    calls: list[list[str]] = []

    def model(questions, key):
        calls.append(list(questions))
        time.sleep(0.2)
        return questions

    async def main():
        batcher = DynamicBatcher(model, max_batch_size=2, max_wait_ms=0)
        await batcher.start()
        try:
            running = asyncio.ensure_future(batcher.submit("first"))
            await asyncio.sleep(0.05)  # the model is busy with "first"
            abandoned = asyncio.ensure_future(batcher.submit_many(["a", "b", "c"]))
            await asyncio.sleep(0.01)
            assert batcher.pending == 3
            abandoned.cancel()
            await asyncio.wait([abandoned])
            assert batcher.pending == 0
            assert (await running).value == "first"
            assert (await batcher.submit("next")).value == "next"
        finally:
            await batcher.stop()

    asyncio.run(main())
    assert calls == [["first"], ["next"]]


def test_a_refused_submission_queues_none_of_its_questions():
    async def main():
        batcher = DynamicBatcher(lambda questions, key: questions, max_batch_size=4, max_queue=8)
        await batcher.start()
        try:
            with pytest.raises(QueueFullError):
                await batcher.submit_many([f"q{i}" for i in range(9)])
            assert batcher.pending == 0
            return await batcher.submit_many([f"q{i}" for i in range(8)])
        finally:
            await batcher.stop()

    assert len(asyncio.run(main())) == 8


def test_a_refused_batch_request_leaves_nothing_running():
    pipeline = FakePipeline(seconds=0.05)
    with TestClient(create_app(pipeline, ServeSettings(max_queue=8, max_batch_size=4))) as client:
        response = client.post("/v1/answer:batch", json={"questions": [f"q{i}" for i in range(10)]})
        assert response.status_code == 503 and response.json()["error"]["type"] == "overloaded"
        time.sleep(0.3)
        assert pipeline.received == []
        response = client.post("/v1/answer:batch", json={"questions": [f"q{i}" for i in range(8)]})
        assert response.status_code == 200 and len(pipeline.received) == 8


def test_a_client_that_disconnects_leaves_no_work_behind_and_counts_as_499():
    pipeline = FakePipeline(seconds=0.3)  # per model call of up to 8 questions: 64 questions are 8 calls
    app = create_app(pipeline, ServeSettings(max_batch_size=8, max_wait_ms=0))
    with live(app) as url:
        body = json.dumps({"questions": [f"q{i}" for i in range(64)]}).encode()
        with connect(url) as gone:
            gone.sendall(request_head("POST", "/v1/answer:batch", len(body)) + body)
            deadline = time.monotonic() + 5
            while not pipeline.received:  # its first model call started
                assert time.monotonic() < deadline
                time.sleep(0.01)
        with connect(url) as gone_mid_body:  # and one that leaves before sending its whole body
            gone_mid_body.sendall(request_head("POST", "/v1/answer", 100) + b'{"question": ')
            time.sleep(0.05)

        start = time.perf_counter()
        response = httpx.post(f"{url}/v1/answer", json={"question": "next"}, timeout=10)
        elapsed = time.perf_counter() - start
        assert response.status_code == 200, response.text
        assert elapsed < 1.2  # the running call and its own, not the 7 abandoned calls (2.1 s)
        assert pipeline.received == [*(f"q{i}" for i in range(8)), "next"]

        text = httpx.get(f"{url}/metrics", timeout=5).text
    assert 'memvq_http_requests_total{endpoint="/v1/answer:batch",method="POST",status="499"} 1.0' in text
    assert 'memvq_http_requests_total{endpoint="/v1/answer",method="POST",status="499"} 1.0' in text
    assert 'status="500"' not in text


# -- 2. metric labels stay bounded ---------------------------------------------------------------------------------


def test_made_up_methods_and_paths_do_not_grow_the_metrics():
    key = {"X-API-Key": "k"}
    rng = random.Random(0)
    with TestClient(create_app(FakePipeline(), ServeSettings(api_key="k"))) as client:
        assert client.request("BREW", "/nowhere").status_code == 401
        client.get("/metrics", headers=key)
        before = client.get("/metrics", headers=key).text
        for _ in range(1000):
            method = "".join(rng.choices(string.ascii_uppercase, k=rng.randint(3, 12)))
            path = "/" + "".join(rng.choices(string.ascii_lowercase, k=8))
            assert client.request(method, path).status_code == 401
        after = client.get("/metrics", headers=key).text
    assert series(after) == series(before)
    assert 'memvq_http_requests_total{endpoint="other",method="other",status="401"} 1001.0' in after


# -- 3. slow clients are cut off -----------------------------------------------------------------------------------


def test_slow_request_headers_are_closed_after_the_header_timeout():
    app = create_app(FakePipeline(), ServeSettings(header_timeout_s=0.5))
    with live(app) as url, connect(url) as silent, connect(url) as half, connect(url) as kept_alive:
        start = time.perf_counter()
        half.sendall(b"POST /v1/ans")
        kept_alive.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        assert read_response(kept_alive)[0] == 200
        kept_alive.sendall(b"GET /heal")  # a later request on the kept-alive connection, as slow
        for sock in (silent, half, kept_alive):
            assert closed_by_server(sock)
        assert 0.4 < time.perf_counter() - start < 3.0  # not uvicorn's keep-alive timeout (5 s)
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200


def test_a_trickling_body_gets_408_and_the_connection_is_closed():
    pipeline = FakePipeline()
    app = create_app(pipeline, ServeSettings(body_timeout_s=0.5))
    with live(app) as url, connect(url) as slow:
        body = json.dumps({"question": "slow " * 10}).encode()
        slow.sendall(request_head("POST", "/v1/answer", len(body)))
        start = time.perf_counter()
        for byte in body:  # a byte every 0.2 s: each in time, the whole body not
            if select.select([slow], [], [], 0.2)[0]:
                break
            slow.sendall(bytes([byte]))
        status, headers, answer = read_response(slow)
        assert status == 408 and json.loads(answer)["error"]["type"] == "request_timeout"
        assert headers["connection"] == "close" and closed_by_server(slow)
        assert time.perf_counter() - start < 2.0
        assert pipeline.received == []


# -- 4. unparsable bodies are invalid requests ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"question": "\xff\xfe"}', "UTF-8"),
        (b"[" * 100_000, "nested"),
        (b'{"question": "q", "top_k": ' + b"9" * 5_000 + b"}", "number too long"),
    ],
)
def test_non_utf8_deeply_nested_and_overlong_number_json_get_422(body, reason):
    with TestClient(create_app(FakePipeline())) as client:
        response = client.post("/v1/answer", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request" and reason in error["message"]


# -- 6. no secrets from query strings in the logs; how `memvq serve` runs uvicorn ----------------------------------


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_the_access_log_leaves_out_query_strings(caplog):
    caplog.set_level(logging.DEBUG)
    captured = Captured()
    app = create_app(FakePipeline(), ServeSettings(api_key="k"))
    with live(app) as url:
        loggers = [logging.getLogger(name) for name in ("uvicorn.access", "uvicorn.error")]
        for logger in loggers:
            logger.addHandler(captured)
        try:
            assert httpx.get(f"{url}/healthz?api_key=SECRET", timeout=5).status_code == 200
            assert httpx.post(f"{url}/v1/answer?api_key=SECRET", json={"question": "q"}, timeout=5).status_code == 401
        finally:
            for logger in loggers:
                logger.removeHandler(captured)
    server_records = [record for record in caplog.records if not record.name.startswith(("httpx", "httpcore"))]
    lines = captured.lines + [record.getMessage() for record in server_records]
    assert any("GET /healthz HTTP/1.1" in line for line in lines), lines
    assert any("POST /v1/answer HTTP/1.1" in line for line in lines), lines
    assert not any("SECRET" in line for line in lines), lines


def test_serve_runs_uvicorn_with_the_header_deadline_and_the_filtered_access_log(monkeypatch):
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: calls.append((app, options)))
    app = create_app(FakePipeline(), ServeSettings(header_timeout_s=3.0))
    serve(app, host="127.0.0.1", port=8123, access_log=False)
    [(served, options)] = calls
    assert served is app and (options["host"], options["port"], options["access_log"]) == ("127.0.0.1", 8123, False)
    assert options["http"].func is HeaderDeadlineProtocol and options["http"].keywords == {"header_timeout_s": 3.0}
    log_config = options["log_config"]
    assert log_config["filters"]["strip_query_string"]["()"] is StripQueryString
    assert log_config["loggers"]["uvicorn.access"]["filters"] == ["strip_query_string"]

"""The OpenAI-compatible routes, asked with OpenAI's own Python client over HTTP (the app under uvicorn, as
`memvq serve` runs it): answers with sources and provenance, streaming, the key, limits and OpenAI-shaped errors,
and the batcher behind them. A fake pipeline answers (deterministic, with an answer span)."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
from test_serve_hardening import live

from memvq.encoders.config import ReaderConfig
from memvq.encoders.spans import AnswerSpan
from memvq.pipelines.rag import RAGAnswer
from memvq.retrieval.retriever import RetrievedPassage
from memvq.serve.app import create_app
from memvq.serve.settings import ServeSettings

QUESTION = "who got the first nobel prize in physics"
TEXT = "The first Nobel Prize in Physics was awarded in 1901 to Wilhelm Conrad Röntgen, of Germany."
ANSWER = "Wilhelm Conrad Röntgen"
PASSAGES = [
    RetrievedPassage(0, "12-0", "12", "List of Nobel laureates in Physics", 1, 1, 0.9, TEXT),
    RetrievedPassage(7, "40-2", "40", "Wilhelm Röntgen", 3, 4, 0.4, "Röntgen was a German physicist."),
]
SOURCES = "\n\nSources:\n[1] List of Nobel laureates in Physics (12-0)\n[2] Wilhelm Röntgen (40-2)"
KEY = "s3cret"


class FakePipeline:
    """Answers every question with ANSWER, a span of the first of PASSAGES; records each model call's questions."""

    config = ReaderConfig(mode="fid", head="extract", top_k=2, rerank_k=2)
    precision = "fp32"
    generation = 0

    def __init__(self, seconds: float = 0.0, span_passage: int = 0) -> None:
        self.seconds = seconds
        self.span_passage = span_passage
        self.calls: list[list[str]] = []

    def answer(self, questions, options=None):
        self.calls.append(list(questions))
        time.sleep(self.seconds)
        start = TEXT.index(ANSWER)
        span = AnswerSpan(ANSWER, self.span_passage, start, start + len(ANSWER), 0.0)
        return [RAGAnswer(q, ANSWER, PASSAGES, {"retrieve": 1.0, "decode": 2.0, "total": 3.0}, span) for q in questions]

    def retrieve(self, questions, options=None):
        return [PASSAGES for _ in questions]


@pytest.fixture(scope="module")
def pipeline():
    return FakePipeline()


@pytest.fixture(scope="module")
def url(pipeline):
    settings = ServeSettings(api_key=KEY, max_question_chars=200, max_body_bytes=4096, max_wait_ms=100)
    app = create_app(pipeline, settings)
    with live(app) as url:
        yield url


def client(url: str, key: str = KEY, **options) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, **options)


def test_a_chat_completion_answers_the_last_user_message_with_sources_and_provenance(url, pipeline):
    ai = client(url)
    [model] = ai.models.list().data
    assert model.id == "memvq-fid-extract" and model.owned_by == "memvq" and model.precision == "fp32"
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "an earlier question"},
        {"role": "assistant", "content": "an earlier answer"},
        {"role": "user", "content": [{"type": "text", "text": QUESTION}]},
    ]
    completion = ai.chat.completions.create(model="anything", messages=messages, temperature=0.3, max_tokens=5)
    assert pipeline.calls[-1] == [QUESTION]  # the earlier messages are not asked
    assert completion.object == "chat.completion" and completion.model == "memvq-fid-extract"
    [choice] = completion.choices
    assert choice.message.role == "assistant" and choice.finish_reason == "stop"
    assert choice.message.content == ANSWER + SOURCES
    memvq = completion.model_extra["memvq"]
    assert memvq["answer"] == ANSWER and memvq["answer_span"]["passage_id"] == "12-0"
    assert [p["passage_id"] for p in memvq["provenance"]] == ["12-0", "40-2"]
    assert "text" not in memvq["provenance"][0] and {"retrieve", "queue"} <= set(memvq["timings_ms"])

    extended = ai.chat.completions.create(
        model="anything", messages=[{"role": "user", "content": QUESTION}], extra_body={"return_passages": True}
    )
    span = extended.model_extra["memvq"]["answer_span"]
    assert extended.model_extra["memvq"]["provenance"][0]["text"][span["start"] : span["end"]] == ANSWER


def test_a_streamed_completion_sends_the_same_content_as_events(url):
    ai = client(url)
    chunks = list(ai.chat.completions.create(model="x", messages=[{"role": "user", "content": QUESTION}], stream=True))
    assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == ANSWER + SOURCES
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].model_extra["memvq"]["answer"] == ANSWER

    with httpx.stream(
        "POST",
        f"{url}/v1/chat/completions",
        json={"model": "x", "messages": [{"role": "user", "content": QUESTION}], "stream": True},
        headers={"Authorization": f"Bearer {KEY}"},
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


def test_a_wrong_key_is_an_openai_authentication_error(url):
    for call in (
        lambda ai: ai.models.list(),
        lambda ai: ai.chat.completions.create(model="x", messages=[{"role": "user", "content": QUESTION}]),
    ):
        with pytest.raises(openai.AuthenticationError) as raised:
            call(client(url, key="wrong"))
        assert raised.value.status_code == 401
        assert raised.value.type == "authentication_error" and raised.value.code == "unauthorized"
        assert "API key" in raised.value.body["message"]


def test_an_over_long_question_is_refused_in_openai_shape_before_the_model(url, pipeline):
    calls = len(pipeline.calls)
    ai = client(url)
    with pytest.raises(openai.UnprocessableEntityError) as raised:
        ai.chat.completions.create(model="x", messages=[{"role": "user", "content": "x" * 201}])
    error = raised.value
    assert error.status_code == 422 and set(error.body) == {"message", "type", "param", "code"}
    assert error.type == "invalid_request_error" and error.code == "invalid_request"
    assert error.param == "messages.0.content" and "at most 200 characters" in error.body["message"]
    for messages in ([], [{"role": "system", "content": QUESTION}], [{"role": "user", "content": "   "}]):
        with pytest.raises(openai.UnprocessableEntityError):
            ai.chat.completions.create(model="x", messages=messages)
    assert len(pipeline.calls) == calls


def test_errors_in_openai_shape_on_these_routes_only(url):
    headers = {"X-API-Key": KEY}
    body = {"model": "x", "messages": [{"role": "user", "content": "x" * 5000}]}
    too_large = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers)
    assert too_large.status_code == 413
    assert too_large.json() == {
        "error": {
            "message": "request body over 4096 bytes",
            "type": "invalid_request_error",
            "param": None,
            "code": "payload_too_large",
        }
    }
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}
    refused = httpx.post(f"{url}/v1/chat/completions", json={"model": "x", "messages": [image]}, headers=headers)
    assert refused.status_code == 422 and refused.json()["error"]["param"].startswith("messages.0.content")
    native = httpx.post(f"{url}/v1/answer", json={"question": ""}, headers=headers)
    assert native.status_code == 422 and native.json()["error"]["type"] == "invalid_request"


def test_a_bug_past_the_model_is_an_openai_server_error():
    app = create_app(FakePipeline(span_passage=5))  # a span in a passage not read: a bug
    with live(app) as url, pytest.raises(openai.InternalServerError) as raised:
        client(url).chat.completions.create(model="x", messages=[{"role": "user", "content": QUESTION}])
    assert raised.value.body == {
        "message": "internal server error",
        "type": "server_error",
        "param": None,
        "code": "internal_error",
    }


def test_chat_requests_go_through_the_batcher_and_its_metrics(url, pipeline):
    results: list[str | None] = [None] * 6
    barrier = threading.Barrier(6)

    def ask(i: int) -> None:
        barrier.wait()
        completion = client(url).chat.completions.create(model="x", messages=[{"role": "user", "content": f"q{i}"}])
        results[i] = completion.model_extra["memvq"]["question"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [f"q{i}" for i in range(6)]
    assert max(len(call) for call in pipeline.calls) > 1  # batched together
    assert httpx.get(f"{url}/v1/models").status_code == 401
    text = httpx.get(f"{url}/metrics", headers={"X-API-Key": KEY}).text
    assert 'memvq_http_requests_total{endpoint="/v1/chat/completions",method="POST",status="200"}' in text
    assert 'memvq_http_requests_total{endpoint="/v1/models",method="GET",status="401"}' in text


def test_a_client_that_goes_away_withdraws_its_question():
    pipeline = FakePipeline(seconds=0.5)
    with live(create_app(pipeline, ServeSettings(max_batch_size=1, max_wait_ms=0))) as url:
        first = threading.Thread(
            target=lambda: client(url).chat.completions.create(model="x", messages=[{"role": "user", "content": "a"}])
        )
        first.start()
        while not pipeline.calls:  # the model runs "a"
            time.sleep(0.01)
        with pytest.raises(openai.APITimeoutError):  # "b" waits behind it, and its client leaves
            client(url, timeout=0.1).chat.completions.create(model="x", messages=[{"role": "user", "content": "b"}])
        first.join()
        client(url).chat.completions.create(model="x", messages=[{"role": "user", "content": "c"}])
    assert pipeline.calls == [["a"], ["c"]]

"""Answer confidence: the selective-answering scores, the calibration fit and its file, abstaining through the
pipeline, the eval report, the API and the OpenAI route; on the real default reader, a confident answer to the demo
question and abstentions where the demo store holds no page for the question."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from memvq.data.kilt.selective import (
    at_threshold,
    auroc,
    expected_calibration_error,
    risk_coverage,
    selective_scores,
)
from memvq.encoders.options import QueryOptions
from memvq.encoders.reader_io import reader_weights_sha256
from memvq.pipelines.calibrate import CalibrateSettings, calibrate, threshold_for
from memvq.pipelines.confidence import (
    CALIBRATION_FILE,
    Calibration,
    Evidence,
    fit_calibration,
    load_calibration,
    save_calibration,
)
from memvq.pipelines.evaluate import EvalSettings, evaluate
from memvq.pipelines.rag import RAGPipeline
from memvq.serve.app import create_app
from memvq.serve.openai_api import NOT_FOUND
from memvq.serve.settings import ServeSettings

QUESTION = "who got the first nobel prize in physics"


def test_auroc_ece_thresholds_and_risk_coverage_on_known_values():
    assert auroc([0.9, 0.8, 0.2, 0.1], [True, True, False, False]) == 1.0
    assert auroc([0.1, 0.2, 0.8, 0.9], [True, True, False, False]) == 0.0
    assert auroc([0.5, 0.5], [True, False]) == 0.5
    assert auroc([0.5, 0.6], [True, True]) is None
    # two bins: 0.95 (right, right) and 0.15 (wrong, right): |0.95 - 1| x 0.5 + |0.15 - 0.5| x 0.5
    ece = expected_calibration_error([0.95, 0.95, 0.15, 0.15], [True, True, False, True])
    assert ece == pytest.approx(0.025 + 0.175)
    row = at_threshold([0.9, 0.7, 0.4, 0.2], [True, False, True, False], 0.5)
    assert row == {
        "threshold": 0.5,
        "coverage": 0.5,
        "accuracy_answered": 0.5,
        "right_kept": 0.5,
        "wrong_removed": 0.5,
    }
    curve = risk_coverage([0.2, 0.9, 0.5], [False, True, True])
    assert np.allclose(curve, [(1 / 3, 0.0), (2 / 3, 0.0), (1.0, 1 / 3)])
    scores = selective_scores([0.9, 0.7, 0.4, 0.2], [True, False, True, False], [False, False, True, True])
    assert scores["abstain_rate"] == 0.5 and scores["right_kept"] == 0.5 and scores["wrong_removed"] == 0.5
    assert len(scores["thresholds"]) == 9 and scores["risk_coverage"][-1] == [1.0, 0.5]


def _synthetic(n: int, seed: int = 0) -> tuple[list[Evidence], list[bool]]:
    """Answers whose chance of being right rises with the answer's log-probability and the retrieval score."""
    rng = np.random.default_rng(seed)
    answer, no_answer, retrieval = rng.normal(-1.5, 1.0, n), rng.normal(-4, 1.0, n), rng.normal(0.5, 0.15, n)
    p_right = 1 / (1 + np.exp(-(1.5 * answer + 6 * (retrieval - 0.5) + 1.0)))
    right = rng.random(n) < p_right
    runner_up, support = answer - rng.exponential(2.0, n), rng.integers(1, 4, n)
    rows = zip(answer, runner_up, support, no_answer, retrieval, strict=True)
    return [Evidence(float(a), float(u), int(s), float(o), float(r)) for a, u, s, o, r in rows], right.tolist()


def test_a_fitted_calibration_is_calibrated_on_new_answers_of_the_same_kind():
    evidence, right = _synthetic(4000)
    calibration = fit_calibration(evidence, right)
    assert calibration.weights[0] > 0 and calibration.weights[4] > 0  # more probable / better retrieved: more right
    test_evidence, test_right = _synthetic(4000, seed=1)
    fitted = [calibration.confidence(e) for e in test_evidence]
    raw = [e.raw_confidence() for e in test_evidence]
    assert expected_calibration_error(fitted, test_right) < 0.03 < expected_calibration_error(raw, test_right)
    assert auroc(fitted, test_right) > 0.8
    with pytest.raises(ValueError, match="both right and wrong"):
        fit_calibration(evidence[:3], [True, True, True])


def test_the_threshold_rule_keeps_the_share_of_right_answers_asked():
    confidence = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05]
    right = [True, True, False, True, True, False, True, True, True, True]  # 8 right
    threshold = threshold_for(confidence, right, 0.75)  # keep 6 of the 8: the 6th right one is at 0.2
    assert threshold == 0.2
    kept = sum(ok and c >= threshold for c, ok in zip(confidence, right, strict=True))
    assert kept == 6


def test_a_calibration_file_round_trips_and_is_ignored_for_other_weights(tmp_path, caplog):
    calibration = Calibration((0.5, 0.1, 0.2, -0.25, 2.0), -0.3, min_confidence=0.4)
    save_calibration(tmp_path, calibration, {"keep_right": 0.9}, {"reader_sha256": "a" * 64, "questions": 10})
    assert load_calibration(tmp_path, "a" * 64) == calibration
    assert load_calibration(tmp_path) == calibration
    assert load_calibration(tmp_path, "b" * 64) is None
    assert "fitted for other reader weights" in caplog.text
    assert load_calibration(tmp_path / "none") is None


@pytest.fixture(scope="module")
def calibrated_reader(tiny_extract_reader_path, tmp_path_factory) -> Path:
    """A copy of the tiny extract reader with a calibration whose default threshold is 0.5 (confidence grows with
    the answer's log-probability only)."""
    path = tmp_path_factory.mktemp("readers") / "calibrated"
    shutil.copytree(tiny_extract_reader_path, path)
    fit = {"reader_sha256": reader_weights_sha256(path)}
    save_calibration(path, Calibration((1.0, 0.0, 0.0, 0.0, 0.0), 0.0, min_confidence=0.5), {}, fit)
    return path


def test_answers_carry_a_confidence_and_abstain_below_min_confidence(tiny_store, calibrated_reader):
    rag = RAGPipeline.load(tiny_store[0], calibrated_reader, device="cpu")
    assert rag.config.min_confidence == 0.5  # the calibration's default threshold
    [always] = rag.answer([QUESTION], QueryOptions(min_confidence=0.0))
    assert always.confidence == pytest.approx(1 / (1 + np.exp(-always.evidence.answer_log_prob)))
    assert not always.abstained and always.given == always.answer != ""
    [never] = rag.answer([QUESTION], QueryOptions(min_confidence=1.0))
    assert never.abstained and never.given is None and never.answer == always.answer
    assert never.passages == always.passages  # the passages looked at are still returned
    output = never.kilt_output()
    assert output["answer"] == "" and output["candidate"] == always.answer and output["abstained"] is True
    assert "answer_span" in output["provenance"][never.span.passage]
    [default] = rag.answer([QUESTION])
    assert default.abstained == (default.confidence < 0.5)


def test_a_generate_reader_has_no_confidence_and_never_abstains(tiny_store, tiny_reader_path):
    [result] = RAGPipeline.load(tiny_store[0], tiny_reader_path, device="cpu").answer(
        [QUESTION], QueryOptions(min_confidence=1.0)
    )
    assert result.confidence is None and not result.abstained
    assert "confidence" not in result.kilt_output()


def test_eval_reports_confidence_scores_and_writes_the_risk_coverage_curve(
    tiny_store, calibrated_reader, shared_data, tmp_path
):
    data = tmp_path / "nq-dev-kilt.jsonl"
    with open(shared_data / "nq_open_oracle" / "nq-oracle-dev-kilt.jsonl") as source:
        data.write_text("".join(line for _, line in zip(range(8), source, strict=False)))
    rag = RAGPipeline.load(tiny_store[0], calibrated_reader, device="cpu")
    settings = EvalSettings(batch_size=4, query=QueryOptions(top_k=4, rerank_k=2, min_confidence=0.5))
    report = evaluate(rag, [data], tmp_path / "eval", settings, progress=False)
    selective = report["tasks"]["nq"]["selective"]
    predictions = [json.loads(line) for line in (tmp_path / "eval" / "nq-predictions.jsonl").open()]
    abstained = [p["output"][0]["abstained"] for p in predictions]
    assert selective["questions"] == 8 and selective["abstain_rate"] == sum(abstained) / 8
    assert all(p["output"][0]["answer"] == "" for p in predictions if p["output"][0]["abstained"])
    svg = (tmp_path / "eval" / "nq-risk-coverage.svg").read_text()
    assert svg.startswith("<svg") and "<polyline" in svg
    assert "AUROC" in (tmp_path / "eval" / "report.md").read_text()


def test_the_api_and_the_openai_route_say_when_it_abstained(tiny_store, calibrated_reader):
    rag = RAGPipeline.load(tiny_store[0], calibrated_reader, device="cpu")
    with TestClient(create_app(rag, ServeSettings())) as client:
        body = client.post("/v1/answer", json={"question": QUESTION, "min_confidence": 1.0}).json()
        assert body["answer"] is None and body["abstained"] is True and 0 <= body["confidence"] < 1
        assert "answer_span" not in body and len(body["provenance"]) == 3
        answered = client.post("/v1/answer", json={"question": QUESTION, "min_confidence": 0}).json()
        assert answered["answer"] and answered["abstained"] is False
        assert answered["confidence"] == pytest.approx(body["confidence"])
        refused = client.post("/v1/answer", json={"question": QUESTION, "min_confidence": 1.5})
        assert refused.status_code == 422
        chat = {"model": "memvq", "messages": [{"role": "user", "content": QUESTION}]}
        completion = client.post("/v1/chat/completions", json=chat).json()
    memvq = completion["memvq"]
    content = completion["choices"][0]["message"]["content"]
    if memvq["abstained"]:  # the reader's default threshold (0.5) decides
        assert content.startswith(NOT_FOUND) and "Passages looked at:" in content
    else:
        assert content.startswith(memvq["answer"]) and "Sources:" in content


def test_calibrate_fits_on_questions_half_of_them_without_their_pages(tiny_store, tiny_extract_reader_path, tmp_path):
    rag = RAGPipeline.load(tiny_store[0], tiny_extract_reader_path, device="cpu")
    records = []
    for i, (question, title) in enumerate(
        [(QUESTION, "List of Nobel laureates in Physics")] * 6 + [("who wrote hamlet", "Hamlet")] * 6
    ):
        gold = "Wilhelm Conrad Röntgen" if i < 6 and i % 3 else "nobody at all"
        output = [{"answer": gold}, {"provenance": [{"wikipedia_id": title}]}]
        records.append({"id": str(i), "input": question, "output": output})
    data = tmp_path / "cal.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    # the tiny untrained reader is wrong everywhere: no fit possible, and the error says why
    with pytest.raises(ValueError, match="both right and wrong"):
        calibrate(rag, [data], CalibrateSettings(query=QueryOptions(top_k=4, rerank_k=2)), progress=False)
    hidden = rag.retriever.search([QUESTION], 8)[0]
    from memvq.pipelines.calibrate import retrieve_without

    [without] = retrieve_without(rag, [QUESTION], [{hidden[0].wikipedia_id}], 4)
    assert len(without) == 4 and hidden[0].wikipedia_id not in {p.wikipedia_id for p in without}


# -- the shipped default reader and its calibration, over the demo store (real MiniLM, real pages) -------------------


@pytest.mark.slow
def test_the_default_answers_the_demo_question_confidently_and_abstains_without_support(
    shared_data, demo_store, mini_corpus, tmp_path
):
    from memvq.encoders.embedded import default_reader_path
    from memvq.pipelines.build import build_index
    from memvq.pipelines.config import BuildConfig

    assert (default_reader_path() / CALIBRATION_FILE).is_file()
    rag = RAGPipeline.load(demo_store, device="cpu")
    threshold = rag.config.min_confidence
    assert 0 < threshold < 1
    demo, hamlet, swallow = rag.answer(
        [QUESTION, "who wrote hamlet", "what is the airspeed velocity of an unladen swallow on mars"]
    )
    assert demo.answer == "Wilhelm Conrad Röntgen" and not demo.abstained and demo.confidence >= 0.8
    assert hamlet.abstained and swallow.abstained  # no page of the 40 holds an answer
    # the same store without the Nobel page: the demo question has no support left
    lines = mini_corpus.read_text().splitlines(keepends=True)
    assert json.loads(lines[0])["wikipedia_id"] == "List of Nobel laureates in Physics"
    corpus = tmp_path / "without-nobel.jsonl"
    corpus.write_text("".join(lines[1:]))
    store = tmp_path / "store"
    build_index(corpus, store, BuildConfig.model_validate({"shard_size": 64, "memory": False}))
    [unsupported] = RAGPipeline.load(store, device="cpu").answer([QUESTION])
    assert unsupported.abstained, (unsupported.answer, unsupported.confidence)

"""`memvq eval` over a few NQ questions with the tiny store and reader: predictions, report, resume, scoring, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import gold_to_guess
from typer.testing import CliRunner

from memvq.cli import app
from memvq.data.kilt import records as kilt_data
from memvq.data.kilt.records import read_kilt_file, task_names
from memvq.encoders.options import QueryOptions
from memvq.pipelines.evaluate import EvalConfigError, EvalSettings, evaluate, pair_predictions, score_predictions
from memvq.pipelines.rag import RAGPipeline
from memvq.pipelines.timing import QUERY_STAGES as STAGES

NUM_QUESTIONS = 6
DOWNSTREAM = {"accuracy", "em", "f1", "rougel"}
KILT = {"KILT-accuracy", "KILT-em", "KILT-f1", "KILT-rougel"}
RETRIEVAL = {"Rprec", "precision@1", "precision@5", "recall@5", "success_rate@5", "answer_in_context@5"}


@pytest.fixture(scope="module")
def nq_file(shared_data, tmp_path_factory) -> Path:
    """The first few records of the shared NQ dev set, in a file named as KILT names them (task nq)."""
    path = tmp_path_factory.mktemp("nq") / "nq-dev-kilt.jsonl"
    with open(shared_data / "nq_open_oracle" / "nq-oracle-dev-kilt.jsonl") as source:
        path.write_text("".join(line for _, line in zip(range(NUM_QUESTIONS), source, strict=False)))
    return path


@pytest.fixture(scope="module")
def rag(tiny_store, tiny_reader_path) -> RAGPipeline:
    return RAGPipeline.load(tiny_store[0], tiny_reader_path, device="cpu", verify=False)


SETTINGS = EvalSettings(batch_size=2, query=QueryOptions(top_k=4, rerank_k=2, max_answer_tokens=3))


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_eval_writes_valid_predictions_and_a_report(rag, nq_file, tiny_reader_path, tmp_path):
    out = tmp_path / "eval"
    report = evaluate(rag, [nq_file], out, SETTINGS, model_path=tiny_reader_path, progress=False)

    predictions = out / "nq-predictions.jsonl"
    gold, guess = kilt_data.load_kilt(nq_file), kilt_data.load_kilt(predictions)
    kilt_data.validate_predictions(gold, guess, mode="both", allow_extra=False)
    assert [g["id"] for g in guess] == [r["id"] for r in gold]
    for record in guess:
        [output] = record["output"]
        assert isinstance(output["answer"], str)
        assert len(output["provenance"]) == 2  # the rerank_k passages read
        assert {"wikipedia_id", "title", "start_paragraph_id", "end_paragraph_id", "score", "text"} <= set(
            output["provenance"][0]
        )

    task = report["tasks"]["nq"]
    assert task["questions"] == task["scored"] == task["predicted_this_run"] == NUM_QUESTIONS
    assert task["bad_records"] == 0
    metrics = task["metrics"]
    assert set(metrics["downstream"]) == DOWNSTREAM and set(metrics["kilt"]) == KILT
    assert set(metrics["retrieval"]) >= RETRIEVAL
    assert all(0.0 <= v <= 1.0 for part in metrics.values() for v in part.values())
    timing = task["timing"]
    assert timing["questions_timed"] == NUM_QUESTIONS and timing["batches"] == 3
    assert timing["queries_per_second"] > 0
    assert set(STAGES) | {"total"} == set(timing["ms_per_question"])
    assert timing["ms_per_question"]["total"] >= timing["ms_per_question"]["retrieve"] > 0

    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["tasks"]["nq"]["metrics"] == metrics
    assert on_disk["config"]["query"]["top_k"] == 4 and on_disk["config"]["ks"] == [1, 5]
    assert on_disk["store"]["num_passages"] == rag.store.num_passages
    assert on_disk["model"]["path"] == str(tiny_reader_path) and on_disk["model"]["mode"] == "glimmer"
    assert on_disk["model"]["precision"] == rag.precision
    assert on_disk["device"]["device"] == "cpu"
    assert (on_disk["format"], on_disk["version"], list(on_disk["files"])) == (
        "memvq-eval-report",
        2,
        ["nq-predictions.jsonl"],
    )
    markdown = (out / "report.md").read_text()
    for text in ("## nq", "| EM |", "| KILT-EM |", "| R-precision |", "| recall@5 |", "| retrieve |", "queries/s"):
        assert text in markdown
    assert "top_k=4, rerank_k=2, max_answer_tokens=3, num_beams=None" in markdown  # the query knobs one by one


def test_resume_predicts_only_what_is_missing(rag, nq_file, tmp_path):
    out = tmp_path / "eval"
    first = evaluate(rag, [nq_file], out, SETTINGS.model_copy(update={"limit": 3}), progress=False)
    assert first["tasks"]["nq"]["questions"] == 3 and first["tasks"]["nq"]["scored"] == 3
    predictions = out / "nq-predictions.jsonl"
    head = _lines(predictions)
    assert len(head) == 3

    with predictions.open("a") as torn:  # an interrupted write leaves a partial last line
        torn.write('{"id": "nqo-db34')
    second = evaluate(rag, [nq_file], out, SETTINGS, progress=False)
    lines = _lines(predictions)
    assert len(lines) == NUM_QUESTIONS and lines[:3] == head
    ids = [json.loads(line)["id"] for line in lines]
    assert len(set(ids)) == NUM_QUESTIONS
    task = second["tasks"]["nq"]
    assert task["predicted_this_run"] == NUM_QUESTIONS - 3
    assert task["timing"]["questions_timed"] == NUM_QUESTIONS  # timings add up over the runs

    third = evaluate(rag, [nq_file], out, SETTINGS, progress=False)  # finished: nothing rerun
    assert third["tasks"]["nq"]["predicted_this_run"] == 0
    assert _lines(predictions) == lines
    assert third["tasks"]["nq"]["metrics"] == task["metrics"]

    with pytest.raises(EvalConfigError, match="settings"):  # other decoding settings would mix predictions
        other = SETTINGS.model_copy(update={"query": SETTINGS.query.model_copy(update={"top_k": 5})})
        evaluate(rag, [nq_file], out, other, progress=False)


def test_a_resume_predicts_again_a_question_whose_text_changed(rag, nq_file, tmp_path, caplog):
    data = tmp_path / "data" / "nq-dev-kilt.jsonl"
    data.parent.mkdir()
    data.write_text(nq_file.read_text())
    out = tmp_path / "eval"
    evaluate(rag, [data], out, SETTINGS, progress=False)
    predictions = out / "nq-predictions.jsonl"
    before = _lines(predictions)
    records = [json.loads(line) for line in data.read_text().splitlines()]
    records[1]["input"] = "who wrote the theory of relativity"
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    with caplog.at_level("WARNING", logger="memvq.pipelines.evaluate"):
        report = evaluate(rag, [data], out, SETTINGS, progress=False)
    assert f"1 question(s) changed since they were predicted (e.g. id {records[1]['id']})" in caplog.text
    assert report["tasks"]["nq"]["predicted_this_run"] == 1
    after = _lines(predictions)
    assert len(after) == NUM_QUESTIONS and [line for line in after if line in before] == before[:1] + before[2:]
    redone = json.loads(after[-1])
    assert redone["id"] == records[1]["id"] and redone["input"] == "who wrote the theory of relativity"
    [answer] = rag.answer([redone["input"]], SETTINGS.query)
    assert redone["output"][0]["answer"] == answer.answer


def test_gold_as_guess_scores_exact_match_one(nq_file, tmp_path):
    guess_file = tmp_path / "oracle.jsonl"
    guesses = [gold_to_guess(r) for r in kilt_data.load_kilt(nq_file)]
    guess_file.write_text("".join(json.dumps(g) + "\n" for g in guesses))
    result = score_predictions(nq_file, guess_file)
    assert result["scored"] == NUM_QUESTIONS
    assert result["metrics"]["downstream"]["em"] == 1.0
    assert result["metrics"]["kilt"]["KILT-em"] == 1.0
    assert result["metrics"]["retrieval"]["Rprec"] == 1.0

    guess_file.write_text("".join(json.dumps(g) + "\n" for g in guesses[:-1]))  # a missing prediction
    with pytest.raises(kilt_data.KiltFormatError, match="gold ids with no guess"):
        score_predictions(nq_file, guess_file)
    partial = score_predictions(nq_file, guess_file, limit=3)  # --limit: only the first 3 gold records
    assert partial["scored"] == 3 and partial["extra_predictions"] == NUM_QUESTIONS - 1 - 3


def test_bad_records_are_reported_with_line_numbers_and_skipped(rag, nq_file, tmp_path):
    lines = _lines(nq_file)
    no_input = json.dumps({"id": "no-input", "output": [{"answer": "x"}]})
    bad = tmp_path / "nq-bad-kilt.jsonl"
    bad.write_text("\n".join([lines[0], "{not json", lines[1], no_input, lines[0], *lines[2:4]]) + "\n")

    questions = read_kilt_file(bad, need_input=True)
    assert [r["id"] for r in questions.records] == [json.loads(line)["id"] for line in lines[:4]]
    assert len(questions.bad) == 3
    assert f"{bad}:2: malformed JSON" in questions.bad[0]
    assert f"{bad}:4:" in questions.bad[1] and "no 'input'" in questions.bad[1]
    assert f"{bad}:5:" in questions.bad[2] and "repeats" in questions.bad[2]

    report = evaluate(rag, [bad], tmp_path / "eval", SETTINGS, progress=False)
    task = report["tasks"]["nq"]
    assert task["questions"] == task["scored"] == 4 and task["bad_records"] == 3
    assert f"{bad}:2: malformed JSON" in (tmp_path / "eval" / "report.md").read_text()


def test_task_names_and_pairing(tmp_path):
    assert task_names(["a/nq-dev-kilt.jsonl", "b/fever-dev-kilt.jsonl", "c/mine.jsonl"]) == ["nq", "fever", "mine"]
    assert task_names(["nq-dev-kilt.jsonl", "nq-train-kilt.jsonl"]) == ["nq-dev-kilt", "nq-train-kilt"]
    with pytest.raises(ValueError, match="task name"):
        task_names(["a/x.jsonl", "b/x.jsonl"])
    data = [Path("nq-dev-kilt.jsonl"), Path("fever-dev-kilt.jsonl")]
    by_name = pair_predictions(data, [Path("out/fever-predictions.jsonl")])
    assert by_name == [("fever", data[1], Path("out/fever-predictions.jsonl"))]
    by_order = pair_predictions(data, [Path("p1.jsonl"), Path("p2.jsonl")])
    assert [(name, p.name) for name, _, p in by_order] == [("nq", "p1.jsonl"), ("fever", "p2.jsonl")]
    with pytest.raises(ValueError, match="cannot pair"):
        pair_predictions(data, [Path("p1.jsonl")])


def test_cli_runs_then_scores_its_predictions(tiny_store, tiny_reader_path, nq_file, tmp_path):
    runner = CliRunner()
    out = tmp_path / "eval"
    common = ["eval", "--data", str(nq_file), "--out", str(out), "--device", "cpu", "--no-verify"]
    decode = ["--batch-size", "4", "--top-k", "4", "--rerank-k", "2", "--max-answer-tokens", "2", "--ks", "1,2"]
    args = [*common, "--store", str(tiny_store[0]), "--model", str(tiny_reader_path), *decode, "--limit", "4"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "| nq | 4 |" in result.output and "report.md" in result.output
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "run" and "recall@2" in report["tasks"]["nq"]["metrics"]["retrieval"]
    assert len(_lines(out / "nq-predictions.jsonl")) == 4

    scored_dir = tmp_path / "scored"
    args = ["eval", "--data", str(nq_file), "--predictions", str(out / "nq-predictions.jsonl"), "--limit", "4"]
    result = runner.invoke(app, [*args, "--ks", "1,2", "--out", str(scored_dir)])
    assert result.exit_code == 0, result.output
    scored = json.loads((scored_dir / "report.json").read_text())
    assert scored["mode"] == "score"
    assert scored["tasks"]["nq"]["metrics"] == report["tasks"]["nq"]["metrics"]

    result = runner.invoke(app, ["eval", "--data", str(nq_file), "--predictions", str(out / "nq-predictions.jsonl")])
    assert result.exit_code == 2 and "gold ids with no guess" in result.output  # 4 of 6 predicted


def test_cli_user_errors(tiny_store, nq_file, tmp_path, monkeypatch):
    runner = CliRunner()
    result = runner.invoke(app, ["eval", "--data", str(nq_file), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--store is required" in result.output
    result = runner.invoke(app, ["eval", "--data", str(tmp_path / "nope.jsonl"), "--predictions", str(nq_file)])
    assert result.exit_code == 2 and "file not found" in result.output

    from memvq.encoders import embedded

    monkeypatch.setattr(embedded, "DEFAULT_READER_DIR", tmp_path / "no-reader")
    args = ["eval", "--data", str(nq_file), "--out", str(tmp_path / "e"), "--store", str(tiny_store[0])]
    result = runner.invoke(app, [*args, "--device", "cpu", "--no-verify"])  # no --model: the embedded default
    assert result.exit_code == 2 and "embedded default reader is missing" in result.output

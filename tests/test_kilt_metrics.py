"""KILT metrics: parity with the official scripts, reading all 11 tasks, validation, unit cases."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import gold_to_guess

from memvq.data.kilt.metrics import (
    evidence_rank,
    exact_match,
    f1,
    normalize_answer,
    rouge_l,
    rprecision,
    score_all,
    score_downstream,
    score_retrieval,
)
from memvq.data.kilt.records import (
    KILT_TASKS,
    KiltFormatError,
    KiltWarning,
    align_predictions,
    check_gold,
    gold_answers,
    gold_provenance_sets,
    gold_titles,
    guess_answer,
    guess_provenance_ids,
    load_kilt,
    record_input,
    task_of,
    validate_predictions,
)

TOL = 1e-9

# ----------------------------------------------------------------------------------------------
# (1) parity with EXPECTED.md (the official KILT test data and its expected values)


@pytest.fixture(scope="module")
def official(shared_data: Path) -> Path:
    folder = shared_data / "kilt_official_tests"
    if not (folder / "EXPECTED.md").is_file():
        pytest.skip(f"official KILT test fixtures not found at {folder}")
    return folder


def _load(folder: Path, name: str) -> list[dict]:
    return load_kilt(folder / f"{name}.jsonl")


# (gold, guess) -> {(section, key): value}; values as written in EXPECTED.md
DOWNSTREAM_EXPECTED: dict[tuple[str, str], dict[tuple[str, str], float]] = {
    ("gold1", "guess1_1"): {
        ("kilt", "KILT-em"): 1 / 3,
        ("kilt", "KILT-f1"): 1 / 3,
        ("kilt", "KILT-rougel"): 0.3333333316666667,
        ("downstream", "em"): 2 / 3,
        ("downstream", "f1"): 0.8333333333333334,
        ("downstream", "rougel"): 0.7222222178240741,
        ("retrieval", "Rprec"): 1 / 3,
        ("retrieval", "recall@5"): 1 / 3,
    },
    ("gold1", "gold1"): {
        ("kilt", "KILT-accuracy"): 1,
        ("kilt", "KILT-em"): 1,
        ("kilt", "KILT-f1"): 1,
        ("kilt", "KILT-rougel"): 0.999999995,
        ("downstream", "accuracy"): 1,
        ("downstream", "em"): 1,
        ("downstream", "f1"): 1,
        ("downstream", "rougel"): 0.999999995,
        ("retrieval", "Rprec"): 1,
        ("retrieval", "recall@5"): 1,
    },
    ("gold3", "guess3_1"): {
        ("kilt", "KILT-em"): 0,
        ("kilt", "KILT-f1"): 0.25510204081632654,
        ("kilt", "KILT-rougel"): 0.22352940932318338,
        ("downstream", "em"): 0,
        ("downstream", "f1"): 0.5102040816326531,
        ("downstream", "rougel"): 0.44705881864636676,
    },
}

RANK_KEYS = [
    ("wikipedia_id",),
    ("wikipedia_id", "section"),
    ("wikipedia_id", "start_paragraph_id", "end_paragraph_id"),
]

RETRIEVAL_EXPECTED: dict[str, dict[str, float]] = {
    "guess2_1": {
        "Rprec": 1 / 2,
        "precision@1": 1,
        "precision@5": 2 / 5,
        "recall@5": 2 / 3,
        "success_rate@5": 1,
    },
    "guess2_2": {"Rprec": 1, "precision@1": 1, "precision@5": 1 / 5, "recall@5": 1 / 3, "success_rate@5": 1},
}


def test_expected_md_lists_the_values_we_check(official: Path) -> None:
    text = (official / "EXPECTED.md").read_text()
    for expected in DOWNSTREAM_EXPECTED.values():
        for value in expected.values():
            if value not in (0, 1) and not any(math.isclose(value, n / d) for n in (1, 2) for d in (2, 3, 5)):
                assert repr(value) in text, f"{value!r} is not in EXPECTED.md"


@pytest.mark.parametrize("pair", list(DOWNSTREAM_EXPECTED), ids="-vs-".join)
def test_downstream_parity(official: Path, pair: tuple[str, str]) -> None:
    gold, guess = (_load(official, name) for name in pair)
    result = score_downstream(gold, guess)
    for (section, key), expected in DOWNSTREAM_EXPECTED[pair].items():
        assert result[section][key] == pytest.approx(expected, abs=TOL), (section, key)
    # the combined report agrees on everything the downstream script reports
    combined = score_all(gold, guess)
    assert combined["kilt"] == result["kilt"]
    assert combined["downstream"] == result["downstream"]
    for key in ("Rprec", "recall@5"):
        assert combined["retrieval"][key] == result["retrieval"][key]


@pytest.mark.parametrize("rank_keys", RANK_KEYS, ids=",".join)
@pytest.mark.parametrize("guess_name", list(RETRIEVAL_EXPECTED))
def test_retrieval_parity(official: Path, guess_name: str, rank_keys: tuple[str, ...]) -> None:
    result = score_retrieval(_load(official, "gold2"), _load(official, guess_name), ks=(1, 5), rank_keys=rank_keys)
    for key, expected in RETRIEVAL_EXPECTED[guess_name].items():
        assert result[key] == pytest.approx(expected, abs=TOL), key
    assert list(result) == [
        "Rprec",
        "entity_in_input",
        "precision@1",
        "answer_in_context@1",
        "answer_and_ent_in_context@1",
        "entity_in_context@1",
        "precision@5",
        "answer_in_context@5",
        "answer_and_ent_in_context@5",
        "entity_in_context@5",
        "recall@5",
        "success_rate@5",
    ]


def test_concatenated_pretty_json_is_a_clear_error(official: Path) -> None:
    path = official / "guess3_1.json"
    with pytest.raises(KiltFormatError, match=r"guess3_1\.json:1: malformed JSON"):
        load_kilt(path)


# ----------------------------------------------------------------------------------------------
# (2) every KILT sample file reads, and a gold file scored as its own guess is perfect


@pytest.fixture(scope="module")
def samples(shared_data: Path) -> Path:
    folder = shared_data / "kilt_samples"
    if not folder.is_dir():
        pytest.skip(f"KILT samples not found at {folder}")
    return folder


def _dev_file(samples: Path, task: str) -> Path:
    found = sorted(p for p in samples.glob(f"{task}-dev*-kilt.jsonl") if task_of(p) == task)
    assert found, f"no dev file for {task} in {samples}"
    return found[0]


def test_all_sample_files_load(samples: Path) -> None:
    files = sorted(samples.glob("*.jsonl"))
    assert {task_of(p) for p in files} == set(KILT_TASKS)
    for path in files:
        records = load_kilt(path)
        assert records, path
        if "without_answers" in path.name:
            assert all("output" not in r for r in records)
            with pytest.raises(KiltFormatError, match="without outputs"):
                check_gold(records)
        else:
            check_gold(records, need_answers=True)
            assert all(gold_answers(r) for r in records), path


@pytest.mark.parametrize("task", sorted(KILT_TASKS))
def test_dev_file_self_scores_perfectly(samples: Path, task: str) -> None:
    gold = load_kilt(_dev_file(samples, task))
    guess = [gold_to_guess(r) for r in gold]
    result = score_all(gold, guess)
    assert result["downstream"]["em"] == 1
    assert result["downstream"]["accuracy"] == 1
    assert result["downstream"]["f1"] == 1
    assert result["downstream"]["rougel"] == pytest.approx(1, abs=1e-8)
    with_provenance = [r for r in gold if any(ids for ids in gold_provenance_sets(r))]
    assert with_provenance, task
    for record in with_provenance:
        assert rprecision(gold_to_guess(record), record) == 1
    sub_result = score_all(with_provenance, [gold_to_guess(r) for r in with_provenance])
    assert sub_result["retrieval"]["Rprec"] == 1
    assert sub_result["kilt"]["KILT-em"] == 1
    assert sub_result["retrieval"]["success_rate@5"] == 1


def test_task_specific_extraction(samples: Path) -> None:
    fever = load_kilt(_dev_file(samples, "fever"))
    assert set().union(*(gold_answers(r) for r in fever)) <= {"SUPPORTS", "REFUTES"}

    for task in ("aidayago2", "wned", "cweb"):  # entity linking: the answer is the linked page's title
        for r in load_kilt(_dev_file(samples, task)):
            assert gold_answers(r) <= gold_titles(r), (task, r["id"])
            assert "[START_ENT]" in (record_input(r) or "")

    for task in ("structured_zeroshot", "trex"):  # slot filling: "subject [SEP] relation"
        for r in load_kilt(_dev_file(samples, task)):
            assert "[SEP]" in (record_input(r) or "")
            assert gold_answers(r)

    nq = load_kilt(_dev_file(samples, "nq"))
    first = nq[0]
    assert {"the therefore sign", "therefore sign"} <= gold_answers(first)
    sets = gold_provenance_sets(first)
    assert len(sets) == len(first["output"])
    assert [] in sets  # answer-only outputs have no provenance
    assert all(len(gold_answers(r)) > 1 for r in nq)

    trivia = load_kilt(_dev_file(samples, "triviaqa"))
    assert all(record_input(r) is None for r in trivia)
    assert "Jim Laker" in gold_answers(trivia[0])

    eli5 = load_kilt(_dev_file(samples, "eli5"))
    assert max(len(a.split()) for r in eli5 for a in gold_answers(r)) > 100

    wow = load_kilt(_dev_file(samples, "wow"))
    assert all(len(gold_answers(r)) == 1 and len(gold_provenance_sets(r)[0]) >= 1 for r in wow)


def test_triviaqa_without_input_scores(samples: Path) -> None:
    gold = load_kilt(_dev_file(samples, "triviaqa"))
    result = score_retrieval(gold, [gold_to_guess(r) for r in gold])
    assert result["entity_in_input"] == 0  # no input: counted 0 (the official script raises KeyError)


# ----------------------------------------------------------------------------------------------
# (3) validation errors name the offending ids

GOLD = [
    {
        "id": 1,
        "input": "q1",
        "output": [{"answer": "a", "provenance": [{"wikipedia_id": "1", "title": "A"}]}],
    },
    {
        "id": "2",
        "input": "q2",
        "output": [{"answer": "b", "provenance": [{"wikipedia_id": "2", "title": "B"}]}],
    },
    {"id": "q3", "input": "q3", "output": [{"answer": "c"}, {"answer": "cc"}]},
]


def _guess(rid: object, answer: str = "x", n_outputs: int = 1) -> dict:
    return {"id": rid, "output": [{"answer": answer, "provenance": [{"wikipedia_id": "1"}]}] * n_outputs}


def test_missing_id_is_named() -> None:
    with pytest.raises(KiltFormatError, match=r"gold ids with no guess: 'q3'") as info:
        validate_predictions(GOLD, [_guess("1"), _guess(" 2 ")])
    assert info.value.problems == {"gold ids with no guess": ["q3"]}
    with pytest.raises(KiltFormatError, match="'q3'"):
        score_downstream(GOLD, [_guess("1"), _guess(" 2 ")])


def test_duplicated_id_is_named() -> None:
    with pytest.raises(KiltFormatError, match=r"duplicated guess ids: '2'"):
        validate_predictions(GOLD, [_guess(1), _guess(2), _guess("2"), _guess("q3")])
    with pytest.raises(KiltFormatError, match=r"duplicated gold ids: '1'"):
        validate_predictions([*GOLD, GOLD[0]], [_guess(1), _guess(2), _guess("q3")])


def test_more_than_one_output_is_named() -> None:
    guesses = [_guess(1), _guess(2, n_outputs=2), _guess("q3", n_outputs=3)]
    with pytest.raises(KiltFormatError, match=r"exactly one output.*'2'") as info:
        validate_predictions(GOLD, guesses)
    assert sorted(i for ids in info.value.problems.values() for i in ids) == ["2", "q3"]
    with pytest.raises(KiltFormatError, match="'q3'"):
        score_downstream(GOLD, guesses)
    no_answer = [_guess(1), _guess(2), {"id": "q3", "output": [{"provenance": []}]}]
    with pytest.raises(KiltFormatError, match=r"no 'answer': 'q3'"):
        validate_predictions(GOLD, no_answer)


def test_retrieval_mode_keeps_the_one_output_with_provenance() -> None:
    guess = [_guess(1), _guess(2), {"id": "q3", "output": [{"answer": "c"}, {"provenance": []}]}]
    validate_predictions(GOLD, guess, mode="retrieval")
    assert score_retrieval(GOLD, guess)["Rprec"] == pytest.approx(1 / 3)
    two = [_guess(1), _guess(2), _guess("q3", n_outputs=2)]
    with pytest.raises(KiltFormatError, match=r"exactly one output with 'provenance'.*'q3'"):
        score_retrieval(GOLD, two)


def test_extra_guess_ids_are_ignored_with_a_warning() -> None:
    guesses = [_guess("zzz"), _guess("q3", "c"), _guess(2, "b"), _guess(1, "a")]
    with pytest.warns(KiltWarning, match="'zzz'"):
        aligned = align_predictions(GOLD, guesses)
    assert [guess_answer(g) for g in aligned] == ["a", "b", "c"]
    with pytest.warns(KiltWarning):
        assert score_downstream(GOLD, guesses)["downstream"]["em"] == 1
    with pytest.raises(KiltFormatError, match=r"guess ids not in gold: 'zzz'"):
        validate_predictions(GOLD, guesses, allow_extra=False)


def test_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "guess.jsonl"
    path.write_text(json.dumps(_guess(1)) + "\n\n" + '{"id": 2, "output": [\n' + json.dumps(_guess(3)) + "\n")
    with pytest.raises(KiltFormatError, match=r"guess\.jsonl:3: malformed JSON"):
        load_kilt(path)
    path.write_text('{"output": []}\n')
    with pytest.raises(KiltFormatError, match=r"guess\.jsonl:1: record has no 'id'"):
        load_kilt(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(KiltFormatError, match=r"guess\.jsonl:1: expected a JSON object"):
        load_kilt(path)


# ----------------------------------------------------------------------------------------------
# (4) unit cases


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("The Cat!", "cat"),
        ("  a  b\tc ", "b c"),
        ("An apple, the end.", "apple end"),
        ("theatre another", "theatre another"),  # articles only as whole words
        ("U.S.A.", "usa"),
        ("don't", "dont"),
        ("", ""),
    ],
)
def test_normalize_answer(text: str, normalized: str) -> None:
    assert normalize_answer(text) == normalized


def test_exact_match_and_f1() -> None:
    assert exact_match("The Therefore sign.", "therefore sign") == 1
    assert exact_match("therefore", "therefore sign") == 0
    assert f1("a cat sat", "the cat sat down") == pytest.approx(0.8)  # p = 1, r = 2/3
    assert f1("cat cat", "cat") == pytest.approx(2 / 3)  # bag of tokens: p = 1/2, r = 1
    assert f1("dog", "cat") == 0
    assert f1("the", "a") == 0  # both normalise to nothing


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("the cat sat", "the cat sat on the mat", 2 * (0.6 / (1.6 + 1e-8))),  # p = 1, r = 3/5
        ("the the the", "the", 2 * (1 / (2 + 1e-8))),  # words counted as a set
        ("a b. c d", "c d. a b", 0.999999995),  # summary level: "." splits sentences
        ("a b c d", "c d a b", 0.4999999950000001),  # one sentence: LCS of 2 out of 4
        ("b a. b", "a b", 0.4999999950000001),  # the package's LCS tie-break picks "b", not "a"
        ("x", "x . ", 0.6666666622222223),  # a blank sentence counts as the word ""
        ("Suicide", "suicide", 0.0),  # no normalisation
        (".", "anything", 0.0),  # empty hypothesis
        ("anything", "...", 0.0),  # empty reference
    ],
)
def test_rouge_l(prediction: str, reference: str, expected: float) -> None:
    assert rouge_l(prediction, reference) == pytest.approx(expected, abs=1e-15)


def test_rank_and_rprecision_by_hand() -> None:
    gold = {
        "id": 1,
        "output": [
            {"answer": "x", "provenance": [{"wikipedia_id": "1"}, {"wikipedia_id": "2"}]},
            {"answer": "y", "provenance": [{"wikipedia_id": "5"}]},
            {"answer": "z"},
        ],
    }
    guess = {"id": 1, "output": [{"provenance": [{"wikipedia_id": i} for i in (2, 9, 5, 2, 1)]}]}
    assert guess_provenance_ids(guess) == ["2", "9", "5", "1"]
    rank, n_sets = evidence_rank(guess, gold)
    assert (rank, n_sets) == ([False, True, True], 2)  # "2" then "1" complete set 0 at the end
    # R-precision: best over outputs of |first R guess ids in the output's R gold ids| / R
    assert rprecision(guess, gold) == 0.5  # {1, 2}: "2" but not "9" in the top 2; {5}: "2" misses
    result = score_retrieval([gold], [guess], ks=(1, 3))
    assert result["precision@1"] == 0
    assert result["precision@3"] == pytest.approx(2 / 3)
    assert result["recall@3"] == 1
    assert result["success_rate@3"] == 1


def test_in_context_metrics_use_provenance_text() -> None:
    gold = {
        "id": 1,
        "input": "who wrote Hamlet?",
        "output": [{"answer": "William Shakespeare", "provenance": [{"wikipedia_id": "7", "title": "Hamlet"}]}],
    }
    prov = [
        {"wikipedia_id": "3", "text": "Nothing here."},
        {"wikipedia_id": "7", "text": "Hamlet is a tragedy by William Shakespeare."},
        {"wikipedia_id": "8"},
    ]
    guess = {"id": 1, "output": [{"answer": "Shakespeare", "provenance": prov}]}
    result = score_retrieval([gold], [guess], ks=(1, 2, 3))
    assert result["entity_in_input"] == 1
    assert (result["answer_in_context@1"], result["answer_in_context@2"]) == (0, 1)
    assert (result["entity_in_context@1"], result["entity_in_context@2"]) == (0, 1)
    assert result["answer_and_ent_in_context@2"] == 1

    texts = {"8": "William Shakespeare wrote Hamlet"}
    no_text = {"id": 1, "output": [{"answer": "x", "provenance": [{"wikipedia_id": "8"}]}]}
    assert score_retrieval([gold], [no_text], ks=(1,))["answer_in_context@1"] == 0
    looked_up = score_retrieval([gold], [no_text], ks=(1,), passage_text=lambda p: texts.get(str(p["wikipedia_id"])))
    assert looked_up["answer_in_context@1"] == 1


def test_kilt_scores_need_page_level_rprec_one_and_empty_answers_count_zero() -> None:
    gold = [
        {"id": 1, "output": [{"answer": "Paris", "provenance": [{"wikipedia_id": "10"}]}]},
        {"id": 2, "output": [{"answer": "Rome", "provenance": [{"wikipedia_id": "20"}]}]},
        {"id": 3, "output": [{"answer": "Oslo", "provenance": [{"wikipedia_id": "30"}]}]},
    ]
    guess = [
        {"id": 1, "output": [{"answer": "paris", "provenance": [{"wikipedia_id": 10}]}]},
        {"id": 2, "output": [{"answer": "Rome", "provenance": [{"wikipedia_id": "99"}]}]},
        {"id": 3, "output": [{"answer": "  ", "provenance": [{"wikipedia_id": "30"}]}]},
    ]
    result = score_downstream(gold, guess)
    assert result["downstream"]["accuracy"] == pytest.approx(1 / 3)  # strict: "paris" != "Paris"
    assert result["downstream"]["em"] == pytest.approx(2 / 3)
    assert result["kilt"]["KILT-em"] == pytest.approx(1 / 3)
    assert result["kilt"]["KILT-accuracy"] == 0
    assert result["retrieval"]["Rprec"] == pytest.approx(2 / 3)


def test_bad_ks_are_rejected() -> None:
    with pytest.raises(ValueError, match="positive"):
        score_retrieval(GOLD[:1], [_guess(1)], ks=(0, 5))
    with pytest.raises(ValueError, match="repeat"):
        score_retrieval(GOLD[:1], [_guess(1)], ks=(5, 5))

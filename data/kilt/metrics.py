"""KILT evaluation metrics as pure functions, number-for-number with the official scripts.

Re-implements (does not import) ``kilt/eval_downstream.py`` and ``kilt/eval_retrieval.py`` of
facebookresearch/KILT:

* downstream: ``accuracy`` (strict string match), ``em`` (normalised exact match), ``f1`` (token F1),
  ``rougel`` (ROUGE-L F of the PyPI ``rouge`` 1.0.1 package), each the max over the gold answers and
  averaged over records; the KILT variants (``KILT-accuracy``, ``KILT-em``, ``KILT-f1``,
  ``KILT-rougel``) count a record only when its page-level R-precision (rank key ``wikipedia_id``) is
  exactly 1.
* retrieval: ``Rprec``, ``precision@k``, ``recall@k`` and ``success_rate@k`` (``k > 1`` only, as in the
  official script), ``answer_in_context@k``, ``answer_and_ent_in_context@k``, ``entity_in_context@k``
  and ``entity_in_input``; ids of provenance items are built from ``rank_keys`` (``wikipedia_id``, or
  e.g. ``wikipedia_id,start_paragraph_id,end_paragraph_id`` for paragraph level, ``title``).

Passage text for the ``*_in_context@k`` metrics: like the official script, the text comes from the
guess's provenance items, which must carry a ``"text"`` field (retrievers write the passage text
there); items without it never count. The official script never looks up the knowledge source. As an
extension, ``passage_text`` (a callable from a provenance item to its text, e.g. a lookup in the
KILT knowledge source by ``wikipedia_id`` and paragraph) is consulted for items without ``"text"``;
leaving it ``None`` gives the official behaviour.

ROUGE-L is our own exact re-implementation of ``Rouge().get_scores(pred, gold)["rouge-l"]["f"]`` from
``rouge`` 1.0.1 (summary-level union LCS over "."-split sentences, set semantics): no dependency.

Deliberate differences from the official scripts, none of which changes a number it computes:
errors are :class:`~data.kilt.records.KiltFormatError` naming the ids instead of bare asserts; the
LCS is iterative, so very long sentences do not hit Python's recursion limit (the official one does);
records without ``input`` (KILT's TriviaQA) count 0 for ``entity_in_input`` instead of raising
``KeyError``; duplicated or non-positive ``ks`` are rejected (officially a duplicate is double counted).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from memvq.data.kilt.records import (
    CheckMode,
    KiltFormatError,
    align_predictions,
    check_gold,
    gold_answers,
    gold_evidence_sets,
    gold_provenance_sets,
    gold_titles,
    guess_answer,
    guess_output,
    guess_provenance_ids,
    record_id,
    record_input,
)

PassageText = Callable[[Mapping[str, Any]], str | None]
"""Maps a provenance item to its passage text (``None`` if unknown)."""

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")

# ----------------------------------------------------------------------------------------------
# answer metrics


def normalize_answer(s: str) -> str:
    """Lower-case, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace (SQuAD/KILT)."""
    text = s.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, ground_truth: str) -> float:
    """1.0 if the normalised strings are equal, else 0.0."""
    return 1.0 if normalize_answer(prediction) == normalize_answer(ground_truth) else 0.0


def f1(prediction: str, ground_truth: str) -> float:
    """Token-level F1 between the normalised strings (bag of tokens, SQuAD style)."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(ground_truth).split()
    num_same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = 1.0 * num_same / len(pred_tokens)
    recall = 1.0 * num_same / len(gold_tokens)
    return (2 * precision * recall) / (precision + recall)


def accuracy(prediction: str, ground_truths: Iterable[str]) -> float:
    """Strict accuracy: 1.0 if the (stripped) prediction is literally one of the gold answers."""
    return 1.0 if prediction.strip() in set(ground_truths) else 0.0


def _rouge_sentences(text: str) -> list[str]:
    # rouge 1.0.1: split on ".", keep non-empty pieces, collapse their whitespace (a piece of only
    # spaces survives as the empty sentence "", whose single token is "").
    return [" ".join(piece.split()) for piece in text.split(".") if len(piece) > 0]


def _words(sentences: Iterable[str]) -> list[str]:
    return [w for s in sentences for w in s.split(" ")]


def _lcs_words(x: Sequence[str], y: Sequence[str]) -> set[str]:
    """The words of the LCS of ``x`` and ``y`` as ``rouge`` 1.0.1 reconstructs it (same tie-breaks)."""
    n, m = len(x), len(y)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        xi = x[i - 1]
        row, prev = table[i], table[i - 1]
        for j in range(1, m + 1):
            if xi == y[j - 1]:
                row[j] = prev[j - 1] + 1
            else:
                row[j] = max(prev[j], row[j - 1])
    words: set[str] = set()
    i, j = n, m
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            words.add(x[i - 1])
            i -= 1
            j -= 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def rouge_l(prediction: str, ground_truth: str) -> float:
    """ROUGE-L F exactly as ``rouge`` 1.0.1 ``Rouge().get_scores(prediction, ground_truth)`` gives it.

    Summary-level union-LCS with set semantics (the package default ``exclusive=True``): both texts
    are split into sentences on ".", words are split on single spaces, ``m``/``n`` are the numbers of
    *distinct* reference/candidate words, the overlap is the number of distinct words in the union of
    the LCS of every (reference sentence, candidate sentence) pair, and
    ``F = 2 * P * R / (P + R + 1e-8)``. No normalisation. 0.0 when either text has no sentence
    (the package raises ``ValueError``, which the KILT script maps to 0.0).
    """
    hyp = _rouge_sentences(prediction)
    ref = _rouge_sentences(ground_truth)
    if not hyp or not ref:
        return 0.0
    m = len(set(_words(ref)))
    n = len(set(_words(hyp)))
    hyp_words = [s.split(" ") for s in hyp]
    union: set[str] = set()
    for ref_s in ref:
        ref_words = ref_s.split(" ")
        for eval_words in hyp_words:
            union |= _lcs_words(ref_words, eval_words)
    llcs = len(union)
    r_lcs = llcs / m
    p_lcs = llcs / n
    return 2.0 * ((p_lcs * r_lcs) / (p_lcs + r_lcs + 1e-8))


def metric_max_over_ground_truths(
    metric: Callable[[str, str], float], prediction: str, ground_truths: Iterable[str]
) -> float:
    """The best score of ``prediction`` against any of the gold answers."""
    scores = [metric(prediction, gt) for gt in ground_truths]
    if not scores:
        raise ValueError("no gold answers to score against")
    return max(scores)


# ----------------------------------------------------------------------------------------------
# retrieval metrics (one record)


def answer_scores(answers: Iterable[tuple[str, Sequence[str]]]) -> dict[str, float]:
    """Mean EM and F1 (each the best over a question's gold answers) of (predicted answer, gold answers) pairs: the
    downstream scores of training's dev evaluation and of the benchmarks, as `score_downstream` gives them."""
    pairs = list(answers)
    count = max(1, len(pairs))
    return {
        "em": sum(metric_max_over_ground_truths(exact_match, answer, gold) for answer, gold in pairs) / count,
        "f1": sum(metric_max_over_ground_truths(f1, answer, gold) for answer, gold in pairs) / count,
    }


def rprecision(
    guess: Mapping[str, Any], gold: Mapping[str, Any], rank_keys: Sequence[str] = ("wikipedia_id",)
) -> float:
    """R-precision, the max over gold outputs: of the first R distinct guess ids, the fraction in the
    output's R distinct gold ids (0 for outputs without provenance)."""
    guess_ids = guess_provenance_ids(guess, rank_keys)
    best: float | None = None
    for gold_ids in gold_provenance_sets(gold, rank_keys):
        r = len(gold_ids)
        gold_set = set(gold_ids)
        num = sum(1 for g in guess_ids[:r] if g in gold_set)
        value = num / r if r > 0 else 0
        if best is None or value > best:
            best = value
    if best is None:
        raise KiltFormatError(f"gold record {record_id(gold)!r} has no outputs")
    return best


def evidence_rank(
    guess: Mapping[str, Any], gold: Mapping[str, Any], rank_keys: Sequence[str] = ("wikipedia_id",)
) -> tuple[list[bool | str], int]:
    """The official ``get_rank``: each gold evidence set counts as one point of the rank.

    Walking the guess ids in order, an id outside every evidence set appends ``False``; an id in an
    evidence set removes that set's earlier partial marker and appends a marker (``"evidence_set:i"``)
    or, when it completes the set, ``True``. Returns the rank and the number of distinct evidence sets
    (0, with an empty rank, when the guess has no ids).
    """
    guess_ids = guess_provenance_ids(guess, rank_keys)
    if not guess_ids:
        return [], 0
    evidence_sets = [set(s) for s in gold_evidence_sets(gold, rank_keys)]
    rank: list[bool | str] = []
    for guess_id in guess_ids:
        found = False
        for idx, e_set in enumerate(evidence_sets):
            if guess_id in e_set:
                found = True
                marker = f"evidence_set:{idx}"
                if marker in rank:
                    rank.remove(marker)
                e_set.remove(guess_id)
                rank.append(True if not e_set else marker)
        if not found:
            rank.append(False)
    return rank, len(evidence_sets)


def _count_true(rank: Sequence[bool | str], k: int) -> int:
    return sum(1 for x in rank[:k] if x is True)


def precision_at_k(rank: Sequence[bool | str], k: int) -> float:
    """Completed evidence sets among the first k rank points, over k."""
    return _count_true(rank, k) / k


def recall_at_k(rank: Sequence[bool | str], num_evidence_sets: int, k: int) -> float:
    """Completed evidence sets among the first k rank points, over the number of evidence sets."""
    return _count_true(rank, k) / num_evidence_sets


def success_rate_at_k(rank: Sequence[bool | str], k: int) -> int:
    """1 if some evidence set is completed within the first k rank points."""
    return int(_count_true(rank, k) > 0)


def _context_texts(guess: Mapping[str, Any], k: int, passage_text: PassageText | None) -> list[str]:
    output = guess["output"][0]
    if "provenance" not in output:
        return []
    texts: list[str] = []
    for prov in output["provenance"][:k]:
        if "text" in prov:
            texts.append(normalize_answer(prov["text"]))
        elif passage_text is not None:
            text = passage_text(prov)
            if text is not None:
                texts.append(normalize_answer(text))
    return texts


def _any_in(needles: Iterable[str], haystack: str) -> bool:
    return any(normalize_answer(x) in haystack for x in needles)


def answer_in_context_at_k(
    guess: Mapping[str, Any], gold: Mapping[str, Any], k: int, passage_text: PassageText | None = None
) -> int:
    """1 if a normalised gold answer is a substring of one of the first k normalised passage texts."""
    answers = gold_answers(gold)
    return int(any(_any_in(answers, text) for text in _context_texts(guess, k, passage_text)))


def answer_and_ent_in_context_at_k(
    guess: Mapping[str, Any], gold: Mapping[str, Any], k: int, passage_text: PassageText | None = None
) -> int:
    """1 if one of the first k passages contains both a gold answer and a gold provenance title."""
    answers, titles = gold_answers(gold), gold_titles(gold)
    return int(any(_any_in(answers, text) and _any_in(titles, text) for text in _context_texts(guess, k, passage_text)))


def entity_in_context_at_k(
    guess: Mapping[str, Any], gold: Mapping[str, Any], k: int, passage_text: PassageText | None = None
) -> int:
    """1 if a normalised gold provenance title is a substring of one of the first k passage texts."""
    titles = gold_titles(gold)
    return int(any(_any_in(titles, text) for text in _context_texts(guess, k, passage_text)))


def entity_in_input(gold: Mapping[str, Any]) -> int:
    """1 if a normalised gold provenance title is a substring of the normalised input (0 without input)."""
    text = record_input(gold)
    if text is None:
        return 0
    return int(_any_in(gold_titles(gold), normalize_answer(text)))


def _check_ks(ks: Iterable[int]) -> list[int]:
    out = sorted(int(k) for k in ks)
    if any(k < 1 for k in out):
        raise ValueError(f"ks must be positive integers, got {out}")
    if len(set(out)) != len(out):
        raise ValueError(f"ks must not repeat, got {out}")
    return out


def _result_keys(ks: Sequence[int]) -> list[str]:
    keys = ["Rprec", "entity_in_input"]
    for k in ks:
        keys += [f"precision@{k}", f"answer_in_context@{k}", f"answer_and_ent_in_context@{k}"]
        keys += [f"entity_in_context@{k}"]
        if k > 1:
            keys += [f"recall@{k}", f"success_rate@{k}"]
    return keys


def ranking_metrics(
    guess: Mapping[str, Any],
    gold: Mapping[str, Any],
    ks: Iterable[int] = (1, 5),
    rank_keys: Sequence[str] = ("wikipedia_id",),
    passage_text: PassageText | None = None,
) -> dict[str, float]:
    """All retrieval metrics of one (guess, gold) pair; the guess's first output holds the provenance.

    Keys as the official report: ``recall@k`` and ``success_rate@k`` only for ``k > 1``; P/R/S are 0
    when the guess has no ids under ``rank_keys`` or the gold has no evidence set.
    """
    ks_sorted = _check_ks(ks)
    result: dict[str, float] = dict.fromkeys(_result_keys(ks_sorted), 0.0)
    result["Rprec"] = rprecision(guess, gold, rank_keys)
    result["entity_in_input"] = entity_in_input(gold)
    rank, num_sets = evidence_rank(guess, gold, rank_keys)
    for k in ks_sorted:
        if num_sets > 0:
            result[f"precision@{k}"] = precision_at_k(rank, k)
            if k > 1:
                result[f"recall@{k}"] = recall_at_k(rank, num_sets, k)
                result[f"success_rate@{k}"] = success_rate_at_k(rank, k)
        result[f"answer_in_context@{k}"] = answer_in_context_at_k(guess, gold, k, passage_text)
        result[f"answer_and_ent_in_context@{k}"] = answer_and_ent_in_context_at_k(guess, gold, k, passage_text)
        result[f"entity_in_context@{k}"] = entity_in_context_at_k(guess, gold, k, passage_text)
    return result


# ----------------------------------------------------------------------------------------------
# dataset level


def _aligned(
    gold: Sequence[Mapping[str, Any]], guess: Sequence[Mapping[str, Any]], mode: CheckMode, need_answers: bool
) -> list[Mapping[str, Any]]:
    check_gold(gold, need_answers=need_answers)
    return align_predictions(gold, guess, mode=mode)


def _compute_retrieval(
    gold: Sequence[Mapping[str, Any]],
    guess: Sequence[Mapping[str, Any]],
    ks: Sequence[int],
    rank_keys: Sequence[str],
    passage_text: PassageText | None,
) -> dict[str, float]:
    """Official ``eval_retrieval.compute`` on aligned records (each guess: one output)."""
    ks_sorted = _check_ks(ks)
    keys = _result_keys(ks_sorted)
    totals: dict[str, float] = dict.fromkeys(keys, 0.0)
    for guess_item, gold_item in zip(guess, gold, strict=True):
        item = ranking_metrics(guess_item, gold_item, ks_sorted, rank_keys, passage_text)
        for key in keys:
            totals[key] += item[key]
    if gold:
        for key in keys:
            totals[key] /= len(gold)
    return totals


def _downstream_scores(
    gold: Sequence[Mapping[str, Any]], guess: Sequence[Mapping[str, Any]]
) -> dict[str, dict[str, float]]:
    """Official ``_calculate_metrics`` on aligned records."""
    names = ("accuracy", "em", "f1", "rougel")
    total: dict[str, float] = dict.fromkeys(names, 0)
    kilt: dict[str, float] = dict.fromkeys(names, 0)
    count = 0
    for guess_item, gold_item in zip(guess, gold, strict=True):
        count += 1
        candidates = gold_answers(gold_item)
        answer = guess_answer(guess_item)
        if not answer:  # an empty answer scores 0 everywhere but still counts
            continue
        local = {
            "accuracy": accuracy(answer, candidates),
            "em": metric_max_over_ground_truths(exact_match, answer, candidates),
            "f1": metric_max_over_ground_truths(f1, answer, candidates),
            "rougel": metric_max_over_ground_truths(rouge_l, answer, candidates),
        }
        page_rprec = rprecision(guess_item, gold_item, ("wikipedia_id",))
        for name in names:
            total[name] += local[name]
            if page_rprec == 1:
                kilt[name] += local[name]
    if count > 0:
        for name in names:
            total[name] /= count
            kilt[name] /= count
    return {
        "kilt": {
            "KILT-accuracy": kilt["accuracy"],
            "KILT-em": kilt["em"],
            "KILT-f1": kilt["f1"],
            "KILT-rougel": kilt["rougel"],
        },
        "downstream": dict(total),
    }


def score_downstream(
    gold: Sequence[Mapping[str, Any]], guess: Sequence[Mapping[str, Any]]
) -> dict[str, dict[str, float]]:
    """What the official ``eval_downstream.evaluate`` returns, from parsed records.

    ``{"kilt": {"KILT-accuracy", "KILT-em", "KILT-f1", "KILT-rougel"},
    "downstream": {"accuracy", "em", "f1", "rougel"}, "retrieval": {"Rprec", "recall@5"}}``;
    the retrieval part is page level (``wikipedia_id``). Each guess needs exactly one output with an
    ``answer``; guesses are matched to gold by ``str(id).strip()`` and extras are ignored.
    """
    aligned = _aligned(gold, guess, "downstream", need_answers=True)
    result: dict[str, dict[str, float]] = _downstream_scores(gold, aligned)
    retrieval = _compute_retrieval(gold, aligned, (1, 5), ("wikipedia_id",), None)
    result["retrieval"] = {"Rprec": retrieval["Rprec"], "recall@5": retrieval["recall@5"]}
    return result


def _provenance_only(guess: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    # official filter_answers: keep only the one output that carries provenance
    return [{**g, "output": [guess_output(g, need="provenance")]} for g in guess]


def score_retrieval(
    gold: Sequence[Mapping[str, Any]],
    guess: Sequence[Mapping[str, Any]],
    ks: Sequence[int] = (1, 5),
    rank_keys: Sequence[str] = ("wikipedia_id",),
    passage_text: PassageText | None = None,
) -> dict[str, float]:
    """What the official ``eval_retrieval.evaluate`` returns, from parsed records.

    Keys in the official order: ``Rprec``, ``entity_in_input``, then for each k (ascending)
    ``precision@k``, ``answer_in_context@k``, ``answer_and_ent_in_context@k``,
    ``entity_in_context@k`` and, for ``k > 1``, ``recall@k``, ``success_rate@k``. Each guess needs
    exactly one output with ``provenance`` (other outputs are ignored). Provenance ids are
    ``"+".join(str(item[key]).strip() for key in rank_keys)``; for ``*_in_context`` see the module
    docstring (``text`` on provenance items, or ``passage_text``).
    """
    aligned = _aligned(gold, guess, "retrieval", need_answers=False)
    return _compute_retrieval(gold, _provenance_only(aligned), ks, rank_keys, passage_text)


def score_all(
    gold: Sequence[Mapping[str, Any]],
    guess: Sequence[Mapping[str, Any]],
    ks: Sequence[int] = (1, 5),
    rank_keys: Sequence[str] = ("wikipedia_id",),
    passage_text: PassageText | None = None,
) -> dict[str, dict[str, float]]:
    """Both official reports in one: ``eval_downstream`` + ``eval_retrieval``.

    ``{"kilt": ..., "downstream": ...}`` exactly as :func:`score_downstream` (KILT variants always
    gated on page-level R-precision, as officially), and ``"retrieval"``: the full
    :func:`score_retrieval` report for ``ks`` and ``rank_keys`` (with the defaults its ``Rprec`` and
    ``recall@5`` equal the downstream script's). Each guess needs exactly one output, with both an
    ``answer`` and ``provenance``.
    """
    aligned = _aligned(gold, guess, "both", need_answers=True)
    result = _downstream_scores(gold, aligned)
    result["retrieval"] = _compute_retrieval(gold, aligned, ks, rank_keys, passage_text)
    return result

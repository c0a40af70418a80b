"""Reading and validating KILT-format jsonl records (gold and guess files).

A KILT record is one JSON object per line::

    {"id": ..., "input": "...", "output": [{"answer": "...", "provenance": [{"wikipedia_id": "...",
     "title": "...", "start_paragraph_id": 1, "end_paragraph_id": 1, "section": "...", "text": "..."}]}]}

Gold files carry many outputs per record (several answers for NQ/TriviaQA/T-REx, answer-only and
provenance-only outputs for NQ/ELI5, one output per evidence set for FEVER/HotpotQA); a guess (a
prediction) carries exactly one output. The helpers below extract answers and provenance exactly as
the official evaluation (facebookresearch/KILT, ``kilt/eval_downstream.py`` and
``kilt/eval_retrieval.py``) does, so the metrics in :mod:`data.kilt.metrics` match it number for
number. Task-specific shapes need no special casing:

* FEVER: the labels ``SUPPORTS`` / ``REFUTES`` are the answers (scored by accuracy / exact match).
* slot filling (structured_zeroshot, trex) and multi-answer QA (NQ, TriviaQA, HotpotQA): every
  non-empty answer of every output is a gold alternative.
* ELI5, WoW: long free-text answers (scored by ROUGE-L / F1); many ELI5 records have no provenance.
* entity linking (AIDA, WNED, CWEB): the answer is the Wikipedia title of the linked entity.
* TriviaQA as distributed by KILT has no ``input`` (it must be re-attached from the original data);
  such records load fine, and :func:`record_input` returns ``None`` for them.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

Record = dict[str, Any]
"""One parsed KILT record (a JSON object)."""

CheckMode = Literal["downstream", "retrieval", "both", "ids"]

#: The eleven KILT datasets (file-name prefix -> task family).
KILT_TASKS: dict[str, str] = {
    "fever": "fact_checking",
    "aidayago2": "entity_linking",
    "wned": "entity_linking",
    "cweb": "entity_linking",
    "trex": "slot_filling",
    "structured_zeroshot": "slot_filling",
    "nq": "open_domain_qa",
    "hotpotqa": "open_domain_qa",
    "triviaqa": "open_domain_qa",
    "eli5": "open_domain_qa",
    "wow": "dialogue",
}

_MAX_IDS_IN_MESSAGE = 20


class KiltFormatError(ValueError):
    """A KILT file or a set of records does not have the expected shape.

    ``problems`` maps a short description of each kind of problem to the ids (or ``file:line``
    locations) that have it, so callers and tests can inspect what went wrong.
    """

    def __init__(self, message: str, problems: Mapping[str, Sequence[str]] | None = None) -> None:
        super().__init__(message)
        self.problems: dict[str, list[str]] = {k: list(v) for k, v in (problems or {}).items()}


class KiltWarning(UserWarning):
    """A non-fatal oddity the official scripts also tolerate (e.g. guesses for ids not in gold)."""


# ----------------------------------------------------------------------------------------------
# loading


def _check_record_shape(obj: object, where: str) -> Record:
    if not isinstance(obj, dict):
        raise KiltFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "id" not in obj:
        raise KiltFormatError(f"{where}: record has no 'id'")
    if "output" in obj:
        outputs = obj["output"]
        if not isinstance(outputs, list):
            raise KiltFormatError(f"{where}: 'output' of id {obj['id']!r} must be a list")
        for n, out in enumerate(outputs):
            if not isinstance(out, dict):
                raise KiltFormatError(f"{where}: output[{n}] of id {obj['id']!r} must be an object")
            prov = out.get("provenance")
            if "provenance" in out and not (isinstance(prov, list) and all(isinstance(p, dict) for p in prov)):
                raise KiltFormatError(f"{where}: output[{n}].provenance of id {obj['id']!r} must be a list of objects")
    return obj


def iter_kilt(path: str | Path) -> Iterator[Record]:
    """Stream the records of a KILT jsonl file, one JSON object per line.

    Blank lines are skipped. A malformed line raises :class:`KiltFormatError` naming the file and the
    1-based line number (the official loader would stop with a bare ``JSONDecodeError``).
    """
    path = Path(path)
    with path.open(encoding="utf-8") as fin:
        for lineno, line in enumerate(fin, start=1):
            if not line.strip():
                continue
            yield parse_record(line, f"{path}:{lineno}")


def parse_record(line: str, where: str) -> Record:
    """One KILT jsonl line as a record; :class:`KiltFormatError` naming ``where`` (``file:line``) if malformed.

    The building block of :func:`iter_kilt`, for readers that report bad lines and go on instead of stopping.
    """
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise KiltFormatError(
            f"{where}: malformed JSON ({exc.msg} at column {exc.colno}); a KILT file holds one JSON object per line",
            {"malformed lines": [where]},
        ) from exc
    return _check_record_shape(obj, where)


def load_kilt(path: str | Path) -> list[Record]:
    """Read a whole KILT jsonl file (see :func:`iter_kilt`)."""
    return list(iter_kilt(path))


@dataclass
class KiltFile:
    """The usable records of one KILT file (file order, first occurrence of each id) and the bad ones skipped."""

    path: Path
    records: list[Record]
    bad: list[str] = field(default_factory=list)


def read_kilt_file(path: str | Path, limit: int | None = None, need_input: bool = False) -> KiltFile:
    """Read a KILT jsonl file, reporting bad records with their line number and skipping them.

    Bad: malformed JSON or a record of the wrong shape, a repeated id, and (``need_input``) a record without
    an ``input`` string (nothing to ask). Each is logged as a warning and listed in ``bad`` as
    ``"file:line: why"``. ``limit`` keeps the first N usable records (reading stops there).
    """
    path = Path(path)
    records: list[Record] = []
    bad: list[str] = []
    seen: set[str] = set()

    def skip(message: str) -> None:
        bad.append(message)
        logger.warning("skipped bad record: %s", message)

    with path.open(encoding="utf-8") as fin:
        for lineno, line in enumerate(fin, start=1):
            if limit is not None and len(records) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = parse_record(line, where)
            except KiltFormatError as error:
                skip(str(error))
                continue
            rid = record_id(record)
            text = record_input(record)
            if need_input and not (text and text.strip()):
                skip(f"{where}: id {rid!r} has no 'input' string (no question to ask)")
            elif rid in seen:
                skip(f"{where}: id {rid!r} repeats an earlier record")
            else:
                seen.add(rid)
                records.append(record)
    return KiltFile(path, records, bad)


def task_names(paths: Sequence[str | Path]) -> list[str]:
    """One task name per file: :func:`~data.kilt.records.task_of` (``nq-dev-kilt.jsonl`` -> ``nq``), else the
    file stem; files that would share a name get their stems. Two files with the same stem are an error."""
    paths = [Path(p) for p in paths]
    names = [task_of(p) or _stem(p) for p in paths]
    counts = Counter(names)
    names = [_stem(p) if counts[name] > 1 else name for p, name in zip(paths, names, strict=True)]
    repeated = sorted(name for name, n in Counter(names).items() if n > 1)
    if repeated:
        raise ValueError(f"several data files have the task name {', '.join(map(repr, repeated))}: rename one")
    return names


def _stem(path: Path) -> str:
    return path.name.removesuffix(".jsonl").removesuffix(".json")


def task_of(path: str | Path) -> str | None:
    """The KILT dataset a file belongs to, from its name (``nq-dev-kilt.jsonl`` -> ``nq``)."""
    name = Path(path).name
    for dataset in sorted(KILT_TASKS, key=len, reverse=True):
        if name.startswith(dataset + "-") or name.startswith(dataset + "_") or name == dataset:
            return dataset
    return None


# ----------------------------------------------------------------------------------------------
# ids and validation


def record_id(record: Mapping[str, Any]) -> str:
    """The id as the official scripts compare it: ``str(id).strip()`` (so ``1`` matches ``"1"``)."""
    if "id" not in record:
        raise KiltFormatError(f"KILT record without an 'id': {str(dict(record))[:200]}")
    return str(record["id"]).strip()


def _fmt_ids(ids: Sequence[str]) -> str:
    shown = ", ".join(repr(i) for i in ids[:_MAX_IDS_IN_MESSAGE])
    more = len(ids) - _MAX_IDS_IN_MESSAGE
    return shown + (f" (and {more} more)" if more > 0 else "")


def _output_problem(guess: Mapping[str, Any], mode: CheckMode) -> str | None:
    """Why a guess record cannot be scored in ``mode``, or ``None`` when it can."""
    outputs = guess.get("output")
    if not isinstance(outputs, list):
        return "guess has no 'output' list"
    if mode in ("downstream", "both"):
        if len(outputs) != 1:
            return f"guess must have exactly one output, has {len(outputs)}"
        if "answer" not in outputs[0]:
            return "the guess output has no 'answer'"
    if mode in ("retrieval", "both"):
        with_prov = sum(1 for out in outputs if "provenance" in out)
        if with_prov != 1:
            return f"guess must have exactly one output with 'provenance', has {with_prov}"
    return None


def validate_predictions(
    gold: Sequence[Mapping[str, Any]],
    guess: Sequence[Mapping[str, Any]],
    *,
    mode: CheckMode = "downstream",
    allow_extra: bool = True,
) -> None:
    """Check that ``guess`` can be scored against ``gold``; raise :class:`KiltFormatError` if not.

    Mirrors ``validate_input`` of the official ``eval_downstream.py`` (ids compared as
    ``str(id).strip()``) plus its per-record output checks, but reports every offending id at once:

    * duplicated gold ids, duplicated guess ids, and gold ids with no guess are errors;
    * ``mode="downstream"``: each guess has exactly one output and it has an ``answer``
      (official ``_calculate_metrics``); ``mode="retrieval"``: exactly one output has ``provenance``
      (official ``filter_answers``; answer-only outputs are ignored there); ``mode="both"``: both;
      ``mode="ids"``: no output checks;
    * guesses whose id is not in gold are ignored with a :class:`KiltWarning`, as the official scripts
      do (they print a size-mismatch warning and drop them); ``allow_extra=False`` makes them an error.
    """
    problems: dict[str, list[str]] = {}

    gold_ids = [record_id(r) for r in gold]
    dup_gold = [i for i, c in Counter(gold_ids).items() if c > 1]
    if dup_gold:
        problems["duplicated gold ids"] = dup_gold

    guess_by_id: dict[str, Mapping[str, Any]] = {}
    dup_guess: list[str] = []
    for g in guess:
        gid = record_id(g)
        if gid in guess_by_id:
            if gid not in dup_guess:
                dup_guess.append(gid)
        else:
            guess_by_id[gid] = g
    if dup_guess:
        problems["duplicated guess ids"] = dup_guess

    gold_set = set(gold_ids)
    missing = [i for i in dict.fromkeys(gold_ids) if i not in guess_by_id]
    if missing:
        problems["gold ids with no guess"] = missing

    extra = [i for i in guess_by_id if i not in gold_set]
    if extra:
        if allow_extra:
            warnings.warn(
                f"{len(extra)} guess id(s) not in gold are ignored: {_fmt_ids(extra)}",
                KiltWarning,
                stacklevel=2,
            )
        else:
            problems["guess ids not in gold"] = extra

    if mode != "ids":
        problems |= _output_problems(gold_ids, guess_by_id, mode)

    if problems:
        lines = [f"  - {what}: {_fmt_ids(ids)}" for what, ids in problems.items()]
        raise KiltFormatError("invalid KILT predictions:\n" + "\n".join(lines), problems)


def _output_problems(
    gold_ids: Sequence[str], guess_by_id: Mapping[str, Mapping[str, Any]], mode: CheckMode
) -> dict[str, list[str]]:
    """The guesses of gold ids whose outputs cannot be scored in `mode`, by what is wrong with them."""
    bad: dict[str, list[str]] = {}
    for gid in dict.fromkeys(gold_ids):
        g = guess_by_id.get(gid)
        why = None if g is None else _output_problem(g, mode)
        if why is not None:
            bad.setdefault(why, []).append(gid)
    return bad


def align_predictions(
    gold: Sequence[Mapping[str, Any]],
    guess: Sequence[Mapping[str, Any]],
    *,
    mode: CheckMode = "downstream",
    allow_extra: bool = True,
) -> list[Mapping[str, Any]]:
    """Validate (see :func:`validate_predictions`) and return the guesses in gold order."""
    validate_predictions(gold, guess, mode=mode, allow_extra=allow_extra)
    by_id = {record_id(g): g for g in guess}
    return [by_id[record_id(r)] for r in gold]


def check_gold(gold: Iterable[Mapping[str, Any]], *, need_answers: bool = False) -> None:
    """Raise :class:`KiltFormatError` for gold records that cannot be scored against.

    Every gold record needs a non-empty ``output`` list (``*-test_without_answers`` files have none);
    with ``need_answers`` (downstream scoring) every record also needs at least one non-empty answer.
    """
    problems: dict[str, list[str]] = {}
    for r in gold:
        outputs = r.get("output")
        if not isinstance(outputs, list) or not outputs:
            problems.setdefault("gold records without outputs (a test file without answers?)", []).append(record_id(r))
        elif need_answers and not gold_answers(r):
            problems.setdefault("gold records without any answer", []).append(record_id(r))
    if problems:
        lines = [f"  - {what}: {_fmt_ids(ids)}" for what, ids in problems.items()]
        raise KiltFormatError("gold records that cannot be scored:\n" + "\n".join(lines), problems)


# ----------------------------------------------------------------------------------------------
# gold side


def record_input(record: Mapping[str, Any]) -> str | None:
    """The record's ``input`` (question, claim, dialogue, marked mention), or ``None`` if absent."""
    value = record.get("input")
    return value if isinstance(value, str) else None


def gold_answers(record: Mapping[str, Any]) -> set[str]:
    """All gold answers across outputs: the non-empty ``answer`` strings, stripped (official set)."""
    answers: set[str] = set()
    for out in record.get("output", []):
        answer = out.get("answer")
        if answer and answer.strip():
            answers.add(answer.strip())
    return answers


def gold_answer_list(record: Mapping[str, Any]) -> list[str]:
    """:func:`gold_answers` in file order without duplicates (for display and for building guesses)."""
    answers: dict[str, None] = {}
    for out in record.get("output", []):
        answer = out.get("answer")
        if answer and answer.strip():
            answers.setdefault(answer.strip())
    return list(answers)


def gold_titles(record: Mapping[str, Any]) -> set[str]:
    """All non-empty provenance titles across outputs, stripped (official ``get_gold_titles``)."""
    titles: set[str] = set()
    for out in record.get("output", []):
        for prov in out.get("provenance", []):
            title = prov.get("title")
            if title and title.strip():
                titles.add(title.strip())
    return titles


def provenance_key(provenance: Mapping[str, Any], rank_keys: Sequence[str]) -> str | None:
    """The id of one provenance item under ``rank_keys``: ``"+".join(str(p[k]).strip())``.

    ``None`` when a rank key is missing (the official scripts then skip the item).
    """
    if any(k not in provenance for k in rank_keys):
        return None
    return "+".join(str(provenance[k]).strip() for k in rank_keys)


def _dedup(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def provenance_ids(output: Mapping[str, Any], rank_keys: Sequence[str] = ("wikipedia_id",)) -> list[str]:
    """Provenance ids of one output in order, without duplicates; items missing a key are skipped."""
    keys = (provenance_key(p, rank_keys) for p in output.get("provenance", []))
    return _dedup(k for k in keys if k is not None)


def gold_provenance_sets(record: Mapping[str, Any], rank_keys: Sequence[str] = ("wikipedia_id",)) -> list[list[str]]:
    """One list of provenance ids per gold output (official ``_get_ids_list``).

    Outputs without provenance (answer-only outputs) give an empty list, which can never be matched.
    """
    return [provenance_ids(out, rank_keys) for out in record.get("output", [])]


def gold_evidence_sets(record: Mapping[str, Any], rank_keys: Sequence[str] = ("wikipedia_id",)) -> list[set[str]]:
    """The distinct evidence sets used by the official ranking (``get_rank``), in output order.

    As in the official script, only outputs that have a ``provenance`` key count, and an item missing
    some rank keys is keyed by the keys it has (unlike :func:`gold_provenance_sets`, which skips it).
    """
    sets: list[set[str]] = []
    for out in record.get("output", []):
        if "provenance" not in out:
            continue
        e_set = {"+".join(str(p[k]).strip() for k in rank_keys if k in p) for p in out["provenance"]}
        if e_set not in sets:
            sets.append(e_set)
    return sets


# ----------------------------------------------------------------------------------------------
# guess side


def guess_output(record: Mapping[str, Any], *, need: Literal["answer", "provenance"] = "answer") -> Any:
    """The single output of a guess.

    ``need="answer"``: the guess must have exactly one output (official downstream rule).
    ``need="provenance"``: the one output carrying ``provenance`` (official ``filter_answers``).
    """
    outputs = record.get("output")
    if not isinstance(outputs, list):
        raise KiltFormatError(f"guess {record_id(record)!r} has no 'output' list")
    if need == "answer":
        if len(outputs) != 1:
            raise KiltFormatError(f"guess {record_id(record)!r} must have exactly one output, has {len(outputs)}")
        return outputs[0]
    with_prov = [out for out in outputs if "provenance" in out]
    if len(with_prov) != 1:
        raise KiltFormatError(
            f"guess {record_id(record)!r} must have exactly one output with 'provenance', has {len(with_prov)}"
        )
    return with_prov[0]


def guess_answer(record: Mapping[str, Any]) -> str:
    """The guess answer as the official script reads it: ``str(output[0]["answer"]).strip()``."""
    output = guess_output(record, need="answer")
    if "answer" not in output:
        raise KiltFormatError(f"guess {record_id(record)!r}: its output has no 'answer'")
    return str(output["answer"]).strip()


def guess_provenance_ids(record: Mapping[str, Any], rank_keys: Sequence[str] = ("wikipedia_id",)) -> list[str]:
    """Ranked, de-duplicated provenance ids of the guess's first output.

    The official ``_get_ids_list(guess, rank_keys)[0]``.
    """
    outputs = record.get("output") or [{}]
    return provenance_ids(outputs[0], rank_keys)

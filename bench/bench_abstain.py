"""Does the answer's confidence know when the store holds no answer? The held-out questions over two stores: the usual
one, and one built from the same corpus without the gold pages of every other question (those questions, and any
other whose gold pages all went with them, have no support in it).

    python -m bench.bench_abstain --store runs/demo --data runs/splits/nq-dev.jsonl --out runs/abstain \
        [--model READER] [--build-config configs/build-minilm.toml] [--memory/--no-memory]

It writes OUT/corpus-without-gold.jsonl, builds OUT/store-without-gold with `memvq build-index` (resumable; the
build config given, which should be the usual store's), runs `memvq eval` over both stores at the reader's default
`min_confidence` (its calibration's) and prints one row per store and one for both together: EM of every question,
AUROC of the confidence for "the answer is right", expected calibration error, share abstained, right answers kept,
wrong answers removed and the share of the unsupported questions abstained on. Then the threshold rule for a
reader's default `min_confidence` on these held-out questions: the largest threshold (in steps of 0.01) that keeps
at least 90% of the right answers of both stores together, and what it does.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memvq.data.kilt.records import gold_evidence_sets, load_kilt, read_kilt_file, record_id
from memvq.data.kilt.selective import selective_scores
from memvq.pipelines.calibrate import threshold_for
from memvq.pipelines.evaluate import EvalSettings, judged_outputs, run_eval
from memvq.pipelines.logs import configure_logging

CORPUS = "../shared/data/nq_open_oracle/wiki-mini-knowledgesource.jsonl"


def without_gold(corpus: Path, data: Path, out: Path) -> tuple[Path, set[str]]:
    """Write the corpus without the gold pages of every other question of `data` (KILT knowledge-source jsonl);
    returns its path and the ids of the questions left without any gold page."""
    records = read_kilt_file(data, need_input=True).records
    removed = {page for r in records[::2] for group in gold_evidence_sets(r) for page in group}
    unsupported = {
        record_id(r) for r in records if all(set(group) <= removed for group in gold_evidence_sets(r) or [set()])
    }
    path = out / "corpus-without-gold.jsonl"
    if not path.is_file():
        tmp = path.with_suffix(".tmp")
        with corpus.open(encoding="utf-8") as fin, tmp.open("w", encoding="utf-8") as fout:
            for line in fin:
                if json.loads(line)["wikipedia_id"] not in removed:
                    fout.write(line)
        tmp.replace(path)
    return path, unsupported


@dataclass
class Judged:
    """One prediction: its confidence, whether it abstained, whether the answer it would give is right, and whether
    its store holds a gold page for it."""

    confidence: float
    abstained: bool
    right: bool
    unsupported: bool


def judged(data: Path, predictions: Path, unsupported: set[str]) -> list[Judged]:
    outputs = judged_outputs(read_kilt_file(data, need_input=True).records, load_kilt(predictions))
    if outputs is None:
        raise ValueError(f"{predictions}: answers without a confidence (a reader with the extract head is needed)")
    return [
        Judged(output["confidence"], output["abstained"], right, ident in unsupported)
        for ident, output, right in outputs
    ]


def row(name: str, rows: list[Judged], threshold: float | None = None) -> dict[str, Any]:
    """The table row of some predictions (at `threshold` instead of their own abstentions when given)."""
    confidence, right = [r.confidence for r in rows], [r.right for r in rows]
    abstained = [r.abstained if threshold is None else r.confidence < threshold for r in rows]
    scores = selective_scores(confidence, right, abstained)
    unsupported = [a for r, a in zip(rows, abstained, strict=True) if r.unsupported]
    return {
        "store": name,
        "questions": len(rows),
        "EM (all answered)": scores["accuracy_all"],
        "AUROC": scores["auroc"],
        "ECE": scores["ece"],
        "abstained": scores["abstain_rate"],
        "right kept": scores["right_kept"],
        "wrong removed": scores["wrong_removed"],
        "unsupported abstained": sum(unsupported) / len(unsupported) if unsupported else None,
    }


def rule_threshold(rows: list[Judged], keep_right: float = 0.9) -> float:
    """The largest threshold in 0.01 steps that keeps at least `keep_right` of the right answers (`memvq
    calibrate`'s rule, rounded down to a step)."""
    exact = threshold_for([r.confidence for r in rows], [r.right for r in rows], keep_right)
    return math.floor(round(100 * exact, 9)) / 100


def print_table(rows: list[dict[str, Any]]) -> None:
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        cells = [f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c] if r[c] is not None else "") for c in columns]
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, required=True, help="the usual store")
    parser.add_argument("--data", type=Path, required=True, help="held-out KILT questions (memvq split's dev file)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=None, help="reader directory (default: the embedded one)")
    parser.add_argument("--corpus", type=Path, default=Path(CORPUS))
    parser.add_argument("--build-config", type=Path, default=Path("configs/build-minilm.toml"))
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=False)
    args = parser.parse_args()
    configure_logging()
    args.out.mkdir(parents=True, exist_ok=True)
    corpus, unsupported = without_gold(args.corpus, args.data, args.out)
    store = args.out / "store-without-gold"
    build = [str(Path(sys.executable).parent / "memvq"), "build-index", "--corpus", str(corpus), "--out", str(store)]
    build += ["--config", str(args.build_config), "--memory" if args.memory else "--no-memory"]
    subprocess.run(build, check=True)
    stores = {}
    for name, path, missing in (("usual", args.store, set()), ("without gold pages", store, unsupported)):
        eval_dir = args.out / ("eval-usual" if not missing else "eval-without-gold")
        report = run_eval([args.data], eval_dir, EvalSettings(), store=path, model=args.model)
        [task] = report["tasks"].values()
        stores[name] = judged(args.data, Path(task["predictions"]), missing)
    both = [r for rows in stores.values() for r in rows]
    print(f"at the reader's min_confidence ({len(unsupported)} questions unsupported in the store without gold pages):")
    print_table([*(row(name, rows) for name, rows in stores.items()), row("both", both)])
    threshold = rule_threshold(both)
    print(f"\nthe rule's threshold (keeps >= 90% of the right answers of both): min_confidence = {threshold:.2f}")
    print_table([*(row(name, rows, threshold) for name, rows in stores.items()), row("both", both, threshold)])


if __name__ == "__main__":
    main()

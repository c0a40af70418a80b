"""SQuAD 2.0's unanswerable questions: does the reader abstain where the paragraph holds no answer?

The shared sample (`haystack_samples/squad_v2_dev_small.json`: 626 questions over 2 articles, 333 unanswerable) is
built into a store of its own paragraphs (`memvq build-index`, resumable), every question is answered over it
(retrieval included: open-book over the 2 articles) and scored as the official SQuAD 2.0 script scores it: an
abstention is the empty answer, right for an unanswerable question; exact match and F1 over all questions, the
answerable ones (HasAns) and the unanswerable ones (NoAns), and the AUROC of the confidence for "answerable" (1.0:
every answerable question more confident than every unanswerable one; 0.5: no separation).

Its answerable questions are SQuAD v1.1 dev questions of two articles on the training side of the embedded reader's
split (trained on); its unanswerable ones are trained on only by a config with an `unanswerable` task
(configs/train-minilm-squad2.toml): `--held-out CONFIG` answers only the questions that task holds out (its dev
side). No question of the sample is calibrated on.

    python -m bench.bench_squad2 --out runs/squad2 [--model READER] [--build-config configs/build-minilm.toml] \
        [--held-out configs/train-minilm-squad2.toml]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from memvq.data.kilt.metrics import exact_match, normalize_answer
from memvq.data.kilt.metrics import f1 as squad_f1
from memvq.data.kilt.selective import auroc
from memvq.data.tasks import iter_squad, load_task
from memvq.encoders.options import QueryOptions
from memvq.pipelines.config import TrainConfig
from memvq.pipelines.logs import configure_logging
from memvq.pipelines.rag import RAGPipeline

SAMPLE = "../shared/data/haystack_samples/squad_v2_dev_small.json"
BATCH = 16


def f1(prediction: str, gold: str) -> float:
    """The official script's compute_f1: SQuAD's token F1, where an empty side scores 1 only against an empty side."""
    if not normalize_answer(prediction) or not normalize_answer(gold):
        return float(normalize_answer(prediction) == normalize_answer(gold))
    return squad_f1(prediction, gold)


def scores(rows: list[tuple[str, list[str]]]) -> dict[str, float]:
    """Exact match and F1 (x 100) of (prediction, gold answers; [""] when unanswerable) pairs."""
    if not rows:
        return {"exact": 0.0, "f1": 0.0, "total": 0}
    em = [max(exact_match(p, g) for g in golds) for p, golds in rows]
    f = [max(f1(p, g) for g in golds) for p, golds in rows]
    return {"exact": 100 * sum(em) / len(rows), "f1": 100 * sum(f) / len(rows), "total": len(rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=None, help="reader directory (default: the embedded one)")
    parser.add_argument("--sample", type=Path, default=Path(SAMPLE))
    parser.add_argument("--build-config", type=Path, default=Path("configs/build-minilm.toml"))
    parser.add_argument(
        "--held-out", type=Path, default=None, help="a train config: only the questions its unanswerable task holds out"
    )
    args = parser.parse_args()
    configure_logging()
    store = args.out / "store"
    build = [str(Path(sys.executable).parent / "memvq"), "build-index", "--corpus", str(args.sample)]
    build += ["--out", str(store), "--format", "squad", "--config", str(args.build_config), "--no-memory"]
    subprocess.run(build, check=True)
    examples = list(iter_squad(args.sample, unanswerable=True))
    if args.held_out is not None:
        tasks = [task for task in TrainConfig.from_file(args.held_out).tasks if task.unanswerable]
        if not tasks:
            parser.error(f"{args.held_out} has no task with unanswerable = true")
        held_out = {example.id for example in load_task(tasks[0]).dev}
        examples = [example for example in examples if example.id in held_out]
    questions = [(e.question, list(e.answers)) for e in examples]
    rag = RAGPipeline.load(store, args.model)
    threshold = rag.config.min_confidence
    answered: list[tuple[str, float]] = []  # (the answer it would give, its confidence)
    for start in range(0, len(questions), BATCH):
        batch = [q for q, _ in questions[start : start + BATCH]]
        for result in rag.answer(batch, QueryOptions(min_confidence=0.0)):
            answered.append((result.answer, result.confidence or 0.0))
    separation = auroc([conf for _, conf in answered], [golds != [""] for _, golds in questions])
    print(
        f"{len(questions)} questions, {sum(g == [''] for _, g in questions)} unanswerable; min_confidence {threshold}; "
        f"AUROC of the confidence for answerable vs unanswerable {separation:.3f}"
    )
    print("| answers | all EM / F1 | HasAns EM / F1 | NoAns EM / F1 | abstained (HasAns / NoAns) |")
    print("|---|---|---|---|---|")
    for name, cut in (("always answer", 0.0), (f"abstain below {threshold:.2f} (the reader's)", threshold)):
        given = [
            (cand if conf >= cut else "", golds) for (cand, conf), (_, golds) in zip(answered, questions, strict=True)
        ]
        has = [row for row in given if row[1] != [""]]
        no = [row for row in given if row[1] == [""]]
        all_, h, n = scores(given), scores(has), scores(no)
        skipped_has = sum(p == "" for p, _ in has) / len(has)
        skipped_no = sum(p == "" for p, _ in no) / len(no)
        print(
            f"| {name} | {all_['exact']:.1f} / {all_['f1']:.1f} | {h['exact']:.1f} / {h['f1']:.1f} | "
            f"{n['exact']:.1f} / {n['f1']:.1f} | {skipped_has:.2f} / {skipped_no:.2f} |"
        )


if __name__ == "__main__":
    main()

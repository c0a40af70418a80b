"""The eval report: its header (`memvq-eval-report`: the settings, the predictions scored with their sha256, what the
run read) written as `report.json`, and its rendering: `report.md`, the summary table `memvq eval` prints and, for
answers with a confidence, each task's risk-coverage curve as `{task}-risk-coverage.svg`."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from memvq.data.kilt.records import KiltFile
from memvq.memory.artifact import ArtifactFormat, ArtifactHeader, atomic_write, write_json

REPORT_FORMAT = ArtifactFormat("memvq-eval-report", 2, remake="run `memvq eval` again")
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
_MAX_BAD_IN_REPORT = 20


def bad_summary(kilt_file: KiltFile) -> dict[str, Any]:
    """A task's bad records: how many, and the first ones (as `file:line: why`)."""
    return {"bad_records": len(kilt_file.bad), "bad_record_examples": kilt_file.bad[:_MAX_BAD_IN_REPORT]}


def make_report(
    mode: str, settings: Mapping[str, Any], tasks: dict[str, Any], out_dir: str | Path | None, **extra: Any
) -> dict[str, Any]:
    """The report: its memvq-eval-report header (config: the settings as JSON; files: the predictions scored, named
    relative to `out_dir`) with the mode, time, what it ran with (`extra`) and the tasks' results."""
    predictions = [Path(task["predictions"]) for task in tasks.values()]
    header = ArtifactHeader.create(
        REPORT_FORMAT,
        settings,
        files={os.path.relpath(path, out_dir or os.curdir): path for path in predictions if path.is_file()},
        extra={"mode": mode, "created": datetime.now(UTC).isoformat(timespec="seconds"), **extra, "tasks": tasks},
    )
    return jsonable(header.to_json())


def jsonable(value: Any) -> Any:
    """`value` as plain JSON values (anything else as its str)."""
    return json.loads(json.dumps(value, default=str))


def write_report(report: Mapping[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.json`` (the report as it is: its header, see :func:`make_report`) and ``report.md`` into
    ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / REPORT_JSON, out / REPORT_MD
    write_json(json_path, dict(report))
    for name, task in report["tasks"].items():
        if task.get("selective"):
            svg = risk_coverage_svg(name, task["selective"]["risk_coverage"])
            atomic_write(out / f"{name}{RISK_COVERAGE_SUFFIX}", lambda tmp, svg=svg: tmp.write_text(svg))
    atomic_write(md_path, lambda tmp: tmp.write_text(format_markdown(report)))
    return json_path, md_path


RISK_COVERAGE_SUFFIX = "-risk-coverage.svg"


def risk_coverage_svg(task: str, points: list[list[float]], width: int = 480, height: int = 320) -> str:
    """The risk-coverage curve (x: coverage, y: risk = 1 - accuracy of the answered) as a standalone SVG."""
    left, top, right, bottom = 56, 28, 16, 44
    plot_w, plot_h = width - left - right, height - top - bottom

    def xy(coverage: float, risk: float) -> str:
        return f"{left + coverage * plot_w:.1f},{top + (1 - risk) * plot_h:.1f}"

    ticks = [i / 5 for i in range(6)]
    grid = "".join(
        f'<line x1="{left}" y1="{top + (1 - t) * plot_h:.1f}" x2="{left + plot_w}" y2="{top + (1 - t) * plot_h:.1f}" '
        f'stroke="#ddd"/><text x="{left - 6}" y="{top + (1 - t) * plot_h + 4:.1f}" text-anchor="end">{t:.1f}</text>'
        f'<text x="{left + t * plot_w:.1f}" y="{top + plot_h + 16}" text-anchor="middle">{t:.1f}</text>'
        for t in ticks
    )
    line = " ".join(xy(coverage, risk) for coverage, risk in points)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        f'font-size="11"><rect width="100%" height="100%" fill="white"/>{grid}'
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#555"/>'
        f'<polyline points="{line}" fill="none" stroke="#1f6feb" stroke-width="2"/>'
        f'<text x="{left + plot_w / 2}" y="{top - 10}" text-anchor="middle" font-size="13">{task}: risk vs coverage '
        f"(most confident answered first)</text>"
        f'<text x="{left + plot_w / 2}" y="{height - 8}" text-anchor="middle">coverage (share of questions answered)'
        f'</text><text transform="translate(14,{top + plot_h / 2}) rotate(-90)" text-anchor="middle">risk (share of '
        f"answers given that are wrong)</text></svg>\n"
    )


_DOWNSTREAM_NAMES = {"accuracy": "accuracy", "em": "EM", "f1": "F1", "rougel": "ROUGE-L"}
_KILT_NAMES = {"KILT-accuracy": "KILT-AC", "KILT-em": "KILT-EM", "KILT-f1": "KILT-F1", "KILT-rougel": "KILT-RL"}


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def summary_table(report: Mapping[str, Any]) -> str:
    """One markdown row per task: questions, EM, F1, KILT-EM, R-precision, recall@k (largest k), queries/s."""
    k = max(report["config"]["ks"])
    recall = f"recall@{k}" if k > 1 else f"precision@{k}"
    rows = [
        f"| task | questions | EM | F1 | KILT-EM | R-prec | {recall} | queries/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, task in report["tasks"].items():
        metrics = task.get("metrics") or {}
        down, kilt, retr = metrics.get("downstream", {}), metrics.get("kilt", {}), metrics.get("retrieval", {})
        qps = (task.get("timing") or {}).get("queries_per_second")
        cells = [
            name,
            _num(task["questions"]),
            _num(down.get("em")),
            _num(down.get("f1")),
            _num(kilt.get("KILT-em")),
            _num(retr.get("Rprec")),
            _num(retr.get(recall)),
            _num(qps, 2),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def _header(report: Mapping[str, Any]) -> list[str]:
    lines = [f"# memvq eval ({'run' if report['mode'] == 'run' else 'scoring existing predictions'})", ""]
    lines.append(f"- created: {report['created']}")
    store = report.get("store")
    if store:
        backbone = store.get("backbone") or {}
        codec = store.get("codec")
        memory = (
            f"({backbone.get('memory_layers')} of {backbone.get('num_layers')} layers in memory); codec "
            f"{codec.get('kind')}, {codec.get('bytes_per_token')} bytes/token"
            if codec
            else "(no memory: passages and the dense index)"
        )
        lines.append(
            f"- store: `{store['path']}`: {_num(store.get('num_passages'))} passages of "
            f"{_num(store.get('num_documents'))} documents; {backbone.get('model_path')} {memory}; manifest sha256 "
            f"{str(store.get('manifest_sha256'))[:12]}"
        )
    model = report.get("model")
    if model:
        config = model.get("config") or {}
        lines.append(
            f"- model: `{model.get('path') or '(given as a pipeline)'}`: {model.get('mode')} in "
            f"{model.get('precision')}, top_k "
            f"{config.get('top_k')}, rerank_k {config.get('rerank_k')}, max_answer_tokens "
            f"{config.get('max_answer_tokens')}, num_beams {config.get('num_beams')}"
        )
    device = report.get("device")
    if device:
        where = device.get("gpu") or f"{device.get('cpu')}, {device.get('cpu_count')} cores"
        lines.append(f"- device: {device['device']} ({where})")
    flat = {**report["config"], **report["config"].get("query", {})}  # the query knobs one by one
    settings = ", ".join(f"{k}={v}" for k, v in flat.items() if k != "query")
    lines += [f"- settings (None: the reader config's): {settings}", ""]
    return lines


def _task_section(name: str, task: Mapping[str, Any]) -> list[str]:
    lines = [f"## {name}", ""]
    lines.append(
        f"`{task['data']}` -> `{task['predictions']}`: {_num(task['questions'])} questions, "
        f"{_num(task['scored'])} scored, {_num(task['unscored'])} without a gold answer, "
        f"{_num(task['bad_records'])} bad records skipped"
    )
    lines.append("")
    metrics = task.get("metrics")
    if metrics:
        lines += ["| metric | value |", "|---|---:|"]
        lines += [f"| {label} | {_num(metrics['downstream'][key])} |" for key, label in _DOWNSTREAM_NAMES.items()]
        lines += [f"| {label} | {_num(metrics['kilt'][key])} |" for key, label in _KILT_NAMES.items()]
        lines += [
            f"| {'R-precision' if key == 'Rprec' else key} | {_num(value)} |"
            for key, value in metrics["retrieval"].items()
        ]
        lines.append("")
    else:
        lines += ["No gold answers: not scored.", ""]
    timing = task.get("timing")
    if timing and timing.get("questions_timed"):
        lines += ["| stage | ms / question |", "|---|---:|"]
        lines += [f"| {stage} | {_num(ms, 2)} |" for stage, ms in timing["ms_per_question"].items()]
        lines += [
            "",
            f"{_num(timing['queries_per_second'], 2)} queries/s over {_num(timing['questions_timed'])} questions "
            f"({_num(timing['batches'])} batches; wall clock, writing the predictions included). Stage times: "
            "the milliseconds of each batch divided by its questions.",
            "",
        ]
    lines += _selective_section(name, task.get("selective"))
    if task["bad_records"]:
        lines.append(f"Bad records (first {min(task['bad_records'], _MAX_BAD_IN_REPORT)}):")
        lines += [f"- {message}" for message in task["bad_record_examples"]]
        lines.append("")
    return lines


def _selective_section(name: str, selective: Mapping[str, Any] | None) -> list[str]:
    if not selective:
        return []
    lines = [
        f"Confidence (right = exact match of the answer it would give): AUROC {_num(selective['auroc'], 3)}, "
        f"expected calibration error {_num(selective['ece'], 3)}; at this run's threshold "
        f"{_num(selective['abstain_rate'], 3)} abstained, accuracy of the answers given "
        f"{_num(selective['accuracy_answered'], 3)} (all: {_num(selective['accuracy_all'], 3)}), right answers kept "
        f"{_num(selective['right_kept'], 3)}, wrong answers removed {_num(selective['wrong_removed'], 3)}. "
        f"Risk-coverage curve: `{name}{RISK_COVERAGE_SUFFIX}`.",
        "",
        "| min_confidence | coverage | accuracy answered | right kept | wrong removed |",
        "|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {row['threshold']:.1f} | {_num(row['coverage'], 3)} | {_num(row['accuracy_answered'], 3)} | "
        f"{_num(row['right_kept'], 3)} | {_num(row['wrong_removed'], 3)} |"
        for row in selective["thresholds"]
    ]
    return [*lines, ""]


def format_markdown(report: Mapping[str, Any]) -> str:
    """The report as markdown: what it ran with, a summary row per task, then a table per task."""
    lines = _header(report)
    lines += ["## Summary", "", summary_table(report)]
    for name, task in report["tasks"].items():
        lines += _task_section(name, task)
    return "\n".join(lines).rstrip() + "\n"

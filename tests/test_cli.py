"""The command line's options that set a settings field show that field's description and default: one home for
each default (`memvq.cli.setting`)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from memvq.cli import app
from memvq.encoders.options import QueryOptions
from memvq.pipelines.config import EncoderConfig, LoadOptions, OptimConfig
from memvq.pipelines.evaluate import EvalSettings
from memvq.serve.settings import ServeSettings

CASES = [
    ("serve", "--max-wait-ms", ServeSettings, "max_wait_ms"),
    ("serve", "--body-timeout", ServeSettings, "body_timeout_s"),
    ("serve", "--device", LoadOptions, "device"),
    ("eval", "--batch-size", EvalSettings, "batch_size"),
    ("eval", "--ks", EvalSettings, "ks"),
    ("eval", "--top-k", QueryOptions, "top_k"),
    ("query", "--num-beams", QueryOptions, "num_beams"),
    ("build-index", "--memory-from", EncoderConfig, "memory_from"),
    ("train", "--steps", OptimConfig, "steps"),
]


def help_text(command: str) -> str:
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "400"}, terminal_width=400)
    assert result.exit_code == 0
    return " ".join(result.output.replace("│", " ").split())


@pytest.mark.parametrize(("command", "flag", "model", "name"), CASES, ids=[f"{c} {f}" for c, f, _, _ in CASES])
def test_options_take_help_and_default_from_the_settings_field(command, flag, model, name):
    field = model.model_fields[name]
    text = help_text(command)
    option = text[text.index(flag) + len(flag) :].split(" --")[0]  # this option's type, help and default
    assert " ".join(field.description.split()[:4]) in option, option
    default = field.get_default(call_default_factory=True)
    if default not in (None, ()) and command in ("serve", "eval"):  # build and train show "the config's" instead
        value = ",".join(map(str, default)) if isinstance(default, tuple) else str(default)
        assert f"[default: {value}]" in option, option

"""The shared logging setup keeps transformers' load report out of the output, whether transformers is imported
before it or after."""

import subprocess
import sys

import pytest

LOAD = "from encoders.backbone import Backbone; Backbone.from_pretrained(); print('loaded')"
QUIET = "from pipelines.logs import configure_logging; configure_logging()"


def run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert "loaded" in done.stdout
    return done.stdout + done.stderr


def test_without_the_setup_transformers_reports_the_load():
    """MiniLM's checkpoint has a pooler the backbone does not load: the report the setup exists to silence."""
    assert "LOAD REPORT" in run(LOAD)


@pytest.mark.parametrize(
    "code",
    [f"{QUIET}; {LOAD}", f"import transformers; {QUIET}; {LOAD}"],
    ids=["transformers-imported-after", "transformers-imported-before"],
)
def test_configure_logging_silences_the_load_report(code):
    """Not imported yet: through transformers' environment variables; already imported: through its logging API."""
    assert "LOAD REPORT" not in run(code)

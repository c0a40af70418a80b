"""Logging setup shared by the `memvq` command line and the bench scripts: one line format, and the libraries'
chatter (transformers' load reports and progress bars, httpx's request lines) kept out of progress output and
printed tables unless `verbose`."""

from __future__ import annotations

import logging
import os
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Below `verbose`, these libraries' loggers say only this much: httpx's request lines, faiss's report of which of
# its builds it loaded, Ray's notice that a local cluster uses token authentication.
QUIET_LOGGERS = {
    "httpx": logging.WARNING,
    "faiss.loader": logging.WARNING,
    "ray._private.authentication.authentication_token_setup": logging.ERROR,
}


def configure_logging(level: int = logging.INFO, *, verbose: bool = False) -> None:
    """Log at `level` (DEBUG with `verbose`) in one format. Below `verbose`, transformers says only errors and
    shows no progress bars (set through its environment variables when it is not imported yet, so that neither
    this process nor its children import it just to be quiet; a value the user set wins), the `QUIET_LOGGERS` no
    more than their level."""
    logging.basicConfig(level=logging.DEBUG if verbose else level, format=FORMAT)
    if verbose:
        return
    for name, quiet in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(quiet)
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    else:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

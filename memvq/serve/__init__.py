"""The HTTP query API (`memvq serve`): app, wire schema, guards, dynamic batcher, Prometheus metrics, runner, Ray
Serve replicas. `create_app`, `serve` and `ServeSettings` are imported on first use (the command line reads the
settings without loading the server)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {"ServeSettings": "settings", "create_app": "app", "serve": "runner"}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from memvq.serve.app import create_app as create_app
    from memvq.serve.runner import serve as serve
    from memvq.serve.settings import ServeSettings as ServeSettings


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)

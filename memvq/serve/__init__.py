"""The HTTP query API (`memvq serve`): app, wire schema, guards, dynamic batcher, Prometheus metrics, runner."""

from pipelines.serve.app import create_app
from pipelines.serve.runner import serve
from pipelines.serve.settings import ServeSettings

__all__ = ["ServeSettings", "create_app", "serve"]

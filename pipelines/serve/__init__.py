"""The HTTP query API (`memvq serve`): app, wire schema, guards, dynamic batcher, Prometheus metrics."""

from pipelines.serve.app import create_app
from pipelines.serve.settings import ServeSettings

__all__ = ["ServeSettings", "create_app"]

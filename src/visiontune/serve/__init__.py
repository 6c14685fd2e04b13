"""HTTP serving: ``visiontune serve MODEL`` (FastAPI + uvicorn, dynamic batching, a web page).

Example:
    from visiontune.serve import ServeSettings, create_app
    app = create_app("runs/train-1", ServeSettings(max_batch=8))
"""

from __future__ import annotations

from .settings import ServeSettings


def create_app(model, settings: ServeSettings | None = None):
    """Build the FastAPI app; see :func:`visiontune.serve.app.create_app`."""
    from .app import create_app as _create_app  # lazy: ServeSettings alone (the CLI) needs no FastAPI

    return _create_app(model, settings)


__all__ = ["ServeSettings", "create_app"]

"""``visiontune serve MODEL``: flags generated from :class:`ServeSettings`, then :func:`serve`."""

from __future__ import annotations

import argparse

from ..serve.settings import ServeSettings
from .common import add_options, options_from_args


def register(sub) -> None:
    p = sub.add_parser("serve", help="HTTP API + web page for a trained model (dynamic batching)")
    p.add_argument("model", help="run dir, model/ dir, .onnx file or OpenVINO model (folder or .xml)")
    add_options(p, ServeSettings)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve MODEL until SIGINT/SIGTERM (uvicorn finishes in-flight requests, the batcher drains).

    Example:
        $ visiontune serve runs/train-1 --port 8000
    """
    from ..serve.server import serve  # lazy: the parser builds without uvicorn, FastAPI and torch

    serve(args.model, **options_from_args(args).to_dict())
    return 0

"""``visiontune serve MODEL``: flags into :class:`ServeSettings`, then uvicorn."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from ..core.errors import ConfigError
from ..serve.settings import API_KEY_ENV, ServeSettings, is_loopback
from .common import add_backend_argument


def register(sub) -> None:
    p = sub.add_parser("serve", help="HTTP API + web page for a trained model (dynamic batching)")
    p.add_argument("model", help="run dir, model/ dir, .onnx file or OpenVINO model (folder or .xml)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (127.0.0.1); others need --api-key")
    p.add_argument("--port", type=int, default=8000, help="TCP port (8000)")
    p.add_argument("--max-batch", type=int, default=16, metavar="N", help="images per forward pass (16)")
    p.add_argument("--max-wait-ms", type=float, default=10.0, metavar="MS",
                   help="longest wait for a batch to fill (10)")
    p.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="images waiting at most; beyond it 503 + Retry-After (64)")
    p.add_argument("--timeout-s", type=float, default=10.0, metavar="S", help="per-request timeout -> 504 (10)")
    p.add_argument("--max-body-mb", type=float, default=10.0, metavar="MB", help="request body limit -> 413 (10)")
    p.add_argument("--max-pixels", type=float, default=40.0, metavar="MP",
                   help="largest upload in megapixels, read from the image header before decoding -> 413 (40)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help=f"require X-API-Key: KEY on /v1/* (visible to other users in `ps`: prefer ${API_KEY_ENV} "
                        "or --api-key-file)")
    p.add_argument("--api-key-file", default=None, metavar="PATH",
                   help="read the API key from the first line of PATH")
    p.add_argument("--workers-threads", type=int, default=None, metavar="N",
                   help="image-decoding threads (default: CPU count)")
    p.add_argument("--nice", type=int, default=10, metavar="N",
                   help="run inference and decoding N steps below the HTTP event loop's CPU priority, so "
                        "503s and health checks stay fast when the CPU is saturated (10; 0: off; Linux)")
    p.add_argument("--precision", default="auto", choices=("auto", "32", "bf16"), help="inference precision")
    p.add_argument("--reject-below", type=float, default=None, metavar="P",
                   help="label 'unknown' when the (calibrated) top probability is below P")
    add_backend_argument(p)
    p.add_argument("--model-name", default="visiontune", metavar="NAME",
                   help="the model's name in the Open Inference Protocol's /v2/models/NAME routes (visiontune)")
    p.set_defaults(func=cmd_serve)


def api_key_from_args(args: argparse.Namespace) -> str | None:
    """--api-key, else --api-key-file's first line, else $VISIONTUNE_API_KEY (None: no key)."""
    if args.api_key and args.api_key_file:
        raise ConfigError("give --api-key or --api-key-file, not both")
    if args.api_key:
        print(f"visiontune: warning: --api-key is visible to every user of this machine in `ps`; prefer "
              f"${API_KEY_ENV} or --api-key-file", file=sys.stderr)
        return args.api_key
    if args.api_key_file:
        try:
            key = Path(args.api_key_file).read_text(encoding="utf-8").splitlines()[0].strip()
        except (OSError, UnicodeDecodeError, IndexError) as exc:
            why = {IndexError: "empty file", UnicodeDecodeError: "not UTF-8 text"}.get(type(exc)) or exc.strerror
            raise ConfigError(f"cannot read an API key from --api-key-file {args.api_key_file}: {why}; "
                              "write the key on its first line") from None
        if not key:
            raise ConfigError(f"--api-key-file {args.api_key_file} has an empty first line; write the key there")
        return key
    return os.environ.get(API_KEY_ENV) or None


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    return ServeSettings(
        max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
        timeout_s=args.timeout_s, max_body_mb=args.max_body_mb, max_pixels=int(args.max_pixels * 1e6),
        api_key=api_key_from_args(args),
        workers_threads=args.workers_threads or max(1, os.cpu_count() or 1),
        precision=args.precision, reject_below=args.reject_below, niceness=args.nice,
        model_name=model_name_from_args(args), backend=args.backend)


def model_name_from_args(args: argparse.Namespace) -> str:
    """--model-name, checked: it becomes a URL path segment."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", args.model_name):
        raise ConfigError(f"--model-name {args.model_name!r}: use 1-64 letters, digits, '_', '.' or '-', "
                          "starting with a letter or digit")
    return args.model_name


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve MODEL until SIGINT/SIGTERM (uvicorn finishes in-flight requests, the batcher drains).

    Example:
        $ visiontune serve runs/train-1 --port 8000
    """
    settings = settings_from_args(args)
    if not is_loopback(args.host) and not settings.api_key:
        raise ConfigError(f"binding {args.host} (not loopback) needs --api-key or ${API_KEY_ENV}")
    if not Path(args.model).exists():
        raise ConfigError(f"no model at {args.model}")
    import uvicorn  # lazy: the parser builds without uvicorn, FastAPI and torch

    from ..serve.app import create_app
    from ..serve.server import raise_fd_limit, server_config

    app = create_app(args.model, settings)
    print(f"visiontune: serving {args.model} on http://{args.host}:{args.port}/ (docs: /docs)", file=sys.stderr)
    raise_fd_limit()  # before the connection limit is read from it
    uvicorn.Server(server_config(app, settings, args.host, args.port)).run()
    return 0

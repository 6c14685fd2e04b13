"""``visiontune export`` and ``visiontune compress``: flags generated from their options dataclasses."""

from __future__ import annotations

import argparse

from ..export.export_options import CompressOptions, ExportOptions
from .common import add_options, options_from_args


def register(sub) -> None:
    p = sub.add_parser("export", help="export a trained model to ONNX / OpenVINO / TorchScript / timm-HF, "
                                      "parity-checked")
    p.add_argument("model", help="run dir or model/ dir")
    add_options(p, ExportOptions)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("compress", help="int8-quantize and/or channel-prune a model; compare every variant")
    p.add_argument("model", help="run dir or model/ dir")
    add_options(p, CompressOptions)
    p.set_defaults(func=cmd_compress)


def cmd_export(args: argparse.Namespace) -> int:
    from ..export.exporter import export_model  # lazy: the parser builds without torch

    export_model(args.model, log=print, **options_from_args(args).to_dict())
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from ..export.compress import compress  # lazy: as above

    compress(args.model, **options_from_args(args).to_dict())
    return 0

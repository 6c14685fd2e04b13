"""``visiontune report`` and ``visiontune data check``: flags generated from their options dataclasses."""

from __future__ import annotations

import argparse
import json

from ..evaluation.report_options import DataCheckOptions, ReportOptions
from .common import add_options, options_from_args


def register(sub, parser_class) -> None:
    p = sub.add_parser("report", help="write RUN/report.html: data, errors, Grad-CAM, calibration (self-contained)")
    p.add_argument("run", help="run dir from visiontune train")
    add_options(p, ReportOptions)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("data", help="dataset tools: data check")
    data_sub = p.add_subparsers(dest="data_command", required=True, parser_class=parser_class)
    c = data_sub.add_parser("check", help="find corrupt files, duplicates, leakage, imbalance and likely label errors")
    c.add_argument("data", help="DATA/<class>/*, DATA/{train,val[,test]}/<class>/*, or a CSV of path,label / "
                                "path,labels / one-hot rows")
    c.add_argument("--json", action="store_true", help="print one JSON object (how the result is shown)")
    c.add_argument("--strict", action="store_true", help="exit 1 when errors are found (unreadable files, leaks)")
    add_options(c, DataCheckOptions)
    c.set_defaults(func=cmd_data_check)


def cmd_report(args: argparse.Namespace) -> int:
    from ..evaluation.report import write_report  # lazy: the parser builds without torch

    print(f"report: {write_report(args.run, **options_from_args(args).to_dict())}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from ..evaluation.data_check import check_data, format_check  # lazy: as above

    report = check_data(args.data, **options_from_args(args).to_dict())
    print(json.dumps(report) if args.json else format_check(report))
    return 1 if args.strict and not report["ok"] else 0

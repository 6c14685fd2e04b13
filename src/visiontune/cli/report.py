"""``visiontune report`` and ``visiontune data check``."""

from __future__ import annotations

import argparse
import json

from ..training.registry import TASKS


def register(sub, parser_class) -> None:
    p = sub.add_parser("report", help="write RUN/report.html: data, errors, Grad-CAM, calibration (self-contained)")
    p.add_argument("run", help="run dir from visiontune train")
    p.add_argument("--data", metavar="DIR|CSV", default=None,
                   help="evaluate on this labelled folder/CSV instead of the run's validation split")
    p.add_argument("--no-gradcam", dest="gradcam", action="store_false", help="skip the Grad-CAM overlays")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="images per batch (32)")
    p.add_argument("--workers", type=int, default=None, metavar="N", help="decoding processes (default: one per core)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("data", help="dataset tools: data check")
    data_sub = p.add_subparsers(dest="data_command", required=True, parser_class=parser_class)
    c = data_sub.add_parser("check", help="find corrupt files, duplicates, leakage, imbalance and likely label errors")
    c.add_argument("data", help="DATA/<class>/*, DATA/{train,val[,test]}/<class>/*, or a CSV of path,label / "
                                "path,labels / one-hot rows")
    c.add_argument("--task", choices=TASKS.names(), default="auto", help="single- or multi-label: " + TASKS.describe())
    c.add_argument("--label-delim", default=" ", metavar="SEP",
                   help="separator of the labels in one cell of a path,labels CSV (a space)")
    c.add_argument("--val", metavar="DIR|CSV", default=None, help="separate validation folder/CSV (leakage check)")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.add_argument("--strict", action="store_true", help="exit 1 when errors are found (unreadable files, leaks)")
    c.add_argument("--min-size", type=int, default=32, metavar="PX", help="flag images smaller than this (32)")
    c.add_argument("--min-per-class", type=int, default=10, metavar="N", help="flag classes with fewer images (10)")
    c.add_argument("--near-threshold", type=int, default=4, metavar="BITS",
                   help="near-duplicate: dHash Hamming distance at most this (4 of 64; -1 disables)")
    c.add_argument("--no-label-check", dest="label_check", action="store_false",
                   help="skip the label-error search (no backbone features)")
    c.add_argument("--model", default="efficientnet_lite0", metavar="NAME", help="backbone for the label check")
    c.add_argument("--img-size", type=int, default=None, metavar="N", help="backbone input size (its default)")
    c.add_argument("--cache-dir", default=None, metavar="PATH", help="feature cache folder")
    c.add_argument("--seed", type=int, default=0, metavar="N", help="cross-validation seed (0)")
    c.add_argument("--workers", type=int, default=None, metavar="N", help="decoding processes")
    c.set_defaults(func=cmd_data_check)


def cmd_report(args: argparse.Namespace) -> int:
    from ..evaluation.report import write_report  # lazy: the parser builds without torch

    path = write_report(args.run, data=args.data, batch_size=args.batch_size, workers=args.workers,
                        gradcam=args.gradcam)
    print(f"report: {path}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from ..evaluation.data_check import check_data, format_check  # lazy: as above

    report = check_data(args.data, val=args.val, min_size=args.min_size, min_per_class=args.min_per_class,
                        near_threshold=args.near_threshold, label_issues=args.label_check, model=args.model,
                        img_size=args.img_size, cache_dir=args.cache_dir, seed=args.seed, workers=args.workers,
                        task=args.task, label_delim=args.label_delim)
    print(json.dumps(report) if args.json else format_check(report))
    return 1 if args.strict and not report["ok"] else 0

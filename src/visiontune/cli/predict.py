"""``visiontune evaluate`` and ``visiontune predict``."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError
from .common import add_backend_argument, add_loader_arguments

MODEL_HELP = "run dir, model/ dir, pruned model dir, exported .onnx or OpenVINO model (folder or .xml)"


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="score a trained model on labelled images")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("data", help="class folders, a train/val/test layout (uses test, else val) or a CSV")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--label-delim", default=" ", metavar="SEP",
                   help="multi-label CSVs: separator of the labels in one cell (a space)")
    p.add_argument("--no-save", action="store_true", help="do not write confusion_matrix.png / misclassified.csv")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="folder for confusion_matrix.png / misclassified.csv (default: next to the model)")
    tta = p.add_mutually_exclusive_group()
    tta.add_argument("--tta", dest="tta", action="store_true", default=None,
                     help="average each image's logits with its mirror image's (default: as the model was trained)")
    tta.add_argument("--no-tta", dest="tta", action="store_false", help="score single views")
    add_loader_arguments(p)
    add_backend_argument(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="classify image files, folders or globs")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("inputs", nargs="+", help="files, folders (recursive) or glob patterns")
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="labels/probabilities per image (5)")
    p.add_argument("--out", metavar="FILE", help="write FILE.csv or FILE.json instead of CSV on stdout")
    p.add_argument("--explain", action="store_true",
                   help="also write a Grad-CAM overlay PNG per input (next to --out, in gradcam/)")
    p.add_argument("--resume", action="store_true", help="with --out FILE.csv: skip inputs already written")
    p.add_argument("--csv-safe", action="store_true",
                   help="prefix CSV cells starting with = + - @ with ' so spreadsheets show them as text, not "
                        "formulas (file or class names from strangers)")
    p.add_argument("--processes", type=int, default=1, metavar="N",
                   help="with --out FILE.csv: shard inputs over N processes (output order unchanged)")
    p.add_argument("--devices", dest="processes", type=int, help=argparse.SUPPRESS)  # the name before 0.2
    p.add_argument("--reject-below", type=float, default=None, metavar="P",
                   help="label 'unknown' when the (calibrated) top probability is below P (single-label models)")
    p.add_argument("--threshold", type=float, default=None, metavar="P",
                   help="multi-label models: every label with probability >= P (default: the per-label thresholds "
                        "tuned on val, in model.json)")
    p.add_argument("--label-delim", default=" ", metavar="SEP",
                   help="multi-label models: separator of the labels in the CSV's labels column (a space)")
    add_loader_arguments(p)
    add_backend_argument(p)
    p.set_defaults(func=cmd_predict)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..evaluation.evaluate import evaluate  # lazy: the parser builds without torch
    from ..export.runtime import load_classifier

    clf = load_classifier(args.model, args.precision, args.tta, args.backend, log=_stderr)
    result = evaluate(clf, args.data, batch_size=args.batch_size, workers=args.workers, save=not args.no_save,
                      label_delim=args.label_delim, out=args.out)
    print(json.dumps(result) if args.json else format_evaluation(result))
    return 0


def format_evaluation(result: dict[str, Any]) -> str:
    if result.get("task") == "multi":
        return format_multilabel_evaluation(result)
    lines = [f"images: {result['num_samples']}   accuracy: {result['accuracy']:.4f}"
             + (f"   top-5: {result['top5_accuracy']:.4f}" if "top5_accuracy" in result else "")
             + f"   macro F1: {result['macro_f1']:.4f}"]
    width = max(len(n) for n in result["class_names"]) + 2
    lines.append(f"{'class':<{width}}precision  recall     f1  support")
    for name, m in result["per_class"].items():
        lines.append(f"{name:<{width}}{m['precision']:9.3f}{m['recall']:8.3f}{m['f1']:7.3f}{m['support']:9d}")
    if result.get("skipped"):
        lines.append(f"skipped {len(result['skipped'])} unreadable file(s)")
    return "\n".join(lines)


def format_multilabel_evaluation(result: dict[str, Any]) -> str:
    lines = [f"images: {result['num_samples']}   macro mAP: {result['macro_map']:.4f}   micro mAP: "
             f"{result['micro_map']:.4f}   macro F1: {result['macro_f1']:.4f}   micro F1: {result['micro_f1']:.4f}",
             f"subset accuracy: {result['subset_accuracy']:.4f}   Hamming loss: {result['hamming_loss']:.4f}   "
             f"labels per image: {result['label_cardinality']['predicted']:.2f} predicted, "
             f"{result['label_cardinality']['true']:.2f} true"]
    width = max(len(n) for n in result["class_names"]) + 2
    lines.append(f"{'label':<{width}}     AP  threshold  precision  recall     f1  support")
    for name, m in result["per_label"].items():
        lines.append(f"{name:<{width}}{m['ap']:7.3f}{m['threshold']:11.3f}{m['precision']:11.3f}{m['recall']:8.3f}"
                     f"{m['f1']:7.3f}{m['support']:9d}")
    if result.get("skipped"):
        lines.append(f"skipped {len(result['skipped'])} unreadable file(s)")
    return "\n".join(lines)


def cmd_predict(args: argparse.Namespace) -> int:
    # lazy: the parser builds without torch
    from ..evaluation.gradcam import explain
    from ..export.runtime import prepare_for
    from ..inference.bulk import predict_to_csv
    from ..inference.classifier import Classifier, expand_inputs
    from ..inference.rows import csv_cells, csv_header

    inputs = expand_inputs(args.inputs)
    if not inputs:
        raise ConfigError(f"no input files found in {args.inputs}")
    if args.threshold is not None or args.reject_below is not None:  # before --explain or any output file
        Classifier.load(args.model, precision="32").decision_thresholds(args.reject_below, args.threshold)
    if args.explain:
        cam_dir = (Path(args.out).parent if args.out else Path(".")) / "gradcam"
        written = explain(Classifier.load(args.model, precision="32"), inputs, cam_dir)
        print(f"wrote {len(written)} Grad-CAM overlay(s) to {cam_dir}", file=sys.stderr)
    sharded = args.processes > 1 and args.out and not args.out.endswith(".json")  # shards run eager PyTorch
    prepare_for(args.model, args.precision, "eager" if sharded else args.backend, log=_stderr)
    if args.out and not args.out.endswith(".json"):  # streamed, incremental, resumable
        n, bad = predict_to_csv(args.model, inputs, Path(args.out), args.top_k, args.batch_size, args.workers,
                                args.precision, args.reject_below, args.resume, args.processes, args.threshold,
                                args.label_delim, args.csv_safe, backend="eager" if sharded else args.backend)
        print(f"predicted {n - bad} image(s)" + (f", {bad} unreadable" if bad else "") + f"; wrote {args.out}",
              file=sys.stderr)
        return 0
    clf = Classifier.load(args.model, precision=args.precision, backend=args.backend)
    rows = clf.predict(inputs, top_k=args.top_k, batch_size=args.batch_size, workers=args.workers,
                       progress=sys.stderr.isatty(), reject_below=args.reject_below, threshold=args.threshold)
    out = args.out
    if out and out.endswith(".json"):
        Path(out).write_text(json.dumps(rows, indent=1) + "\n")
    else:
        k = min(args.top_k, len(clf.class_names))
        names = clf.class_names if clf.multi_label else None
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(csv_header(k, names))
        writer.writerows(csv_cells(r, k, names, args.label_delim, args.csv_safe) for r in rows)
        if out:
            Path(out).write_text(buf.getvalue())
        else:
            sys.stdout.write(buf.getvalue())
    bad = sum(1 for r in rows if r["error"])
    print(f"predicted {len(rows) - bad} image(s)" + (f", {bad} unreadable" if bad else "")
          + (f"; wrote {out}" if out else ""), file=sys.stderr)
    return 0


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)

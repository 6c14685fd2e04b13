"""``visiontune evaluate`` and ``visiontune predict``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..pipeline.scoring import EvaluateOptions, PredictOptions
from .common import add_options, options_from_args

MODEL_HELP = "run dir, model/ dir, pruned model dir, exported .onnx or OpenVINO model (folder or .xml)"


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="score a trained model on labelled images")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("data", help="class folders, a train/val/test layout (uses test, else val) or a CSV")
    p.add_argument("--json", action="store_true", help="print one JSON object (how the result is shown)")
    add_options(p, EvaluateOptions)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="classify image files, folders or globs")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("inputs", nargs="+", help="files, folders (recursive) or glob patterns")
    add_options(p, PredictOptions)
    p.set_defaults(func=cmd_predict)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..pipeline.scoring import evaluate  # lazy: the parser builds without torch

    result = evaluate(args.model, args.data, log=_stderr, **options_from_args(args).to_dict())
    print(json.dumps(result) if args.json else format_evaluation(result, result.get("task", "single")))
    if "unknown" in result and not args.json:
        from ..evaluation.unknown_metrics import format_unknown

        print(format_unknown(result["unknown"]))
    return 0


def format_evaluation(result: dict[str, Any], task: str) -> str:
    """``visiontune evaluate``'s table of ``result``, an evaluation of a model of the task named ``task``."""
    try:
        form = EVALUATION_FORMATS[task]
    except KeyError:
        raise ValueError(f"no evaluation table for task {task!r}: known tasks are {list(EVALUATION_FORMATS)}") from None
    return form(result)


def format_single_label_evaluation(result: dict[str, Any]) -> str:
    lines = [f"images: {result['num_samples']}   accuracy: {result['accuracy']:.4f}"
             + (f"   top-5: {result['top5_accuracy']:.4f}" if "top5_accuracy" in result else "")
             + f"   macro F1: {result['macro_f1']:.4f}"
             + (f"   calibration error (ECE): {result['ece']:.4f}" if "ece" in result else "")]
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


#: How ``visiontune evaluate`` prints a result, by the model's task (:attr:`visiontune.task.Task.name`).
EVALUATION_FORMATS = {"single": format_single_label_evaluation, "multi": format_multilabel_evaluation}


def cmd_predict(args: argparse.Namespace) -> int:
    from ..pipeline.scoring import predict, predictions_csv  # lazy: the parser builds without torch

    opts = options_from_args(args)
    result = predict(args.model, args.inputs, log=_stderr, **opts.to_dict())
    if result.rows is not None and not result.out:
        sys.stdout.write(predictions_csv(result, opts.top_k, opts.label_delim, opts.csv_safe))
    print(f"predicted {result.predicted} image(s)" + (f", {result.unreadable} unreadable" if result.unreadable
                                                       else "") + (f"; wrote {result.out}" if result.out else ""),
          file=sys.stderr)
    return 0


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)

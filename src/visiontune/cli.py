"""``visiontune`` command line: parses flags into the Python API and calls it, nothing more."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import warnings
from pathlib import Path
from typing import Any

from .config import CHOICES, ConfigError, TrainConfig, read_yaml

TRAIN_HELP = {
    "val": "explicit validation folder or CSV (default: DATA/val, else a stratified split of DATA)",
    "val_fraction": "share of each class held out for validation when DATA has no val split (0.2)",
    "model": "timm name, torchvision:NAME, or the embedded offline default efficientnet_lite0",
    "weights": "default (pretrained: embedded or hub download) | none | PATH to a local .safetensors/.pth",
    "img_size": "input size in pixels (default: the backbone's pretrained config)",
    "resize_mode": "crop (resize + centre crop) | letterbox (keep the whole image, pad) | squash",
    "strategy": "finetune | linear-probe | progressive | scratch",
    "head": "linear-probe head: linear (gradient) | logistic | svm (scikit-learn on features)",
    "freeze_epochs": "epochs training only the head before the body is unfrozen (1)",
    "unfreeze_every": "progressive: epochs between unfreezing one more layer group (auto)",
    "bn_stats": "BatchNorm running statistics of trainable layers: train (update) | frozen (keep pretrained)",
    "lr_mult": "head LR / body LR for discriminative learning rates (10)",
    "epochs": "training epochs (10)",
    "batch_size": "images per batch (32)",
    "lr": "head learning rate (default: 1e-3 for adam/adamw, 1e-2 for sgd)",
    "optimizer": "adamw | adam | sgd",
    "weight_decay": "weight decay (0.01)",
    "momentum": "SGD momentum (0.9)",
    "schedule": "cosine | step | none (per step, after warm-up)",
    "warmup_epochs": "linear LR warm-up, in epochs (0)",
    "step_size": "step schedule: epochs between x0.1 decays (3)",
    "label_smoothing": "label smoothing of the cross-entropy loss (0.1)",
    "augment": "none | light (flip) | standard (random resized crop + flip) | strong (+ TrivialAugment, erasing)",
    "balance": "class imbalance: none | weights (class-weighted loss) | sampler (balanced sampling)",
    "select_metric": "metric choosing the best epoch (and early stopping): accuracy | macro_f1 | balanced_accuracy",
    "early_stopping": "stop after this many epochs without val accuracy improvement",
    "seed": "random seed for the split, init and data order (0)",
    "precision": "auto (bf16 where the hardware makes it pay) | 32 | bf16 | 16",
    "workers": "data-loading processes (default: one per core, up to 8)",
    "devices": "devices (GPUs, or CPU processes) per node; >1 trains with DDP (1)",
    "num_nodes": "machines in a multi-node run (torchrun / SLURM; see README) (1)",
    "strategy_dist": "distributed strategy: auto | ddp (gloo on CPU, nccl on GPU) | ddp_spawn",
    "logger": "csv | tensorboard (written under RUN/logs)",
    "run_dir": "where to write the run (default: runs/train-N, never overwriting)",
    "resume": "continue an interrupted run from its last epoch checkpoint",
    "checkpoint_every_steps": "also checkpoint every N optimizer steps (resume mid-epoch)",
    "auto_batch_size": "find the largest batch size that fits (Lightning tuner; capped at 1/4 of the data)",
    "compile": "torch.compile the model for training (opt-in: compiling takes minutes)",
    "cache_images": "decode and pre-resize every image once, in memory, for all epochs",
    "cache_dir": "feature cache folder (default: $VISIONTUNE_CACHE or ~/.cache/visiontune)",
    "cached_views": "augmented views cached per image for frozen-backbone epochs (1: un-augmented)",
    "limit_train_batches": "train on this many batches (int) or share (float) per epoch; for smoke tests",
    "limit_val_batches": "validate on this many batches (int) or share (float); for smoke tests",
}


METAVARS = {"val": "DIR|CSV", "cache_dir": "PATH", "weights": "default|none|PATH", "run_dir": "PATH", "resume": "RUN_DIR"}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", nargs="?", help="DATA/<class>/*, DATA/{train,val[,test]}/<class>/*, or a path,label CSV")
    parser.add_argument("--config", help="YAML file of options (flags given here override it)")
    types = {"val_fraction": float, "lr_mult": float, "lr": float, "weight_decay": float, "momentum": float,
             "warmup_epochs": float, "label_smoothing": float, "limit_train_batches": _int_or_float,
             "limit_val_batches": _int_or_float}
    for f in TrainConfig.__dataclass_fields__.values():
        if f.name in ("data", "progress", "report"):
            continue
        if f.type == "bool":
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, action="store_true",
                                default=argparse.SUPPRESS, help=TRAIN_HELP.get(f.name))
            continue
        flag = "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": TRAIN_HELP.get(f.name)}
        if f.name in CHOICES:
            kwargs["choices"] = CHOICES[f.name]
            kwargs["metavar"] = "{" + ",".join(CHOICES[f.name]) + "}"
        elif f.name in types:
            kwargs["type"] = types[f.name]
            kwargs["metavar"] = "X"
        elif f.type in ("int", "int | None"):
            kwargs["type"] = int
            kwargs["metavar"] = "N"
        else:
            kwargs["metavar"] = METAVARS.get(f.name, "NAME")
        parser.add_argument(flag, **kwargs)
    parser.add_argument("--no-report", dest="report", action="store_false", default=argparse.SUPPRESS,
                        help="do not write RUN/report.html at the end")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=argparse.SUPPRESS,
                        help="no progress bars (epoch lines are still printed)")


def _int_or_float(text: str) -> int | float:
    return float(text) if "." in text else int(text)


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    values: dict[str, Any] = read_yaml(args.config) if getattr(args, "config", None) else {}
    given = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__ and v is not None}
    values.update(given)
    if not values.get("data") and not values.get("resume"):
        raise ConfigError("give DATA (a folder or a path,label CSV), or --resume RUN_DIR")
    return TrainConfig.from_dict(values)


def cmd_train(args: argparse.Namespace) -> int:
    from .training.runner import run_training

    from .hardware import is_rank_zero

    run = run_training(train_config_from_args(args))
    if is_rank_zero():
        print(f"run: {run.run_dir}")
    return 0


def cmd_lr_find(args: argparse.Namespace) -> int:
    from .training.lr_find import lr_find

    _, run_dir = lr_find(train_config_from_args(args), num_training=args.steps)
    print(f"run: {run_dir}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation.evaluate import evaluate
    from .export.onnx_runtime import load_any

    clf = load_any(args.model, precision=args.precision)
    result = evaluate(clf, args.data, batch_size=args.batch_size, workers=args.workers, save=not args.no_save)
    if args.json:
        print(json.dumps(result))
        return 0
    print(format_evaluation(result))
    return 0


def format_evaluation(result: dict[str, Any]) -> str:
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


def cmd_predict(args: argparse.Namespace) -> int:
    from .evaluation.predictor import Classifier, expand_inputs

    inputs = expand_inputs(args.inputs)
    if not inputs:
        raise ConfigError(f"no input files found in {args.inputs}")
    if args.explain:
        from .evaluation.gradcam import explain

        cam_dir = (Path(args.out).parent if args.out else Path(".")) / "gradcam"
        written = explain(Classifier.load(args.model, precision="32"), inputs, cam_dir)
        print(f"wrote {len(written)} Grad-CAM overlay(s) to {cam_dir}", file=sys.stderr)
    if args.out and not args.out.endswith(".json"):  # streamed, incremental, resumable
        from .evaluation.bulk import predict_to_csv

        n, bad = predict_to_csv(args.model, inputs, Path(args.out), args.top_k, args.batch_size, args.workers,
                                args.precision, args.reject_below, args.resume, args.devices)
        print(f"predicted {n - bad} image(s)" + (f", {bad} unreadable" if bad else "") + f"; wrote {args.out}",
              file=sys.stderr)
        return 0
    from .export.onnx_runtime import load_any

    clf = load_any(args.model, precision=args.precision)
    rows = clf.predict(inputs, top_k=args.top_k, batch_size=args.batch_size, workers=args.workers,
                       progress=sys.stderr.isatty(), reject_below=args.reject_below)
    out = args.out
    if out and out.endswith(".json"):
        Path(out).write_text(json.dumps(rows, indent=1) + "\n")
    else:
        text = rows_to_csv(rows, min(args.top_k, len(clf.class_names)))
        if out:
            Path(out).write_text(text)
        else:
            sys.stdout.write(text)
    bad = sum(1 for r in rows if r["error"])
    print(f"predicted {len(rows) - bad} image(s)" + (f", {bad} unreadable" if bad else "")
          + (f"; wrote {out}" if out else ""), file=sys.stderr)
    return 0


def rows_to_csv(rows: list[dict[str, Any]], k: int) -> str:
    from .evaluation.bulk import csv_cells, csv_header

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(csv_header(k))
    writer.writerows(csv_cells(r, k) for r in rows)
    return buf.getvalue()


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(run_dir=args.run_dir, epochs=args.epochs)
    return 0


class _StrictParser(argparse.ArgumentParser):
    """No abbreviated flags; an unknown flag fails naming the closest valid one."""

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        parsed, extra = super().parse_known_args(args, namespace)
        flags = [a for a in extra if a.startswith("--")]
        if flags:
            import difflib

            options = [o for action in self._actions for o in action.option_strings if o.startswith("--")]
            close = difflib.get_close_matches(flags[0].split("=")[0], options, n=1, cutoff=0.75)
            hint = f"; did you mean {close[0]}?" if close else f"; see {self.prog} --help"
            self.error(f"unknown option {flags[0]}{hint}")
        return parsed, extra

    def error(self, message: str):
        # one line with the remedy, not the whole usage block
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_loader_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per batch (64)")
    p.add_argument("--workers", type=int, default=None, metavar="N", help="decoding processes (default: one per core)")
    p.add_argument("--precision", default="auto", choices=("auto", "32", "bf16", "16"), metavar="{auto,32,bf16,16}",
                   help="inference precision; auto: bf16 where the hardware makes it pay")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visiontune", allow_abbrev=False,
                                     description="Transfer-learn an image classifier from a folder of labelled images.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_StrictParser)

    p = sub.add_parser("train", help="fine-tune a pretrained classifier on a folder of images")
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("lr-find", help="learning-rate range test: plot loss vs LR and suggest --lr")
    add_train_arguments(p)
    p.add_argument("--steps", type=int, default=100, metavar="N", help="optimizer steps in the sweep (100)")
    p.set_defaults(func=cmd_lr_find)

    p = sub.add_parser("evaluate", help="score a trained model on labelled images")
    p.add_argument("model", help="run dir or model/ dir")
    p.add_argument("data", help="class folders, a train/val/test layout (uses test, else val) or a CSV")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-save", action="store_true", help="do not write confusion_matrix.png / misclassified.csv")
    add_loader_arguments(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="classify image files, folders or globs")
    p.add_argument("model", help="run dir or model/ dir")
    p.add_argument("inputs", nargs="+", help="files, folders (recursive) or glob patterns")
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="labels/probabilities per image (5)")
    p.add_argument("--out", metavar="FILE", help="write FILE.csv or FILE.json instead of CSV on stdout")
    p.add_argument("--explain", action="store_true",
                   help="also write a Grad-CAM overlay PNG per input (next to --out, in gradcam/)")
    p.add_argument("--resume", action="store_true", help="with --out FILE.csv: skip inputs already written")
    p.add_argument("--devices", type=int, default=1, metavar="N",
                   help="with --out FILE.csv: shard inputs over N processes (output order unchanged)")
    p.add_argument("--reject-below", type=float, default=None, metavar="P",
                   help="label 'unknown' when the (calibrated) top probability is below P")
    add_loader_arguments(p)
    p.set_defaults(func=cmd_predict)

    from .report_cli import add_report_commands
    from .serve.cli import add_serve_command

    from .export.cli import add_export_commands

    add_report_commands(sub)
    add_export_commands(sub)
    add_serve_command(sub)

    p = sub.add_parser("demo", help="offline demo: fine-tune the embedded model on scikit-learn's digits")
    p.add_argument("--run-dir", default=None, metavar="PATH", help="where to write (default: runs/demo-N)")
    p.add_argument("--epochs", type=int, default=None, metavar="N", help="override the demo's 10 epochs")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .data.scan import DataError
    from .export.common import ExportError
    from .models import ArtifactError, ModelError, WeightsError
    from .training.lightning_fit import TrainingInterrupted

    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # Lightning internals, not actionable
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, ModelError, WeightsError, ArtifactError, ExportError) as exc:
        print(f"visiontune: error: {exc}", file=sys.stderr)
        return 2
    except TrainingInterrupted as exc:
        print(f"visiontune: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("visiontune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""Acceptance benchmark for issue 5: export parity + int8 + pruning on trained runs.

Usage:
    python bench/compress.py RUN_DIR [RUN_DIR ...] [--prune 0.3] [--prune-steps 2]
        [--finetune-epochs N ...] [--recovery-lr X ...]

For each run: ONNX export with parity check (RUN/export/onnx/export_report.json), then
``compress --quantize int8 --prune RATIO`` writing RUN/compress/compress_report.{json,md}, then
``compress --quantize int8 --int8-backend openvino`` (its OpenVINO fp32 and int8 rows join the table);
a summary of all runs goes to bench/compress_results.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from visiontune.core.errors import ExportError
from visiontune.export.compress import compress
from visiontune.export.exporter import export_model
from visiontune.export.variants import markdown_table


def bench_run(run: str, prune: float, steps: int, epochs: int, recovery_lr: float | None) -> str:
    parity = export_model(run, "onnx", dynamic_batch=True, check=False)
    try:
        report = compress(run, quantize="int8", prune=prune, prune_steps=steps, finetune_epochs=epochs,
                          recovery_lr=recovery_lr, force=True)
    except ExportError as exc:
        return f"## {run}\n\nfailed: {exc}\n"
    # the same int8 with the first conv and the classifier kept in float (--int8-float-ends)
    ends = compress(run, quantize="int8", force=True, int8_float_ends=True, out=Path(run) / "compress-int8-float-ends")
    row = ends["variants"][2]
    report["notes"].append(f"ONNX int8 with --int8-float-ends: val acc {row['val_accuracy']:.4f} "
                           f"({row['accuracy_change_pts']:+.2f} pt), "
                           f"{row['speedup_vs_eager_b32']:.2f}x eager fp32 at b32")
    # OpenVINO fp32 and NNCF int8 (compress --int8-backend openvino), measured next in this command
    vino = compress(run, quantize="int8", int8_backend="openvino", force=True, out=Path(run) / "compress-openvino")
    report["variants"] += [r for r in vino["variants"] if r["variant"].startswith("OpenVINO")]
    report["notes"] += [f"OpenVINO: {n}" for n in vino["notes"]]
    return (f"## {run}\n\nONNX fp32 parity on {parity['source']}: top-1 agreement {parity['top1_agreement']:.2%}, "
            f"max |logit diff| {parity['max_abs_logit_diff']:.2e}\n\n{markdown_table(report['variants'])}\n\n"
            + "\n".join(f"- {n}" for n in report["notes"]) + f"\n\nmachine: {report['machine']}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--prune", type=float, default=0.3)
    parser.add_argument("--prune-steps", type=int, default=2, help="pruning rounds")
    parser.add_argument("--finetune-epochs", type=int, nargs="*", default=[],
                        help="recovery epochs per round, per run in the order of RUN_DIRs (default 3)")
    parser.add_argument("--recovery-lr", type=float, nargs="*", default=[],
                        help="recovery LR per run, in the order of RUN_DIRs (default: compress's own)")
    parser.add_argument("--out", default=str(Path(__file__).with_name("compress_results.md")))
    args = parser.parse_args(argv)
    lrs = args.recovery_lr + [None] * (len(args.runs) - len(args.recovery_lr))
    epochs = args.finetune_epochs + [3] * (len(args.runs) - len(args.finetune_epochs))
    sections = [bench_run(run, args.prune, args.prune_steps, n, lr) for run, n, lr in zip(args.runs, epochs, lrs)]
    Path(args.out).write_text("# visiontune compress benchmark\n\n" + "\n".join(sections))
    print("\n".join(sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``visiontune export`` and ``visiontune compress``."""

from __future__ import annotations

import argparse

from ..export.registry import EXPORT_FORMATS, QUANTIZE_MODES


def register(sub) -> None:
    p = sub.add_parser("export", help="export a trained model to ONNX / OpenVINO / TorchScript / timm-HF, "
                                      "parity-checked")
    p.add_argument("model", help="run dir or model/ dir")
    p.add_argument("--format", default="onnx", choices=EXPORT_FORMATS.names(),
                   metavar="{" + ",".join(EXPORT_FORMATS) + "}", help=EXPORT_FORMATS.describe())
    p.add_argument("--out", default=None, metavar="PATH",
                   help="output file (folder for hf); default RUN/export/FORMAT/")
    p.add_argument("--dynamic-batch", action="store_true",
                   help="ONNX/OpenVINO: dynamic batch dimension (default: batch 1)")
    p.add_argument("--opset", type=int, default=17, metavar="N", help="ONNX opset version (17)")
    p.add_argument("--input", dest="input_dtype", default="float32", choices=("float32", "uint8"),
                   help="ONNX/OpenVINO input: float32 normalised NCHW (default), or uint8 NHWC RGB pixels at the "
                        "input size, scaled and normalised inside the graph (thin clients cannot get it wrong)")
    p.add_argument("--data", default=None, metavar="DIR|CSV",
                   help="labelled images for the parity check (default: the model's validation split)")
    p.add_argument("--parity-images", type=int, default=64, metavar="N", help="images in the parity check (64)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("compress", help="int8-quantize and/or channel-prune a model; compare every variant")
    p.add_argument("model", help="run dir or model/ dir")
    p.add_argument("--quantize", choices=QUANTIZE_MODES.names(), default=None,
                   metavar="{" + ",".join(QUANTIZE_MODES) + "}", help=QUANTIZE_MODES.describe())
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "openvino"),
                   help="int8 runtime: onnxruntime (ORT static QDQ, default) or openvino (NNCF post-training "
                        "quantization; the table adds OpenVINO fp32 beside ONNX Runtime's)")
    p.add_argument("--int8-float-ends", action="store_true",
                   help="static int8: keep the first conv and the classifier in float (when int8 flips decisions)")
    p.add_argument("--prune", type=float, default=None, metavar="RATIO", help="share of channels to remove, e.g. 0.3")
    p.add_argument("--finetune-epochs", type=int, default=3, metavar="N",
                   help="recovery epochs after each pruning round, distilled from the unpruned model "
                        "(3; 0: least-squares reconstruction alone, best for a few hundred images)")
    p.add_argument("--prune-steps", type=int, default=2, metavar="N",
                   help="pruning rounds, each removing an equal share then recovering (2)")
    p.add_argument("--recovery-lr", type=float, default=None, metavar="X",
                   help="learning rate of the recovery fine-tune (1e-3; 1e-4 suits a few hundred images)")
    p.add_argument("--calib", default=None, metavar="DATA", help="calibration images (default: the training split)")
    p.add_argument("--data", default=None, metavar="DIR|CSV", help="labelled val images (default: the val split)")
    p.add_argument("--out", default=None, metavar="PATH", help="output folder (default RUN/compress)")
    p.add_argument("--max-drop", type=float, default=1.0, metavar="PTS",
                   help="refuse an int8 model that changes more than this share of top-1 decisions on all "
                        "training + val images (it bounds the accuracy lost; multi-label: val macro mAP drop), in "
                        "points (1.0)")
    p.add_argument("--force", action="store_true", help="accept a larger drop (exit 0, report still says so)")
    p.add_argument("--bench-seconds", type=float, default=3.0, metavar="S", help="timing budget per measurement (3)")
    p.set_defaults(func=cmd_compress)


def cmd_export(args: argparse.Namespace) -> int:
    # lazy: the parser builds without torch
    from ..export.common import check_parity
    from ..export.exporter import export_model

    report = export_model(args.model, args.format, out=args.out, opset=args.opset, dynamic_batch=args.dynamic_batch,
                          data=args.data, parity_images=args.parity_images, check=False,
                          input_dtype=args.input_dtype)
    print(f"exported {report['format']}: {report['file']}")
    agreement = (f"top-1 agreement {report['top1_agreement']:.2%}" if "top1_agreement" in report
                 else f"per-label decision agreement {report['label_agreement']:.2%}")
    print(f"parity vs eager fp32 on {report['source']}: {agreement}, max |logit diff| "
          f"{report['max_abs_logit_diff']:.2e} ({report['max_rel_logit_diff']:.1e} of the logits' scale)")
    check_parity(report)  # after printing, so the failing numbers are visible
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from ..export.compress import compress  # lazy: as above

    compress(args.model, quantize=args.quantize, prune=args.prune, finetune_epochs=args.finetune_epochs,
             prune_steps=args.prune_steps, recovery_lr=args.recovery_lr, float_ends=args.int8_float_ends,
             calib=args.calib, data=args.data, out=args.out, max_drop=args.max_drop, force=args.force,
             budget_s=args.bench_seconds, backend=args.backend)
    return 0

"""``visiontune compress``: int8 quantization and/or structured pruning, with an accuracy guard
and a comparison table of every variant (eager fp32, ONNX fp32, [OpenVINO fp32], int8, pruned,
pruned+int8). int8 runs on ONNX Runtime (``--int8-backend onnxruntime``) or OpenVINO, quantized by
NNCF (``--int8-backend openvino``).

The int8 guard reads two kinds of evidence: the labelled accuracy change on the validation split,
and the int8 model's top-1 agreement with the float model on every image at hand (training and
validation: agreement needs no labels), with a 95% Wilson interval. Accuracy on a set of images
can drop by at most the share of decisions that changed, so a single-label int8 model is refused
when the share of changed decisions exceeds ``--max-drop`` (the point estimate: with a few hundred
images no interval could get below 1 pt), and not for one flip among a few dozen val images. The
training images are the int8 model's calibration and fit set, so their agreement may be higher
than on new images; the report gives the val change and the interval beside it.
"""

from __future__ import annotations

import copy
import os
import platform
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.errors import ExportError
from ..core.hardware import cpu_info
from ..core.layout import RunLayout
from ..data.scan import discover_eval
from ..models.artifact import META_FILE, load_model
from ..models.card import ModelCard
from .deploy import export_card, write_json
from .onnx_export import export_onnx
from .openvino_export import onnx_to_openvino, quantize_openvino
from .parity import ValScore, wilson_interval
from .prune import check_prunable, check_prune_args, count_macs, prune_and_recover, save_pruned
from .quantize import quantize_onnx
from .recovery import RECOVERY_LR
from .registry import INT8_BACKENDS
from .samples import eval_batch, labelled_samples, resolve_data_path
from .variants import (
    Logits,
    Variant,
    batched_logits,
    format_table,
    measure,
    onnx_runner,
    openvino_runner,
    torch_runner,
    write_reports,
)


def _calib_paths(card: ModelCard, calib: str | os.PathLike | None) -> list[str]:
    """Calibration images: --calib DATA (every image in it), else the model's training split."""
    if calib is not None:
        return [p for p, _ in discover_eval(calib, card.class_names, card.task,
                                            str(card.training.get("label_delim", " ")))[0]]
    return [p for p, _ in labelled_samples(card, split="train")]


def _export_variant(model, card: ModelCard, folder: Path, **extra: Any) -> Path:
    path = export_onnx(model, card, folder / "model.onnx", dynamic_batch=True)
    write_json(folder / META_FILE, export_card(card, "onnx", path.name, dynamic_batch=True, **extra).to_dict())
    return path


def _quantize_variant(src: Path, card: ModelCard, folder: Path, mode: str, calib: list[str],
                      float_ends: bool = False) -> Path:
    path = quantize_onnx(src, folder / "model.onnx", card, mode, calib, float_ends)
    write_json(folder / META_FILE, export_card(card, "onnx", path.name, dynamic_batch=True,
                                               quantization=mode).to_dict())
    return path


def _openvino_variant(onnx_path: Path, card: ModelCard, folder: Path, int8: bool = False,
                      calib: list[str] | None = None) -> Path:
    """The fp32 ONNX export converted to OpenVINO, or quantized to int8 by NNCF (``int8``)."""
    path = (quantize_openvino(onnx_path, folder / "model.xml", card, calib or []) if int8
            else onnx_to_openvino(onnx_path, folder / "model.xml"))
    write_json(folder / META_FILE, export_card(card, "openvino", path.name, dynamic_batch=True,
                                               **({"quantization": "int8"} if int8 else {})).to_dict())
    return path


def _guarded_int8(eager: Logits, src: Path, card: ModelCard, folder: Path, mode: str,
                  calib: list[str], float_ends: bool, images: np.ndarray, labels: np.ndarray, max_drop: float,
                  log) -> tuple[Path, list[dict[str, Any]]]:
    """Static int8, and when it loses more than ``max_drop`` on val, the same with the first conv
    and the classifier kept in float (accuracy-aware fallback, as Intel Neural Compressor tunes).

    The guarded score is val accuracy, or a multi-label model's val macro mAP (:class:`ValScore`).
    Returns the kept model and every attempt (scheme, val score, change in points), all of
    which go into the report: the fallback is chosen on the same val split the guard reads.
    """
    scorer = ValScore(card)
    base = scorer.score(batched_logits(eager, images), labels)

    def attempt(target: Path, ends: bool) -> tuple[Path, dict[str, Any]]:
        path = _quantize_variant(src, card, target, mode, calib, ends)
        score = scorer.score(batched_logits(onnx_runner(path), images), labels)
        return path, {"scheme": "ends-float" if ends else "all", scorer.key: round(score, 6),
                      scorer.change: round((score - base) * 100, 2)}

    change = scorer.change
    path, first = attempt(folder, float_ends)
    if mode != "int8" or float_ends or -first[change] <= max_drop:
        return path, [first]
    log(f"int8 with every layer quantized: {first[change]:+.2f} pt, beyond --max-drop {max_drop:g}; "
        "retrying with the first conv and the classifier in float")
    alt_folder = folder.with_name(folder.name + "-ends-float")
    _, second = attempt(alt_folder, True)
    if second[change] > first[change]:
        shutil.rmtree(folder)
        alt_folder.rename(folder)
        return folder / path.name, [first, second]
    shutil.rmtree(alt_folder)
    return path, [second, first]  # the last entry is the kept one


def _prune_variant(model, card: ModelCard, ratio: float, epochs: int, steps: int, lr: float, out: Path,
                   log) -> tuple[Any, dict]:
    macs0, params0 = count_macs(model, card)
    train = labelled_samples(card, split="train")
    pruned = prune_and_recover(copy.deepcopy(model), card, ratio, train, epochs, steps, log, lr=lr)
    macs1, params1 = count_macs(pruned, card)
    log(f"pruned: MACs {macs0 / 1e6:.1f}M -> {macs1 / 1e6:.1f}M, params {params0 / 1e6:.2f}M -> {params1 / 1e6:.2f}M")
    info = {"ratio": ratio, "steps": steps, "finetune_epochs": epochs, "recovery_lr": lr,
            "macs_before": macs0, "macs_after": macs1, "params_before": params0, "params_after": params1}
    save_pruned(out / "pruned", pruned, card, info)
    return pruned, info


def compress(model_path: str | os.PathLike, quantize: str | None = None, prune: float | None = None,
             finetune_epochs: int = 3, prune_steps: int = 2, recovery_lr: float | None = None,
             calib: str | os.PathLike | None = None,
             data: str | os.PathLike | None = None,
             out: str | os.PathLike | None = None, max_drop: float = 1.0, force: bool = False,
             bench_seconds: float = 3.0, int8_float_ends: bool = False, int8_backend: str = "onnxruntime",
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Quantize and/or prune a trained model, measure every variant and guard the accuracy.

    Args:
        model_path: run dir or ``model/`` dir.
        quantize: ``int8`` (static QDQ, per-channel) or ``int8-dynamic``; None to skip.
        prune: share of channels to remove (e.g. 0.3); None to skip.
        finetune_epochs: recovery epochs after each pruning round (distilled from the unpruned model);
            0 keeps the least-squares reconstruction alone, best for a few hundred images.
        prune_steps: pruning rounds (each removes an equal share, then recovers).
        recovery_lr: learning rate of the recovery fine-tune (None: ``RECOVERY_LR``, 1e-3).
        calib: images for int8 calibration (default: the model's training split).
        data: labelled evaluation images (default: the model's validation split).
        out: output folder (default ``RUN/compress``).
        max_drop: largest accepted accuracy drop of the int8 variant, in points.
        force: keep going (exit 0) even when the drop is larger.
        bench_seconds: timing budget per throughput measurement.
        int8_float_ends: static int8 keeps the first conv and the classifier in float (ONNX Runtime).
        int8_backend: ``onnxruntime`` (ORT static QDQ int8) or ``openvino`` (OpenVINO fp32 and NNCF int8
            variants beside ONNX Runtime's fp32).

    Returns:
        The report written to ``compress_report.json``.

    Example:
        compress("runs/train-1", quantize="int8", prune=0.3)["variants"][2]["val_accuracy"]
        # -> 0.95
    """
    if quantize is None and prune is None:
        raise ExportError("nothing to do: give --quantize int8|int8-dynamic and/or --prune RATIO")
    budget_s, float_ends, backend = bench_seconds, int8_float_ends, int8_backend
    if backend not in INT8_BACKENDS:
        raise ExportError(f"unknown --int8-backend {backend!r}; choose one of: {', '.join(INT8_BACKENDS)}")
    openvino = backend == "openvino"
    if openvino and quantize not in (None, "int8"):
        raise ExportError("--int8-backend openvino quantizes statically (--quantize int8, NNCF); int8-dynamic is "
                          "ONNX Runtime's (--int8-backend onnxruntime)")
    if openvino and float_ends:
        raise ExportError("--int8-float-ends is for --int8-backend onnxruntime; NNCF chooses what stays in float "
                          "itself")
    if prune is not None:
        check_prune_args(prune, prune_steps, recovery_lr, finetune_epochs)
    model, card = load_model(model_path)
    # the variants carry no unknown-score: int8 would quantize its statistics (clipped to the ranges
    # of known images) and pruning changes the features they describe; neither is measured yet
    card = card.replace(unknown=None)
    if prune is not None:
        check_prunable(model, card)
    out = Path(out) if out else RunLayout.of_model_dir(card.model_dir).root / "compress"
    samples = labelled_samples(card, data)
    if not samples:
        raise ExportError("no validation images: the training data in model.json is gone; pass --data DIR")
    images = eval_batch([p for p, _ in samples], card.preprocessing).numpy()
    labels = card.task.targets([label for _, label in samples], card.num_classes).numpy()
    if len(images) != len(labels):
        raise ExportError("some validation images could not be read; fix or pass --data DIR")

    variants = [Variant("eager fp32", str(card.model_dir / "model.safetensors"), torch_runner(model, card.tta))]
    onnx_fp32 = _export_variant(model, card, out / "onnx")
    variants.append(Variant("ONNX fp32", str(onnx_fp32), onnx_runner(onnx_fp32)))
    if openvino:
        ov_fp32 = _openvino_variant(onnx_fp32, card, out / "openvino")
        variants.append(Variant("OpenVINO fp32", str(ov_fp32.parent), openvino_runner(ov_fp32)))
    calib_paths = _calib_paths(card, calib) if quantize else []
    int8_attempts: list[dict[str, Any]] = []
    float_variant = variants[-1]  # the int8 model's float twin on the same runtime
    if quantize and openvino:
        log("quantizing with NNCF (OpenVINO)")
        path = _openvino_variant(onnx_fp32, card, out / "openvino-int8", int8=True, calib=calib_paths)
        variants.append(Variant("OpenVINO int8", str(path.parent), openvino_runner(path)))
    elif quantize:
        path, int8_attempts = _guarded_int8(variants[0].logits, onnx_fp32, card, out / "onnx-int8", quantize,
                                            calib_paths, float_ends, images, labels, max_drop, log)
        float_ends = int8_attempts[-1]["scheme"] == "ends-float"  # the pruned model gets the same scheme
        variants.append(Variant(f"ONNX {quantize}", str(path), onnx_runner(path)))
    int8_variant = variants[-1] if quantize else None
    prune_info: dict[str, Any] = {}
    if prune is not None:
        pruned, prune_info = _prune_variant(model, card, prune, finetune_epochs, prune_steps,
                                            RECOVERY_LR if recovery_lr is None else recovery_lr, out, log)
        variants.append(Variant("pruned", str(out / "pruned" / "model.safetensors"), torch_runner(pruned, card.tta),
                                {"macs": prune_info["macs_after"]}))
        pruned_card = card.replace(pruned=prune_info, unknown=None)  # the features changed: no score fits them
        pruned_onnx = _export_variant(pruned, pruned_card, out / "pruned-onnx")
        if quantize and openvino:
            path = _openvino_variant(pruned_onnx, pruned_card, out / "pruned-openvino-int8", int8=True,
                                     calib=calib_paths)
            variants.append(Variant("pruned+OpenVINO int8", str(path.parent), openvino_runner(path),
                                    {"macs": prune_info["macs_after"]}))
        elif quantize:
            path = _quantize_variant(pruned_onnx, pruned_card, out / "pruned-int8", quantize, calib_paths,
                                     float_ends)
            variants.append(Variant(f"pruned+{quantize}", str(path), onnx_runner(path),
                                    {"macs": prune_info["macs_after"]}))
        else:
            variants.append(Variant("pruned ONNX fp32", str(pruned_onnx), onnx_runner(pruned_onnx),
                                    {"macs": prune_info["macs_after"]}))
    if prune_info:
        variants[0].extra["macs"] = prune_info["macs_before"]

    log(f"measuring {len(variants)} variants on {len(images)} validation images")
    rows = measure(variants, images, labels, ValScore(card), budget_s, log)
    evidence = None
    if int8_variant is not None:
        paths = sorted({p for p, _ in labelled_samples(card, split="train")} | {p for p, _ in samples})
        log(f"int8 guard: decisions of int8 vs float on all {len(paths)} images at hand (training + validation)")
        evidence = agreement_evidence(float_variant.logits, int8_variant.logits, paths, card)
    report = _report(model_path, card, rows, data, int8_variant.name if int8_variant else None, max_drop,
                     prune_info, len(images), evidence, float_variant.name)
    report["int8_attempts"] = int8_attempts
    if len(int8_attempts) > 1:
        tried = "; ".join(f"{a['scheme']} {a[ValScore(card).change]:+.2f} pt" for a in int8_attempts)
        report["notes"].insert(0, f"int8 schemes tried on val: {tried}; kept {int8_attempts[-1]['scheme']}")
    write_reports(out, report)
    log(format_table(rows))
    for note in report["notes"]:
        log(note)
    log(f"wrote {out / 'compress_report.json'} and {out / 'compress_report.md'}")
    if report["refused"] and not force:
        tried_ends = any(a["scheme"] == "ends-float" for a in int8_attempts)
        remedies = (["calibrate on more images with --calib DATA", "--int8-backend onnxruntime"] if openvino else
                    ([] if tried_ends else ["--int8-float-ends"]) + ["--quantize int8-dynamic",
                                                                     "calibrate on more images with --calib DATA"])
        raise ExportError(report["refused"] + " (pass --force to accept it, or try " + ", or ".join(remedies) + ")")
    return report


def agreement_evidence(reference: Logits, other: Logits, paths: list[str], card: ModelCard,
                       chunk: int = 256) -> dict[str, Any]:
    """How often ``other`` decides like ``reference`` on ``paths`` (no labels needed): top-1, or every
    per-label decision of a multi-label model; with the 95% Wilson interval of the agreement."""
    scorer = ValScore(card)
    agree, total = 0.0, 0
    for start in range(0, len(paths), chunk):  # preprocessed a chunk at a time: bounded memory
        batch = eval_batch(paths[start:start + chunk], card.preprocessing).numpy()
        ref, out = batched_logits(reference, batch), batched_logits(other, batch)
        decisions = len(batch) * card.task.decisions_per_image(card.num_classes)
        agree += scorer.agree(out, ref) * decisions
        total += decisions
    agreeing = int(round(agree))
    low, high = wilson_interval(agreeing, total)
    return {"images": len(paths), "decisions": total, "agreeing": agreeing,
            "agreement": agreeing / max(total, 1), "agreement_95ci": [round(low, 6), round(high, 6)]}


def _report(model_path, card: ModelCard, rows, data, int8_name: str | None, max_drop, prune_info, n,
            evidence: dict[str, Any] | None = None, float_name: str = "ONNX fp32") -> dict[str, Any]:
    scorer = ValScore(card)
    base = rows[0][scorer.key]
    notes, refused = [], ""
    for row in rows[1:]:
        row[scorer.change] = round((row[scorer.key] - base) * 100, 2)
    quant_row = next((r for r in rows if r["variant"] == int8_name), None)
    if quant_row is not None:
        drop = -quant_row[scorer.change]
        notes.append(f"{quant_row['variant']}: {scorer.name} change {quant_row[scorer.change]:+.2f} pt on {n} "
                     f"labelled val images, throughput {quant_row['speedup_vs_eager_b32']:.2f}x eager fp32 at batch 32")
        float_row = next(r for r in rows if r["variant"] == float_name)
        if quant_row["throughput_b32"] < SPEED_GAIN * float_row["throughput_b32"]:
            notes.append(f"int8 buys only size on this CPU: {quant_row['throughput_b32']:.1f} img/s vs "
                         f"{float_row['throughput_b32']:.1f} img/s for {float_name} at batch 32 "
                         f"({quant_row['size_mb']:.2f} vs {float_row['size_mb']:.2f} MB; {_int8_hardware()})")
        if evidence is not None:
            low, high = evidence["agreement_95ci"]
            notes.append(f"{quant_row['variant']} vs {float_name}: {evidence['agreement']:.2%} of "
                         f"{card.task.decision_words} agree on all {evidence['images']} images at hand, "
                         f"{evidence['decisions'] - evidence['agreeing']} changed (95% interval {low:.2%}-{high:.2%})")
        # mAP is not bounded by decision agreement (Task.headline_bounded_by_agreement): labels judge
        if not card.task.headline_bounded_by_agreement or evidence is None:
            if drop > max_drop:
                refused = f"int8 {scorer.name} drop {drop:.2f} pt exceeds --max-drop {max_drop:g} pt"
        else:  # accuracy on these images drops by at most the share of changed decisions there
            changed = (1 - evidence["agreement"]) * 100
            if changed > max_drop:
                refused = (f"int8 changed {changed:.2f}% of {card.task.decision_words} on {evidence['images']} "
                           f"images, more than --max-drop {max_drop:g} pt (val {scorer.name} change {-drop:+.2f} pt)")
            elif drop > max_drop:
                notes.append(f"accepted: the val {scorer.name} change of {-drop:+.2f} pt rests on {n} images; int8 "
                             f"changed only {changed:.2f}% of decisions on all {evidence['images']} images, which "
                             f"bounds the {scorer.name} it can lose there")
        if refused:
            notes.append("REFUSED: " + refused)
    if prune_info:
        fewer = 1 - prune_info["macs_after"] / prune_info["macs_before"]
        pruned_row = next(r for r in rows if r["variant"] == "pruned")
        fewer_params = 1 - prune_info["params_after"] / prune_info["params_before"]
        notes.append(f"pruned: {fewer:.1%} fewer MACs, {fewer_params:.1%}"
                     f" fewer params, {scorer.name} change {pruned_row[scorer.change]:+.2f} pt after "
                     f"{prune_info['steps']} round(s) of least-squares reconstruction + "
                     f"{prune_info['finetune_epochs']} recovery epoch(s) at LR {prune_info['recovery_lr']:g}")
    recorded = resolve_data_path(card)
    source = str(data) if data else ("the run's validation split" if recorded is None
                                     else f"validation split of {recorded}")
    return {"model": str(model_path), "val_source": source, "num_val": n, "machine": _machine(),
            "variants": rows, "pruning": prune_info, "max_drop": max_drop, "refused": refused, "notes": notes,
            "int8_agreement": evidence}


SPEED_GAIN = 1.1  # int8 below 1.1x its float twin's throughput is not worth it for speed


def _int8_hardware() -> str:
    """Why int8 may not be faster: the CPU's int8 dot-product instructions (VNNI), or their absence."""
    info = cpu_info()
    if info is None:
        return "CPU flags unknown"
    vnni = [f for f in ("avx512_vnni", "avx_vnni", "amx_int8") if f in info[1]]
    return f"CPU has {', '.join(vnni)}" if vnni else "this CPU has no VNNI int8 dot-product instructions"


def _machine() -> str:
    import onnxruntime  # lazy: only for the report line

    try:
        import openvino

        vino = f", openvino {openvino.get_version().split('-')[0]}"
    except ImportError:
        vino = ""
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), onnxruntime {onnxruntime.__version__}{vino}; {_int8_hardware()}")

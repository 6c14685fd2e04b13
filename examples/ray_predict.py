"""Bulk-predict with a visiontune ONNX export on a Ray cluster (or locally) with Ray Data.

Usage:
    python examples/ray_predict.py model.onnx photos/ --out preds/ [--address auto]
    python examples/ray_predict.py model.onnx paths.txt --out preds/ --num-cpus 8 --batch-size 64

INPUTS is a folder (searched recursively for images) or a text file with one image path per line.
Without ``--address`` Ray starts in local mode on this machine (``--num-cpus`` caps it); on a
cluster pass ``--address auto`` (or run the script under ``ray job submit``) and the same code
scales out: ``map_batches`` runs one actor per CPU (``--actors`` to change), each holding one
single-threaded onnxruntime session and decoding + preprocessing its batches exactly like
visiontune (``visiontune_preprocess.py`` beside this file, a byte-identical copy of the package's
own preprocessing, is shipped to the workers).
The model and the images must be readable at the same paths on every node (shared storage).

Output: ``OUT/predictions.csv`` with ``path,label,probability,error`` (a multi-label model's:
``path,labels,p_<class>...,error``, the labels whose probability reaches their threshold joined by a
space, as ``visiontune predict`` writes them), one row per input in input
order (the few small result rows are collected on the driver and sorted, so there is one file
rather than Ray's per-block shards). Paths are absolute. An unreadable image gets an ``error``
and an empty label instead of failing the job.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import ray

sys.path.insert(0, str(Path(__file__).resolve().parent))
import visiontune_preprocess as vp  # noqa: E402  (vendored: the package's preprocessing, no install needed)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
FIELDS = ["path", "label", "probability", "error"]


class OnnxPredictor:
    """Ray Data callable class: one onnxruntime session per actor, reused for every batch."""

    def __init__(self, model_path: str) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # parallelism comes from the actors, one CPU each
        self.session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
        props = self.session.get_modelmeta().custom_metadata_map
        self.names = json.loads(props["class_names"])
        self.spec = vp.Preprocessing.from_dict(json.loads(props["preprocessing"]))
        # a multi-label graph's "probabilities" are per-label sigmoids, each decided at its threshold
        self.thresholds = np.array(json.loads(props["thresholds"])) if props.get("task") == "multi" else None
        self.input = self.session.get_inputs()[0]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Classify a batch of ``index``/``path`` rows; unreadable images get an ``error`` and no label."""
        arrays, rows, errors = [], [], [""] * len(batch["path"])
        for row, path in enumerate(batch["path"]):
            try:
                arrays.append(vp.load(str(path), self.spec)[None])
                rows.append(row)
            except Exception as exc:  # any undecodable input becomes an error row, never a failed job
                errors[row] = f"{type(exc).__name__}: {exc}"
        labels = np.full(len(errors), "", dtype=object)
        probability = np.full(len(errors), np.nan)
        if arrays:
            x = np.concatenate(arrays)
            fixed = self.input.shape[0]  # an export without --dynamic-batch takes fixed-size slices
            step = fixed if isinstance(fixed, int) else len(x)
            # "probabilities" already applies softmax and the calibration temperature (in the graph)
            probs = np.concatenate([self.session.run(["probabilities"], {self.input.name: x[i:i + step]})[0]
                                    for i in range(0, len(x), step)])
            if self.thresholds is not None:
                return self._multi_label(batch, rows, probs, errors)
            labels[rows] = [self.names[i] for i in probs.argmax(1)]
            probability[rows] = probs.max(1)
        elif self.thresholds is not None:
            return self._multi_label(batch, rows, np.zeros((0, len(self.names))), errors)
        return {"index": batch["index"], "path": batch["path"], "label": labels, "probability": probability,
                "error": np.array(errors, dtype=object)}

    def _multi_label(self, batch, rows: list[int], probs: np.ndarray, errors: list[str]) -> dict[str, np.ndarray]:
        labels = np.full(len(errors), "", dtype=object)
        labels[rows] = [" ".join(n for n, p, t in zip(self.names, row, self.thresholds) if p >= t) for row in probs]
        scores = {f"p_{n}": np.full(len(errors), np.nan) for n in self.names}
        for c, name in enumerate(self.names):
            scores[f"p_{name}"][rows] = probs[:, c]
        return {"index": batch["index"], "path": batch["path"], "labels": labels, **scores,
                "error": np.array(errors, dtype=object)}


def list_inputs(source: Path) -> list[str]:
    """Images under a folder (sorted, hidden entries skipped) or the paths listed in a text file."""
    if source.is_dir():
        files = (p for p in sorted(source.rglob("*")) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        return [str(p.absolute()) for p in files if not any(s.startswith(".") for s in p.relative_to(source).parts)]
    return [str(Path(line.strip()).absolute()) for line in source.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    """Run the prediction job and write ``OUT/predictions.csv``; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="MODEL.onnx exported by visiontune")
    parser.add_argument("inputs", type=Path, help="image folder, or a text file with one path per line")
    parser.add_argument("--out", type=Path, required=True, help="output folder (predictions.csv)")
    parser.add_argument("--address", default=None, help="Ray cluster address ('auto'); default: local mode")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs for local mode (default: all)")
    parser.add_argument("--actors", type=int, default=None, help="predictor actors (default: one per CPU)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (64)")
    args = parser.parse_args(argv)
    paths = list_inputs(args.inputs)
    if not paths:
        parser.error(f"no images found in {args.inputs}")
    # only paths and result rows pass through the object store: a small one suffices locally
    local = {"num_cpus": args.num_cpus, "object_store_memory": 200 * 2**20} if args.address is None else {}
    ray.init(address=args.address, include_dashboard=False, runtime_env={"py_modules": [vp]}, **local)
    actors = args.actors or max(1, int(ray.cluster_resources().get("CPU", 1)))
    dataset = ray.data.from_items([{"index": i, "path": p} for i, p in enumerate(paths)])
    results = dataset.map_batches(OnnxPredictor, fn_constructor_args=(str(args.model.resolve()),),
                                  batch_size=args.batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
                                  num_cpus=1)
    rows = sorted(results.iter_rows(), key=lambda r: r["index"])
    args.out.mkdir(parents=True, exist_ok=True)
    multi = bool(rows) and "labels" in rows[0]
    scores = [k for k in rows[0] if k.startswith("p_")] if multi else []
    with open(args.out / "predictions.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "labels", *scores, "error"] if multi else FIELDS)
        for r in rows:
            if multi:
                writer.writerow([r["path"], r["labels"], *("" if np.isnan(r[k]) else f"{r[k]:.6f}" for k in scores),
                                 r["error"]])
            else:
                writer.writerow([r["path"], r["label"], "" if np.isnan(r["probability"]) else
                                 f"{r['probability']:.6f}", r["error"]])
    print(f"{len(rows)} predictions -> {args.out / 'predictions.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Classify images with a visiontune ONNX export using only numpy, Pillow and onnxruntime.

Usage:
    python onnx_client.py model.onnx photo.jpg [more.jpg ...] [--top-k 3]

Everything the client needs (class names, preprocessing, temperature) is read from the ONNX
file's ``metadata_props``. The preprocessing is visiontune's own: ``visiontune_preprocess.py``
beside this file is a byte-identical copy of ``visiontune/data/preprocess.py`` (the package's
tests check it), so the pixels fed to the graph are exactly the ones visiontune would feed.
Output: ``path,label,probability`` (and ``topN_label,topN_probability`` with ``--top-k N``);
for a multi-label model (metadata ``task`` = ``multi``) ``path,labels`` with the labels whose
probability reaches their threshold (metadata ``thresholds``), joined by ``--label-delim``, then
the top-k ranking.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
import visiontune_preprocess as vp  # noqa: E402  (vendored: no visiontune install needed)


def read_model(session) -> tuple[list[str], vp.Preprocessing]:
    """Class names and the validated preprocessing spec from the graph's metadata."""
    props = session.get_modelmeta().custom_metadata_map
    return json.loads(props["class_names"]), vp.Preprocessing.from_dict(json.loads(props["preprocessing"]))


def preprocess(path: str, spec: vp.Preprocessing, uint8: bool = False) -> np.ndarray:
    """One image as the graph's input: a float32 NCHW batch of 1, or for a graph exported with
    ``--input uint8`` the resized uint8 NHWC pixels (the graph normalises them itself)."""
    if uint8:
        return np.asarray(vp.resize(vp.decode(path, spec.draft_size()), spec), dtype=np.uint8)[None]
    return vp.load(path, spec)[None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--label-delim", default=" ", help="multi-label models: separator of the labels")
    args = parser.parse_args(argv)
    session = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    names, spec = read_model(session)
    props = session.get_modelmeta().custom_metadata_map
    multi = props.get("task") == "multi"
    thresholds = np.array(json.loads(props["thresholds"])) if multi else None
    input_name = session.get_inputs()[0].name
    uint8 = session.get_inputs()[0].type == "tensor(uint8)"
    first = "path,labels" + "".join(f",top{i}_label,top{i}_probability" for i in range(1, args.top_k + 1)) if multi \
        else "path,label,probability" + "".join(f",top{i}_label,top{i}_probability" for i in range(2, args.top_k + 1))
    print(first)
    for path in args.images:
        # probabilities already include softmax (multi-label: a sigmoid per label) and the temperature
        probs = session.run(["probabilities"], {input_name: preprocess(path, spec, uint8)})[0][0]
        order = np.argsort(-probs)[:max(1, args.top_k)]
        if multi:
            labels = args.label_delim.join(n for n, p, t in zip(names, probs, thresholds) if p >= t)
            print(f"{path},{labels}" + "".join(f",{names[i]},{probs[i]:.6f}" for i in order))
        else:
            print(path + "".join(f",{names[i]},{probs[i]:.6f}" for i in order))
    return 0


if __name__ == "__main__":
    sys.exit(main())

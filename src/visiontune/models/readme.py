"""The human-readable model card: ``README.md`` beside ``model.json``, in the Hugging Face format.

Generated from the card alone (``model.json``: architecture, classes, preprocessing, the run's
metrics, class counts and calibration), so it is rewritten whenever the card is and never needs
hand-editing. The YAML front matter is what the Hugging Face Hub reads (library, tags, the
``model-index`` of results); the sections say what the model is for, what it was trained on,
how it preprocesses, how it scored, how far its probabilities can be trusted, and how to load it.

Example:
    >>> from visiontune.data.preprocess import Preprocessing
    >>> card = ModelCard(["ants", "bees"], Preprocessing((3, 224, 224), (0.5,) * 3, (0.5,) * 3),
    ...                  metrics={"val": {"accuracy": 0.95, "num_samples": 40}},
    ...                  training={"class_counts": {"ants": 20, "bees": 22}})
    >>> text = model_readme(card)
    >>> text.splitlines()[0], "| ants | 20 |" in text, "accuracy 0.9500" in text
    ('---', True, True)
"""

from __future__ import annotations

from typing import Any

import yaml

from .card import ModelCard
from .tta import TTA_VIEWS, zoomed_size

README_FILE = "README.md"
METRIC_NAMES = {"accuracy": "accuracy", "macro_f1": "f1", "top5_accuracy": "top-5 accuracy",
                "macro_map": "mAP", "micro_map": "micro mAP", "micro_f1": "micro f1"}


def model_readme(card: ModelCard, file_format: str = "visiontune") -> str:
    """The ``README.md`` text for ``card``; ``file_format`` ``hf`` adds the timm loading snippet first."""
    name = card.architecture.name if card.architecture else "model"
    title = f"{name} fine-tuned for {card.num_classes} classes ({card.task.title})"
    parts = [_front_matter(card, title), f"# {title}", "", *_intended_use(card), *_training_data(card),
             *_preprocessing(card), *_results(card), *_calibration(card), *_limitations(card),
             *_how_to_load(card, file_format)]
    return "\n".join(parts).rstrip() + "\n"


def _front_matter(card: ModelCard, title: str) -> str:
    source = card.architecture.source if card.architecture else "visiontune"
    meta: dict[str, Any] = {"library_name": "timm" if source == "timm" else "visiontune",
                            "pipeline_tag": "image-classification",
                            "tags": ["image-classification", "visiontune", source]
                            + card.task.readme_phrases()["tags"],
                            "base_model_architecture": card.architecture.name if card.architecture else None}
    results = [{"type": METRIC_NAMES[key], "value": round(float(value), 4), "name": f"{split} {key}"}
               for split in ("test", "val") for key, value in (card.metrics.get(split) or {}).items()
               if key in METRIC_NAMES and isinstance(value, (int, float))]
    if results:
        meta["model-index"] = [{"name": title, "results": [{"task": {"type": "image-classification"},
                                                            "dataset": {"name": "the training run's held-out "
                                                                                "images", "type": "imagefolder"},
                                                            "metrics": results}]}]
    return "---\n" + yaml.safe_dump({k: v for k, v in meta.items() if v is not None}, sort_keys=False) + "---\n"


def _intended_use(card: ModelCard) -> list[str]:
    words = card.task.readme_phrases(card.calibrated)
    names = ", ".join(f"`{_cell(n)}`" for n in card.class_names[:50]) + (" ..." if card.num_classes > 50 else "")
    return ["## Intended use", "", f"An image classifier that {words['use']}: {names}.", "",
            "Use it on images like its training data (see below); anything else gets one of these classes "
            "anyway" + words["caveat"], ""]


def _training_data(card: ModelCard) -> list[str]:
    t = card.training
    lines = ["## Training data", ""]
    facts = [f"{t['num_train']} training and {t.get('num_val', 0)} validation images" if "num_train" in t else "",
             f"strategy `{t['strategy']}`" if t.get("strategy") else "",
             f"{t['epochs']} epoch(s)" if t.get("epochs") else "", f"seed {t['seed']}" if "seed" in t else ""]
    lines += [", ".join(f for f in facts if f) + "." if any(facts) else "Not recorded (an exported or older model).",
              ""]
    counts = t.get("class_counts")
    if isinstance(counts, dict) and counts:
        lines += ["| class | training images |", "| --- | ---: |"]
        lines += [f"| {_cell(n)} | {counts.get(n, '')} |" for n in card.class_names]
        lines.append("")
    return lines


def _preprocessing(card: ModelCard) -> list[str]:
    pre = card.preprocessing
    return ["## Preprocessing", "",
            f"RGB, resized ({pre.resize_mode}, {pre.interpolation}, crop_pct {pre.crop_pct:g}) to "
            f"{pre.height}x{pre.width}, scaled to 0..1, normalised with mean {list(pre.mean)} and std "
            f"{list(pre.std)}. visiontune, the exports and the serving API all apply it from `model.json`; a "
            "client that preprocesses itself must do exactly this." + (f" Predictions average {TTA_VIEWS[card.tta]}."
                                                                       if card.tta else ""), ""]


def _results(card: ModelCard) -> list[str]:
    lines = ["## Evaluation results", ""]
    found = False
    for split in ("val", "test"):
        metrics = card.metrics.get(split) or {}
        shown = {k: v for k, v in metrics.items() if k in METRIC_NAMES and isinstance(v, (int, float))}
        if not shown:
            continue
        found = True
        lines += [f"On the {split} split ({metrics.get('num_samples', '?')} images, never trained on): "
                  + ", ".join(f"{METRIC_NAMES[k]} {v:.4f}" for k, v in shown.items()) + ".", ""]
        per_class = metrics.get("per_class")
        if isinstance(per_class, dict) and per_class:
            lines += ["| class | precision | recall | f1 | support |", "| --- | ---: | ---: | ---: | ---: |"]
            lines += [f"| {_cell(n)} | {m.get('precision', 0):.3f} | {m.get('recall', 0):.3f} | {m.get('f1', 0):.3f} | "
                      f"{m.get('support', '')} |" for n, m in per_class.items() if isinstance(m, dict)]
            lines.append("")
    if not found:
        lines += ["No held-out results recorded.", ""]
    return lines


def _calibration(card: ModelCard) -> list[str]:
    cal = card.calibration
    if not cal:
        return ["## Calibration", "", "Not calibrated: probabilities are the raw softmax/sigmoid outputs.", ""]
    ece = (f" Expected calibration error on {cal.get('num_val', '?')} validation images: "
           f"{cal['ece_before']:.3f} before, {cal['ece_after']:.3f} after." if "ece_after" in cal else "")
    return ["## Calibration", "", f"Temperature scaling, T = {card.temperature:.3f}, fitted on the validation split."
            + ece, ""]


def _limitations(card: ModelCard) -> list[str]:
    n_val = (card.metrics.get("val") or {}).get("num_samples")
    lines = ["## Limitations", "",
             "- It only knows the classes above and was fitted to one dataset: expect lower accuracy on images "
             "from other cameras, places or times, and check it on your own before relying on it."]
    if isinstance(n_val, int) and n_val < 200:
        lines.append(f"- The validation split has {n_val} images, so the scores above are uncertain by several "
                     "points; prefer a larger held-out set (`visiontune evaluate`).")
    lines += ["- Biases of the training images (who and what they show) carry over to the predictions.", ""]
    return lines


def _how_to_load(card: ModelCard, file_format: str) -> list[str]:
    lines = ["## How to load", ""]
    if file_format == "hf" and card.architecture and card.architecture.source == "timm":
        lines += ["With timm alone (this folder):", "", "```python", "import timm",
                  'model = timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True).eval()', "```", ""]
        if card.tta:  # timm runs one view: the figures above were measured with the views averaged
            lines += _timm_views(card)
    lines += ["With visiontune (this model folder or its run folder):", "", "```python", "import visiontune",
              'clf = visiontune.load("PATH/TO/THIS/FOLDER")', 'print(clf.predict(["photo.jpg"]))', "```", "",
              "From the command line: `visiontune predict PATH photo.jpg`; serve it with `visiontune serve PATH`.", "",
              "With onnxruntime: `visiontune export PATH --format onnx`, then `python examples/onnx_client.py "
              "model.onnx photo.jpg` (numpy, Pillow and onnxruntime only; the preprocessing is in the ONNX "
              "metadata).", ""]
    return lines


def _timm_views(card: ModelCard) -> list[str]:
    """How a timm user averages the views the card's figures were measured with (timm alone runs one)."""
    second = "x.flip(-1)"
    if card.tta == "flip-zoom":
        size = zoomed_size(card.preprocessing.height, card.preprocessing.width)
        second = f'F.interpolate(x, size={size}, mode="bilinear", align_corners=False).flip(-1)'
    return [f"timm computes one view; this model's figures average {TTA_VIEWS[card.tta]}. For the same "
            "predictions, with `x` the preprocessed batch (NCHW):", "", "```python",
            "import torch.nn.functional as F", f"logits = (model(x) + model({second})) / 2", "```", ""]


def _cell(text: str) -> str:
    """A class name inside a Markdown table cell or code span (no pipe, backtick or newline breaks it)."""
    return str(text).replace("|", "\\|").replace("`", "'").replace("\n", " ")

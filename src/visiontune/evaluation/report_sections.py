"""HTML building blocks of ``report.html``: embedded images, tables, galleries, one function per section,
and :class:`ReportInputs`, what a task's sections are written from.

Every image is embedded as a base64 ``data:`` URI, so the report is one file that opens offline.
"""

from __future__ import annotations

import base64
import csv
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from ..data.image import try_load  # noqa: E402
from ..inference.classifier import Classifier  # noqa: E402

CSS = """
body{font:14px/1.45 -apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#1d2330;background:#f4f6f9}
main{max-width:1180px;margin:auto;padding:16px 24px 48px}
header{background:#1f3b63;color:#fff;padding:18px 24px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;opacity:.85}nav a{color:#cfe0ff;margin-right:12px;font-size:13px}
section{background:#fff;border:1px solid #dde3ec;border-radius:8px;margin:18px 0;padding:12px 20px}
h2{font-size:18px;margin:6px 0 10px;color:#1f3b63}h3{font-size:15px;margin:12px 0 6px}
table{border-collapse:collapse;margin:6px 0 10px;font-size:13px}
th,td{border:1px solid #dde3ec;padding:3px 8px;text-align:right}th{background:#eef2f8}
td.l,th.l{text-align:left}.muted{color:#6b7587}.warn{color:#a33}
img.plot{max-width:100%;height:auto}.gallery{display:flex;flex-wrap:wrap;gap:8px}
figure{margin:0;width:150px;font-size:11px;text-align:center}
figure img{width:150px;height:150px;object-fit:contain;background:#222;image-rendering:auto;border-radius:4px}
figure.bad figcaption{color:#a33}figcaption{word-break:break-all}
"""


@dataclass(frozen=True)
class ReportInputs:
    """What a task's report sections are written from (see :mod:`~visiontune.evaluation.parts`).

    Attributes:
        clf: the model.
        run_dir: its run dir (diagrams are drawn there, then embedded and removed).
        paths: the readable evaluated images.
        logits: the model's raw logits on them ``[N, C]``.
        target: their targets (the task's: class indices or multi-hot rows).
        source: what they are, in words ("validation split", "data DIR").
        gradcam: whether to draw Grad-CAM overlays.
        seed: the seed of the images chosen for galleries.
        calibration: the model's ``model.json`` calibration entry (fitted first when it had none).
    """

    clf: Classifier
    run_dir: Path
    paths: list[str]
    logits: torch.Tensor
    target: torch.Tensor
    source: str
    gradcam: bool
    seed: int
    calibration: dict[str, Any]

    @property
    def temperature(self) -> float:
        return float(self.calibration.get("temperature", 1.0))


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def fig_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return data_uri(buf.getvalue())


def image_uri(img: Image.Image | np.ndarray, max_side: int = 224, fmt: str = "JPEG") -> str:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    img = img.convert("RGB")
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return data_uri(buf.getvalue(), "image/jpeg" if fmt == "JPEG" else "image/png")


def file_uri(path: Path) -> str:
    return data_uri(Path(path).read_bytes(), "image/png")


def thumb_uri(path: str, max_side: int = 200) -> str | None:
    """A gallery thumbnail of an image file (None when it cannot be read any more)."""
    image = try_load(path, draft_size=256)
    return None if image is None else image_uri(image, max_side=max_side)


def img_tag(uri: str, alt: str, cls: str = "plot") -> str:
    return f'<img class="{cls}" alt="{html.escape(alt)}" src="{uri}">'


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1, styles=None) -> str:
    """An HTML table; the first ``left`` columns are left-aligned; ``styles[r][c]`` optional CSS."""
    out = ["<table><tr>" + "".join(f'<th class="{"l" if i < left else ""}">{html.escape(str(h))}</th>'
                                   for i, h in enumerate(header)) + "</tr>"]
    for r, row in enumerate(rows):
        cells = []
        for c, value in enumerate(row):
            text = f"{value:.4f}" if isinstance(value, float) else html.escape(str(value))
            style = f' style="{styles[r][c]}"' if styles and styles[r][c] else ""
            cells.append(f'<td class="{"l" if c < left else ""}"{style}>{text}</td>')
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out) + "</table>"


def section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{html.escape(title)}</h2>\n{body}\n</section>'


def gallery(items: Sequence[tuple[str, str, bool]]) -> str:
    """``(image uri, caption, wrong)`` figures in a wrapping row."""
    if not items:
        return '<p class="muted">none</p>'
    figs = [f'<figure class="{"bad" if bad else "ok"}"><img alt="{html.escape(cap)}" src="{uri}">'
            f"<figcaption>{html.escape(cap)}</figcaption></figure>" for uri, cap, bad in items]
    return '<div class="gallery">' + "\n".join(figs) + "</div>"


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ----------------------------------------------------------------------------------- sections
def dataset_section(counts: dict[str, dict[str, int]], sizes: list[tuple[int, int]], skipped: list[str],
                    class_names: list[str]) -> str:
    splits = [s for s in ("train", "val", "test") if s in counts]
    rows = [[name] + [counts[s].get(name, 0) for s in splits] for name in class_names]
    rows.append(["total"] + [sum(counts[s].values()) for s in splits])
    body = "<h3>Images per class</h3>" + table(["class"] + splits, rows)
    train = [counts.get("train", {}).get(n, 0) for n in class_names]
    if train and min(train) > 0:
        body += f'<p>imbalance (largest / smallest train class): {max(train) / min(train):.1f} : 1</p>'
    if sizes:
        w = np.array([s[0] for s in sizes])
        h = np.array([s[1] for s in sizes])
        body += (f"<h3>Image sizes (sample of {len(sizes)})</h3><p>width {w.min()}&ndash;{w.max()} "
                 f"(median {int(np.median(w))}), height {h.min()}&ndash;{h.max()} (median {int(np.median(h))}) px</p>")
        fig, axes = plt.subplots(1, 2, figsize=(9, 3))
        axes[0].scatter(w, h, s=10, alpha=0.6, color="#4c72b0")
        axes[0].set_xlabel("width (px)")
        axes[0].set_ylabel("height (px)")
        axes[1].hist(w / np.maximum(h, 1), bins=20, color="#55a868")
        axes[1].set_xlabel("aspect ratio (w / h)")
        fig.tight_layout()
        body += img_tag(fig_uri(fig), "image size distribution")
    body += f"<h3>Skipped files ({len(skipped)})</h3>"
    if skipped:
        body += "<pre>" + html.escape("\n".join(skipped[:50])) + ("\n..." if len(skipped) > 50 else "") + "</pre>"
    else:
        body += '<p class="muted">none: every file was readable</p>'
    return body


def metrics_section(saved: dict[str, Any], result: dict[str, Any], source: str, training: dict[str, Any]) -> str:
    rows = []
    for split, values in saved.items():
        if isinstance(values, dict):
            for key, value in values.items():
                rows.append([f"{split} {key}", value])
        elif isinstance(values, (int, float)):
            rows.append([f"best epoch: {split}", values])
    for key in ("accuracy", "top5_accuracy", "macro_precision", "macro_recall", "macro_f1", "num_samples"):
        if key in result:
            rows.append([f"this report ({source}): {key}", result[key]])
    body = table(["metric", "value"], rows)
    if training:
        body += "<h3>Training</h3>" + table(["setting", "value"], [[k, v] for k, v in training.items()])
    return body


def per_class_section(result: dict[str, Any]) -> str:
    rows = [[name, m["precision"], m["recall"], m["f1"], m["support"]] for name, m in result["per_class"].items()]
    return table(["class", "precision", "recall", "F1", "support"], rows)


def confusion_section(matrix: list[list[int]], class_names: list[str]) -> str:
    m = np.array(matrix, dtype=float)
    norm = m / np.maximum(m.sum(1, keepdims=True), 1)
    header = ["true \\ predicted"] + class_names

    def shade(values):
        return [[""] + [f"background:rgba(31,59,99,{0.85 * v:.2f});color:{'#fff' if v > 0.5 else '#000'}"
                        for v in row] for row in values]

    counts = table(header, [[n] + [int(v) for v in row] for n, row in zip(class_names, m)],
                   styles=shade(m / max(m.max(), 1)))
    normed = table(header, [[n] + [f"{v:.2f}" for v in row] for n, row in zip(class_names, norm)], styles=shade(norm))
    return "<h3>Counts (rows: true class)</h3>" + counts + "<h3>Row-normalised (recall per true class)</h3>" + normed


def confused_pairs_section(matrix: list[list[int]], class_names: list[str], top: int = 10) -> str:
    m = np.array(matrix)
    pairs = [(int(m[i, j]), class_names[i], class_names[j], m[i, j] / max(m[i].sum(), 1))
             for i in range(len(m)) for j in range(len(m)) if i != j and m[i, j] > 0]
    pairs.sort(key=lambda p: (-p[0], -p[3]))
    if not pairs:
        return '<p class="muted">no confusions: every evaluated image was classified correctly</p>'
    return table(["true", "predicted as", "count", "share of true class"],
                 [[t, p, c, f"{s:.1%}"] for c, t, p, s in pairs[:top]], left=2)


def calibration_section(cal: dict[str, Any], diagram_uri: str | None, eval_ece: tuple[float, float] | None) -> str:
    rows = [["temperature T", cal.get("temperature")], ["ECE before (val)", cal.get("ece_before")],
            ["ECE after (val)", cal.get("ece_after")], ["NLL before (val)", cal.get("nll_before", "")],
            ["NLL after (val)", cal.get("nll_after", "")], ["validation images", cal.get("num_val")]]
    if eval_ece:
        rows += [["ECE before (this report's images)", eval_ece[0]], ["ECE after (this report's images)", eval_ece[1]]]
    body = ("<p>Temperature scaling divides the logits by T (fitted on the validation split, stored in "
            "model.json); predict reports softmax(logits / T). The ranking of classes, and so accuracy, "
            "is unchanged.</p>" + table(["", "value"], [[k, v] for k, v in rows if v != ""]))
    if diagram_uri:
        body += "<h3>Reliability diagram</h3>" + img_tag(diagram_uri, "reliability diagram")
    return body


def coverage_section(probs: np.ndarray, target: np.ndarray) -> str:
    conf = probs.max(1)
    correct = probs.argmax(1) == target
    thresholds = np.linspace(0, 1, 101)
    cov = np.array([(conf >= t).mean() for t in thresholds])
    acc = np.array([correct[conf >= t].mean() if (conf >= t).any() else np.nan for t in thresholds])
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.plot(cov, acc, "-", color="#4c72b0")
    for t in (0.5, 0.7, 0.9):
        i = int(round(t * 100))
        if not np.isnan(acc[i]):
            ax.plot(cov[i], acc[i], "o", color="#dd8452")
            ax.annotate(f"P>={t}", (cov[i], acc[i]), textcoords="offset points", xytext=(4, -12), fontsize=8)
    ax.set_xlabel("coverage (share of images answered)")
    ax.set_ylabel("accuracy on answered images")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    rows = [[f"{t:.2f}", f"{cov[int(round(t * 100))]:.1%}", "" if np.isnan(acc[int(round(t * 100))])
             else f"{acc[int(round(t * 100))]:.1%}"] for t in (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)]
    return ("<p>predict --reject-below P labels an image <code>unknown</code> when its calibrated top "
            "probability is below P.</p>" + img_tag(fig_uri(fig), "accuracy coverage curve")
            + table(["reject below P", "coverage", "accuracy"], rows))


def time_section(plan: dict[str, Any], timings: dict[str, float]) -> str:
    """The --time plan (what was measured and chosen) beside the phases' actual durations."""
    body = ""
    if plan:
        body += (f"<p>Budget {plan.get('budget', 0) / 60:.1f} min: {html.escape(str(plan.get('strategy')))} at "
                 f"{plan.get('img_size')} px for {plan.get('epochs')} epoch(s). "
                 f"{html.escape(str(plan.get('reason', '')))}</p>")
    projected = plan.get("projected", {}) if plan else {}
    phases = [p for p in ("start", "features", "train", "finish") if p in projected or p in timings]
    rows = [[p, f"{projected[p]:.0f}" if p in projected else "", f"{timings[p]:.0f}" if p in timings else ""]
            for p in phases]
    rows.append(["total", f"{sum(projected.values()):.0f}" if projected else "",
                 f"{timings['total']:.0f}" if "total" in timings else "(written after the report)"])
    body += table(["phase", "planned s", "actual s"], rows)
    if plan.get("throughputs"):
        body += "<h3>Measured on this machine</h3>" + table(
            ["input px", "train img/s", "inference img/s"],
            [[int(t["size"]), f"{t['train']:.0f}", f"{t['infer']:.0f}"] for t in plan["throughputs"]])
    return body


def compare_section(path: Path) -> str:
    rows = read_csv_rows(path)
    if not rows:
        return '<p class="muted">compare.csv is empty</p>'
    header = list(rows[0])
    return table(header, [[r[h] for h in header] for r in rows], left=2)

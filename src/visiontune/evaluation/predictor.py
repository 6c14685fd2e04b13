"""``visiontune.load(path)`` -> :class:`Classifier`: batched prediction with the saved preprocessing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..data.dataset import default_workers
from ..hardware import autocast, device, resolve_precision
from ..data.image import ImageDecodeError, load_image
from ..data.transforms import draft_size, eval_transform
from ..models.artifact import load_model

ImageInput = str | os.PathLike | Image.Image | bytes
UNKNOWN = "unknown"  # label of predictions rejected by reject_below


class _InputDataset(Dataset):
    """Decodes inputs in loader workers; a bad input yields its error instead of a tensor."""

    def __init__(self, inputs: Sequence[ImageInput], transform, draft: int | None):
        self.inputs = inputs
        self.transform = transform
        self.draft = draft

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int):
        try:
            return index, self.transform(load_image(self.inputs[index], self.draft)), ""
        except (ImageDecodeError, OSError) as exc:
            return index, None, str(exc) if isinstance(exc, ImageDecodeError) else f"unreadable: {exc}"


def _collate(batch):
    good = [(i, t) for i, t, e in batch if t is not None]
    errors = [(i, e) for i, t, e in batch if t is None]
    tensor = torch.stack([t for _, t in good]) if good else None
    return [i for i, _ in good], tensor, errors


class Classifier:
    """A trained model with its class names and preprocessing, ready to predict.

    Example:
        >>> clf = visiontune.load("runs/train-1")  # doctest: +SKIP
        >>> clf.predict(["ant.jpg"])[0]["label"]  # doctest: +SKIP
        'ants'
    """

    def __init__(self, model: torch.nn.Module, meta: dict[str, Any], precision: str = "auto"):
        self.device = device()
        self.model = model.eval().to(self.device, memory_format=torch.channels_last)
        self.meta = meta
        self.class_names: list[str] = list(meta["class_names"])
        self.preprocessing: dict[str, Any] = dict(meta["preprocessing"])
        self.transform = eval_transform(self.preprocessing)
        self.precision = resolve_precision(precision, self.preprocessing["input_size"][-1])
        # temperature scaling fitted on val (visiontune report / calibrate) makes probabilities honest
        self.temperature = float(meta.get("calibration", {}).get("temperature", 1.0))
        self.calibrated = "calibration" in meta

    @classmethod
    def load(cls, path: str | os.PathLike, precision: str = "auto") -> Classifier:
        """Load a run dir or ``model/`` dir; ``precision`` auto|32|bf16|16 for inference."""
        model, meta = load_model(path)
        return cls(model, meta, precision)

    @torch.inference_mode()
    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits (float32, on CPU) for a preprocessed NCHW float batch."""
        batch = batch.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with autocast(self.precision, self.device):
            return self.model(batch).float().cpu()

    def iter_batches(
        self, inputs: Sequence[ImageInput], batch_size: int = 64, workers: int | None = None
    ) -> Iterable[tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]]:
        """Yield (input indices, probabilities, [(index, error)]) batch by batch, in input order."""
        in_memory = any(not isinstance(x, (str, os.PathLike)) for x in inputs)
        n_workers = 0 if in_memory or len(inputs) < 2 * batch_size else default_workers(workers)
        loader = DataLoader(
            _InputDataset(inputs, self.transform, draft_size(self.preprocessing)),
            batch_size=batch_size,
            num_workers=n_workers,
            collate_fn=_collate,
            pin_memory=self.device == "cuda",
            persistent_workers=False,
        )
        for indices, tensor, errors in loader:
            probs = torch.softmax(self.logits(tensor) / self.temperature, dim=1) if tensor is not None else None
            yield indices, probs, errors

    def predict(
        self,
        inputs: ImageInput | Sequence[ImageInput],
        top_k: int = 5,
        batch_size: int = 64,
        workers: int | None = None,
        progress: bool = False,
        reject_below: float | None = None,
    ) -> list[dict[str, Any]]:
        """Classify images (paths, PIL images or encoded bytes); one dict per input, in order.

        Each dict has ``path``, ``label``, ``probability``, ``top_k`` (list of
        ``{"label", "probability"}``), ``calibrated`` and ``error`` ("" or why the input could
        not be read). With ``reject_below=P`` the label is ``unknown`` when the (calibrated) top
        probability is below P; ``top_k`` still lists the classes.
        """
        if isinstance(inputs, (str, os.PathLike, Image.Image, bytes)):
            inputs = [inputs]
        inputs = list(inputs)
        rows = self.predict_stream(inputs, top_k, batch_size, workers, reject_below)
        if progress:
            from tqdm import tqdm

            rows = tqdm(rows, total=len(inputs), desc="predict", unit="img", leave=False)
        return list(rows)

    def predict_stream(self, inputs: Sequence[ImageInput], top_k: int = 5, batch_size: int = 64,
                       workers: int | None = None, reject_below: float | None = None):
        """Like :meth:`predict`, but yields rows in input order batch by batch (constant memory)."""
        k = max(1, min(top_k, len(self.class_names)))
        for start in range(0, len(inputs), batch_size * 64):  # bounded chunks: workers restart rarely
            chunk = inputs[start:start + batch_size * 64]
            rows: list[dict[str, Any] | None] = [None] * len(chunk)
            for indices, probs, errors in self.iter_batches(chunk, batch_size, workers):
                for index, error in errors:
                    rows[index] = self._row(chunk[index], None, k, error)
                for row, index in enumerate(indices):
                    rows[index] = self._row(chunk[index], probs[row], k, "")
                    if reject_below is not None and rows[index]["probability"] < reject_below:
                        rows[index]["label"] = UNKNOWN
            yield from rows

    def _row(self, source: ImageInput, probs: torch.Tensor | None, k: int, error: str) -> dict[str, Any]:
        path = str(source) if isinstance(source, (str, os.PathLike)) else ""
        if probs is None:
            return {"path": path, "label": "", "probability": None, "top_k": [], "calibrated": self.calibrated,
                    "error": error}
        values, idx = probs.topk(k)
        top = [{"label": self.class_names[i], "probability": float(v)} for v, i in zip(values.tolist(), idx.tolist())]
        return {"path": path, "label": top[0]["label"], "probability": top[0]["probability"], "top_k": top,
                "calibrated": self.calibrated, "error": ""}


def expand_inputs(items: Sequence[str]) -> list[str]:
    """Files, folders (recursive, images only) and glob patterns -> sorted unique file list."""
    import glob

    from ..data.image import is_image_path

    found: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found.extend(str(p) for p in sorted(path.rglob("*")) if p.is_file() and is_image_path(p)
                         and not any(part.startswith(".") for part in p.relative_to(path).parts))
        elif path.exists():
            found.append(str(path))
        else:
            matches = sorted(glob.glob(item, recursive=True))
            found.extend(matches if matches else [item])  # a missing file becomes an error row
    seen: set[str] = set()
    return [p for p in found if not (p in seen or seen.add(p))]

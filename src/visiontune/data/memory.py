"""Images decoded once into memory, augmented as tensors in the training process.

A training epoch over files pays for reading, decoding and resizing every image again, in loader
workers that compete with the model for the same cores (on a 2-core machine, the pipeline was
half of the time at 64 px). With the images in memory there is nothing left for workers to do:

- training images are decoded once and kept as uint8 CHW tensors, downscaled (never upscaled)
  so that the shorter side is at most what the resize step needs; each epoch augments them with
  tensor ops in the main process (:func:`~visiontune.data.transforms.tensor_train_transform`);
- validation images are kept as their exact evaluation pixels (the same
  :func:`~visiontune.data.preprocess.resize` as ``evaluate`` and ``predict``), normalised per batch.

Augmentation stays a function of ``(seed, epoch, index)`` (:mod:`visiontune.data.sampling`), so a
resumed run repeats it exactly. An image that cannot be read when it is decoded (the scan read it
moments before) is left out of the set for the whole run, with a warning: the epoch length stays
constant, as :mod:`visiontune.data.dataset`'s policy requires.

Example:
    >>> spec = Preprocessing.from_dict({"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3})
    >>> store = MemoryImages([Image.new("RGB", (40, 30))], spec.resize_side())
    >>> tuple(store.images[0].shape), store.nbytes
    ((3, 30, 40), 3600)
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.ops import roi_align

from .image import try_load
from .labels import stack_targets
from .preprocess import Preprocessing, open_image, resize
from .sampling import SampleKey, sample_seed, seeded
from .scan import Sample
from .transforms import NormalizeTensor

log = logging.getLogger(__name__)


def stored_size(width: int, height: int, side: int) -> tuple[int, int]:
    """(width, height) of an image kept with its shorter side at most ``side`` (no upscaling)."""
    scale = min(1.0, side / min(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def estimate_bytes(paths: Sequence[str], side: int, sample: int = 200) -> int:
    """Memory :class:`MemoryImages` would take, from the headers of up to ``sample`` files."""
    if not paths:
        return 0
    step = max(1, len(paths) // sample)
    total, seen = 0, 0
    for path in paths[::step]:
        try:
            with open_image(path) as img:
                w, h = stored_size(img.width, img.height, side)
        except Exception:  # unreadable files were skipped by the scan; count them as average
            continue
        total, seen = total + 3 * w * h, seen + 1
    return int(total / max(seen, 1) * len(paths))


# share of the available memory images may take when --cache-images is left to decide (auto)
MEMORY_SHARE = 0.25


def store_side(spec: Preprocessing, augment: str) -> int:
    """The shorter side images are kept at: what the resize needs, or twice that for the
    random-resized-crop recipes (a crop of a quarter of the area still has the input's pixels)."""
    return spec.resize_side() * (2 if augment in ("standard", "strong") else 1)


def should_cache(requested: bool | None, paths: Sequence[str], side: int, available: int) -> tuple[bool, int]:
    """(cache the images in memory?, estimated bytes): as ``requested``, or when it fits (``None``)."""
    needed = estimate_bytes(paths, side)
    if requested is not None:
        return requested, needed
    return needed <= MEMORY_SHARE * available, needed


class MemoryImages:
    """Every image decoded once: uint8 CHW tensors, shorter side at most ``side`` (None: unreadable)."""

    def __init__(self, sources: Sequence[str | Image.Image], side: int, draft: int | None = None,
                 threads: int = 8):
        def decode(source) -> torch.Tensor | None:
            img = try_load(source, draft)
            if img is None:
                return None
            size = stored_size(img.width, img.height, side)
            if size != img.size:
                img = img.resize(size, Image.Resampling.BICUBIC)
            return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()

        with ThreadPoolExecutor(max_workers=threads) as pool:
            self.images: list[torch.Tensor | None] = list(pool.map(decode, sources))
        self.nbytes = sum(t.numel() for t in self.images if t is not None)


# random resized crop (``standard``) samples boxes like torchvision's RandomResizedCrop
RRC_SCALE, RRC_RATIO = (0.25, 1.0), (3 / 4, 4 / 3)
BOX_AUGMENTS = ("standard", "crop-flip")  # augmented by boxes and flips, a whole batch at once


class MemoryTrainSet(Dataset):
    """Training samples from :class:`MemoryImages`.

    ``standard`` and ``crop-flip`` draw a crop box and a flip per sample (cheap: plain Python
    random numbers), and :class:`BatchAugment`, the loader's collate function, cuts, resizes,
    flips and normalises the whole batch in a few tensor ops. Other recipes run ``transform``
    (torchvision v2 on tensors) per sample. Either way the randomness of a sample is a function of
    ``(seed, epoch, index)`` when indexed by an ``(index, epoch)`` key from
    :class:`~visiontune.data.sampling.EpochSampler`.
    """

    def __init__(self, samples: list[Sample], images: MemoryImages, spec: Preprocessing, augment: str,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None, seed: int = 0):
        keep = _readable(samples, images.images)
        self.samples = [samples[i] for i in keep]
        self.images = [images.images[i] for i in keep]
        self.spec, self.augment, self.transform, self.seed = spec, augment, transform, seed
        self.nbytes = sum(t.numel() for t in self.images)
        self.batched = augment in BOX_AUGMENTS and spec.resize_mode != "letterbox"
        self.collate = BatchAugment(spec, augment) if self.batched else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | SampleKey):
        index, epoch = key if isinstance(key, tuple) else (key, None)
        image, label = self.images[index], self.samples[index][1]
        if self.batched:
            rng = random.Random(sample_seed(self.seed, epoch, index) if epoch is not None else index)
            return image, label, self._box(rng, image.shape[-1], image.shape[-2]), rng.random() < 0.5
        if epoch is None:
            return self.transform(image), label
        with seeded(sample_seed(self.seed, epoch, index)):
            return self.transform(image), label

    def _box(self, rng: random.Random, width: int, height: int) -> tuple[float, float, float, float]:
        """The region of the image that becomes the network's input, (x0, y0, x1, y1)."""
        if self.augment == "standard":
            return random_resized_box(rng, width, height)
        x0, y0, x1, y1 = eval_box(width, height, self.spec)
        jitter_x, jitter_y = (x1 - x0) / 8, (y1 - y0) / 8  # crop-flip: the eval view, shifted by up to 1/8
        dx, dy = rng.uniform(-jitter_x, jitter_x), rng.uniform(-jitter_y, jitter_y)
        return x0 + dx, y0 + dy, x1 + dx, y1 + dy


def eval_box(width: int, height: int, spec: Preprocessing) -> tuple[float, float, float, float]:
    """The region the evaluation resize shows: the whole image (squash) or the centre crop."""
    if spec.resize_mode != "crop":
        return 0.0, 0.0, float(width), float(height)
    scale = spec.resize_side() / min(width, height)  # the shorter side's resize, then the centre crop
    crop_w, crop_h = spec.width / scale, spec.height / scale
    return (width - crop_w) / 2, (height - crop_h) / 2, (width + crop_w) / 2, (height + crop_h) / 2


def random_resized_box(rng: random.Random, width: int, height: int) -> tuple[float, float, float, float]:
    """A random crop of 25-100% of the area and aspect ratio 3/4-4/3 (torchvision's sampling)."""
    area = width * height
    log_ratio = (math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*RRC_SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            x0, y0 = rng.randint(0, width - w), rng.randint(0, height - h)
            return float(x0), float(y0), float(x0 + w), float(y0 + h)
    side = min(width, height)  # fallback: the central square
    return (width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2


class BatchAugment:
    """Collate ``(uint8 image, label, box, flip)`` samples into a normalised float batch.

    Each box is cut from its image and resized to the input size with ``roi_align`` (bilinear,
    averaging over the source pixels when it shrinks), the reflection of the image filling
    whatever a shifted box reaches outside it; then flips and normalisation, batched.
    """

    def __init__(self, spec: Preprocessing, augment: str):
        self.size = (spec.height, spec.width)
        self.pad = augment == "crop-flip"
        self.normalize = NormalizeTensor(spec)  # broadcasts over the batch

    def __call__(self, batch: list) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels, boxes, flips = zip(*batch)
        # each axis padded by more than the 1/8 shift of a box spanning it: reflections, never black
        pads = [(math.ceil(img.shape[-1] / 7), math.ceil(img.shape[-2] / 7)) if self.pad else (0, 0)
                for img in images]
        if len({(tuple(img.shape), p) for img, p in zip(images, pads)}) == 1:  # one call for the whole batch
            out = self._cut(torch.stack(images), list(boxes), pads[0])
        else:
            out = torch.cat([self._cut(img[None], [box], p) for img, box, p in zip(images, boxes, pads)])
        flip = torch.tensor(flips)
        out = torch.where(flip.view(-1, 1, 1, 1), out.flip(-1), out)
        return self.normalize(out), stack_targets(labels)

    def _cut(self, images: torch.Tensor, boxes: list, pad: tuple[int, int]) -> torch.Tensor:
        x = images.float()
        px, py = pad
        if px or py:
            small = min(x.shape[-2:]) < 2 or px >= x.shape[-1] or py >= x.shape[-2]  # reflection needs room
            x = torch.nn.functional.pad(x, (px, px, py, py), mode="replicate" if small else "reflect")
        rois = torch.tensor([[i, x0 + px, y0 + py, x1 + px, y1 + py] for i, (x0, y0, x1, y1) in enumerate(boxes)],
                            dtype=torch.float32)
        return roi_align(x, rois, self.size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def _readable(samples: list[Sample], decoded: list) -> list[int]:
    """Indices of the decoded images; the others are named in a warning."""
    for (path, _), image in zip(samples, decoded):
        if image is None:
            log.warning("left out %s: unreadable when it was decoded into memory", path)
    return [i for i, image in enumerate(decoded) if image is not None]


class MemoryEvalSet(Dataset):
    """Samples kept as their exact evaluation pixels (uint8, input size), normalised on access:
    validation sets, and training sets whose augmentation is ``none`` or ``light`` (``flip``:
    mirrored with probability 1/2, seeded like :class:`MemoryTrainSet`)."""

    def __init__(self, samples: list[Sample], spec: Preprocessing, threads: int = 8, flip: bool = False,
                 seed: int = 0):
        self.samples, self.spec, self.flip, self.seed = list(samples), spec, flip, seed
        draft = spec.draft_size()

        def pixels(path: str) -> torch.Tensor | None:
            image = try_load(path, draft)
            return None if image is None else torch.from_numpy(np.array(resize(image, spec))).permute(2, 0, 1)

        with ThreadPoolExecutor(max_workers=threads) as pool:
            decoded = list(pool.map(pixels, [p for p, _ in self.samples]))
        keep = _readable(self.samples, decoded)
        self.samples = [self.samples[i] for i in keep]
        self.pixels = torch.stack([decoded[i] for i in keep]) if keep else torch.zeros(0, 3, spec.height, spec.width,
                                                                                      dtype=torch.uint8)
        self.nbytes = self.pixels.numel()
        self.normalize = NormalizeTensor(spec)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | SampleKey) -> tuple[torch.Tensor, int]:
        index = key[0] if isinstance(key, tuple) else key
        pixels = self.pixels[index]
        if self.flip and isinstance(key, tuple):
            with seeded(sample_seed(self.seed, key[1], index)):
                if torch.rand(1).item() < 0.5:
                    pixels = pixels.flip(-1)
        return self.normalize(pixels), self.samples[index][1]  # preprocess.normalize's arithmetic: the same bits

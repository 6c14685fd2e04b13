"""Grad-CAM overlays (package ``grad-cam``): where in the image the model looked for its answer.

The target layer is found automatically for timm and torchvision models: the last module, in
execution order, whose output is still a spatial feature map (4-D, before global pooling) --
e.g. ``bn2`` of timm's EfficientNets, ``layer4`` of ResNets, ``features`` of torchvision's
EfficientNet/MobileNet/VGG. Models the probe cannot run fall back to their last ``Conv2d``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..core.errors import ModelError
from ..data.image import readable
from ..data.transforms import denormalize

POOLING = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d, nn.Flatten, nn.Identity, nn.Dropout)


def find_target_layer(model: nn.Module, input_size: Sequence[int] = (3, 224, 224)) -> tuple[str, nn.Module]:
    """(dotted name, module) of the last spatial feature layer of ``model``.

    A probe forward pass (at >= 224 px, so the last stage still has a spatial map) records the
    modules that output a 4-D tensor larger than 1x1; pooling layers and post-pooling head norms
    are excluded, so the last one recorded is the final feature map.
    """
    names = {id(m): n for n, m in model.named_modules()}
    sizes = [tuple(input_size)]
    if min(input_size[1:]) < 224:
        sizes.insert(0, (input_size[0], 224, 224))
    for size in sizes:
        order: list[tuple[str, nn.Module]] = []

        def hook(module, _inp, out, order=order):
            if module is model or isinstance(module, POOLING) or "pool" in type(module).__name__.lower():
                return
            if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[-1] * out.shape[-2] > 1:
                order.append((names[id(module)], module))

        handles = [m.register_forward_hook(hook) for m in model.modules()]
        was_training = model.training
        try:
            model.eval()
            param = next(model.parameters())
            with torch.no_grad():
                model(torch.zeros(1, *size, device=param.device, dtype=param.dtype))
        except Exception:
            order.clear()
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        if order:
            return order[-1]
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ModelError(f"{type(model).__name__} has no convolutional layer for Grad-CAM; "
                         "explanations need a CNN feature map")
    return convs[-1]


def gradcam_overlays(classifier, images: Sequence[Image.Image], targets: Sequence[int] | None = None,
                     batch_size: int = 16, alpha: float = 0.5) -> list[np.ndarray]:
    """Overlay arrays (HxWx3 uint8, the input as the model sees it with the heatmap over it).

    ``targets``: class index per image (default: the predicted class).
    """
    # lazy: grad-cam (and OpenCV under it) load only when an explanation is asked for
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import show_cam_on_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = classifier.model
    if model is None:
        raise ModelError("Grad-CAM needs the PyTorch model (a run dir or model/ dir), not an exported graph")
    pre = classifier.preprocessing
    _, layer = find_target_layer(model, pre.input_size)
    for p in model.parameters():  # gradients flow to the feature map, weights are never updated
        p.requires_grad_(True)
    out: list[np.ndarray] = []
    with GradCAM(model=model, target_layers=[layer]) as cam:
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            batch = torch.stack([classifier.transform(img) for img in chunk]).to(classifier.device)
            chosen = (None if targets is None
                      else [ClassifierOutputTarget(int(t)) for t in targets[start:start + batch_size]])
            heat = cam(input_tensor=batch, targets=chosen)
            for tensor, mask in zip(batch, heat):
                rgb = denormalize(tensor, pre)
                out.append(show_cam_on_image(rgb, np.nan_to_num(mask), use_rgb=True, image_weight=1 - alpha))
    model.zero_grad(set_to_none=True)
    return out


def explain(classifier, paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
            batch_size: int = 16) -> list[Path]:
    """Write ``<out_dir>/<name>.gradcam.png`` per readable input (predicted class); return the paths.

    Unreadable inputs are skipped (``predict`` already reports them in its error column).

    Example:
        clf = visiontune.load("runs/train-1")
        explain(clf, ["ant.jpg"], "explain/")
        # -> [PosixPath('explain/ant.gradcam.png')]
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images, names = [], []
    used: set[str] = set()
    for path, img in readable(paths):
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).stem) or "image"
        name, n = stem, 1
        while name in used:
            n += 1
            name = f"{stem}-{n}"
        used.add(name)
        images.append(img)
        names.append(name)
    written = []
    for name, overlay in zip(names, gradcam_overlays(classifier, images, batch_size=batch_size)):
        target = out_dir / f"{name}.gradcam.png"
        Image.fromarray(overlay).save(target)
        written.append(target)
    return written

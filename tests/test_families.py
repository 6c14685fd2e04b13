"""Every backbone family the tutorials name, through every path: train (random init, one epoch,
at a small input size) -> evaluate -> export ONNX -> int8 -> prune -> serve's prediction path.

Each cell either works or is refused up front by name (pruning attention heads); no output of
any step may hold a Python traceback. The fast suite keeps one ViT (the only fast check
of attention through export, int8, serve and the pruning refusal); the CNN path is covered fast on
efficientnet_lite0 (trained_run with test_predict/test_serve, test_export/test_compress, the option
matrix's torchvision-scratch run), so resnet18 and the rest run with ``-m slow``.
The family table in docs/train.md states what this test measured.
"""

from __future__ import annotations

import json

import pytest
from conftest import make_folder, vt_main

# (model, input size): small members of each family, at sizes their stems accept
FAST_FAMILIES = [("vit_tiny_patch16_224", 64)]
SLOW_FAMILIES = [("resnet18", 64), ("torchvision:alexnet", 64), ("vgg11_bn", 64), ("torchvision:inception_v3", 96),
                 ("densenet121", 64), ("mobilenetv3_small_100", 64), ("efficientnet_b0", 64), ("convnext_atto", 64),
                 ("deit_tiny_patch16_224", 64), ("swin_tiny_patch4_window7_224", 64)]
ATTENTION = ("vit_", "deit_", "swin_")  # pruning refused by name: it would cut through attention heads


@pytest.fixture(scope="module")
def family_data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("families") / "data", per_class=6, size=48)


def _no_traceback(*texts: str) -> None:
    for text in texts:
        assert "Traceback" not in text and "Torch IR graph" not in text, text[-3000:]


def run_family(model: str, size: int, data, tmp_path, capfd) -> dict[str, str]:
    """Every path for one family; returns the outcome of each cell. ``capfd`` sees what C++ code
    writes to the file descriptors too (torch's ONNX exporter logs from C++)."""
    run = tmp_path / "run"
    cells = {}
    code, out, err = vt_main(capfd, "train", data, "--model", model, "--weights", "none", "--epochs", 1,
                             "--img-size", size, "--batch-size", 6, "--workers", 0, "--run-dir", run, "--no-report",
                             "--no-progress")
    _no_traceback(out, err)
    assert code == 0, err[-2000:]
    cells["train"] = "ok"
    code, out, err = vt_main(capfd, "evaluate", run, data, "--json", "--no-save")
    _no_traceback(out, err)
    assert code == 0 and 0.0 <= json.loads(out)["accuracy"] <= 1.0, err[-2000:]
    cells["evaluate"] = "ok"
    # a dynamic batch, as compress exports (both call export_onnx): the two cannot disagree
    code, out, err = vt_main(capfd, "export", run, "--format", "onnx", "--dynamic-batch", "--out",
                             tmp_path / "onnx" / "model.onnx")
    _no_traceback(out, err)
    assert code == 0, err[-2000:]
    onnx_file = tmp_path / "onnx" / "model.onnx"
    report = json.loads((onnx_file.parent / "export_report.json").read_text())
    assert report["passed"] and report["top1_agreement"] >= 0.995
    cells["onnx"] = "ok"
    code, out, err = vt_main(capfd, "compress", run, "--quantize", "int8", "--force", "--bench-seconds", "0.01",
                             "--out", tmp_path / "int8")
    _no_traceback(out, err)
    assert code == 0, err[-2000:]
    cells["int8"] = "ok"
    code, out, err = vt_main(capfd, "compress", run, "--prune", "0.3", "--finetune-epochs", 0, "--force",
                             "--bench-seconds", "0.01", "--out", tmp_path / "prune")
    _no_traceback(out, err)
    if model.startswith(ATTENTION):
        assert code == 2 and "attention" in err and not (tmp_path / "prune").exists(), err[-2000:]
        cells["prune"] = "refused"
    else:
        assert code == 0, err[-2000:]
        cells["prune"] = "ok"
    import visiontune  # serve's prediction path: decode, transform, logits, row; on the ONNX file too
    from visiontune.data.image import load_image
    from visiontune.serve.app import _row

    image = next(data.rglob("*.png"))
    for source in (run, onnx_file):
        clf = visiontune.load(source)
        row = _row(clf, clf.logits(clf.transform(load_image(image))[None])[0], 2, None)
        assert row["label"] in clf.class_names and len(row["top_k"]) == 2
    cells["serve"] = "ok"
    return cells


@pytest.mark.timeout(600)
@pytest.mark.parametrize("model,size", FAST_FAMILIES)
def test_family_through_every_path(model, size, family_data, tmp_path, capfd):
    cells = run_family(model, size, family_data, tmp_path, capfd)
    assert set(cells) == {"train", "evaluate", "onnx", "int8", "prune", "serve"}


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("model,size", SLOW_FAMILIES)
def test_more_families_through_every_path(model, size, family_data, tmp_path, capfd):
    cells = run_family(model, size, family_data, tmp_path, capfd)
    assert set(cells) == {"train", "evaluate", "onnx", "int8", "prune", "serve"}


def test_time_budget_probe_measures_a_vit_at_every_candidate_size():
    """The planner measures each candidate input size; a ViT is built for one, so each is fitted."""
    from visiontune.models.factory import build_model
    from visiontune.training.budget import measure_throughput

    model, _, pre = build_model("vit_tiny_patch16_224", 3, "none")
    measured = measure_throughput(model, [32, 64], "32", batch_size=2, seconds=0.05)
    assert [m.size for m in measured] == [32, 64] and all(m.train > 0 and m.infer > 0 for m in measured)
    assert pre.height == 224 and model.patch_embed.img_size == (224, 224)  # the probe works on a copy

"""Exported graphs from strangers (inference/graph_files.py): no file read through a link, no
allocation bomb compiled, and the runtime cache (inference/accelerated.py, export/runtime.py)
never serves a graph that is not this user's own for this model."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import refuse_to_measure
from onnx import TensorProto
from onnx import helper as oh

from visiontune.core.errors import ArtifactError, ExportError, VisiontuneError
from visiontune.export.runtime import load_classifier, prepare_runtime
from visiontune.inference import accelerated
from visiontune.inference.accelerated import GRAPH_FILES, runtime_dir, runtimes_root
from visiontune.inference.classifier import Classifier
from visiontune.inference.graph_files import onnx_model_bytes
from visiontune.inference.runners import OnnxRunner, TorchRunner

ov = pytest.importorskip("openvino")  # the test extra installs it


def _copy(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


# ----------------------------------------------------------------------------- links
def test_an_openvino_bin_linked_anywhere_is_refused_naming_the_link(openvino_folder, tmp_path, capsys):
    from conftest import vt_main

    folder = _copy(openvino_folder, tmp_path / "from a stranger")
    secret = tmp_path / "secret.bin"
    (folder / "model.bin").rename(secret)  # the real weights: a followed link would load and run
    (folder / "model.bin").symlink_to(secret)
    with pytest.raises(ExportError, match=r"model\.bin is a symbolic link"):
        Classifier.load(folder)
    image = next(Path(openvino_folder).parent.rglob("*.jpg"), None) or secret
    code, out, err = vt_main(capsys, "predict", str(folder), str(image))
    assert code == 2 and "symbolic link" in err and "Traceback" not in err and out == ""


def test_an_openvino_xml_or_onnx_file_that_is_a_link_is_refused(openvino_folder, onnx_file, tmp_path):
    folder = _copy(openvino_folder, tmp_path / "xml link")
    (folder / "model.xml").rename(tmp_path / "real.xml")
    (folder / "model.xml").symlink_to(tmp_path / "real.xml")
    with pytest.raises(ExportError, match="symbolic link"):
        Classifier.load(folder / "model.xml")
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "model.onnx").symlink_to(onnx_file)
    with pytest.raises(ExportError, match="symbolic link"):
        Classifier.load(tmp_path / "onnx" / "model.onnx")


def _external(onnx_file: Path, folder: Path, location: str) -> Path:
    """``onnx_file`` with its largest initializer moved to external data at ``location``."""
    model = onnx.load(str(onnx_file))
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    folder.mkdir(parents=True, exist_ok=True)
    data = tensor.raw_data
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(data)))):
        tensor.external_data.add(key=key, value=value)
    onnx.save(model, str(folder / "model.onnx"))
    return folder, data


def test_onnx_external_data_is_read_beside_the_file_and_never_through_a_link(onnx_file, tmp_path):
    folder, data = _external(onnx_file, tmp_path / "plain", "weights.bin")
    (folder / "weights.bin").write_bytes(data)
    reference = OnnxRunner.load(onnx_file)[0]
    inlined = OnnxRunner.load(folder / "model.onnx")[0]  # a legitimate external-data model still loads
    batch = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
    import torch

    np.testing.assert_allclose(inlined(torch.from_numpy(batch)).numpy(), reference(torch.from_numpy(batch)).numpy(),
                               rtol=0, atol=0)
    folder, data = _external(onnx_file, tmp_path / "linked", "weights.bin")
    (tmp_path / "outside.bin").write_bytes(data)
    (folder / "weights.bin").symlink_to(tmp_path / "outside.bin")
    with pytest.raises(ExportError, match="symbolic link"):
        onnx_model_bytes(folder / "model.onnx")
    for location in ("../outside.bin", str(tmp_path / "outside.bin"), "sub/weights.bin"):
        folder, _ = _external(onnx_file, tmp_path / f"escape{len(location)}", location)
        with pytest.raises(ExportError, match="directly in its folder"):
            onnx_model_bytes(folder / "model.onnx")


# ----------------------------------------------------------------------------- allocation bombs
METADATA = {"class_names": json.dumps(["a", "b", "c"]),
            "preprocessing": json.dumps({"input_size": [3, 8, 8], "mean": [0.5] * 3, "std": [0.5] * 3})}


def _onnx_bomb(path: Path, rows: int) -> Path:
    """A few hundred bytes asking constant folding for ``rows`` x 10,000 floats."""
    shape = oh.make_tensor("shape", TensorProto.INT64, [2], [rows, 10_000])
    fill = oh.make_tensor("v", TensorProto.FLOAT, [1], [1])
    nodes = [oh.make_node("ConstantOfShape", ["shape"], ["big"], value=fill),
             oh.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
             oh.make_node("ReduceMean", ["input"], ["m"], axes=[2, 3], keepdims=0),
             oh.make_node("Add", ["m", "s"], ["logits"])]
    graph = oh.make_graph(nodes, "bomb", [oh.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, 8, 8])],
                          [oh.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])], [shape])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    for key, value in METADATA.items():
        model.metadata_props.add(key=key, value=value)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _openvino_bomb(path: Path, rows: int) -> Path:
    """The audit's bomb: Broadcast of a scalar to ``rows`` x 10,000, folded when the model compiles."""
    from openvino import opset13 as ops

    param = ops.parameter([-1, 3, 8, 8], np.float32, name="input")
    big = ops.broadcast(ops.constant(np.array([1.0], np.float32)), ops.constant(np.array([rows, 10_000], np.int64)))
    total = ops.reduce_sum(big, ops.constant(np.array([0, 1], np.int64)), keep_dims=False)
    out = ops.add(ops.reduce_mean(param, ops.constant(np.array([2, 3], np.int64)), keep_dims=False), total)
    out.output(0).get_tensor().set_names({"logits"})
    model = ov.Model([out], [param], "bomb")
    for key, value in METADATA.items():
        model.set_rt_info(value, ["visiontune", key])
    path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(path), compress_to_fp16=False)
    return path


@pytest.mark.parametrize("make, suffix", [(_onnx_bomb, ".onnx"), (_openvino_bomb, ".xml")])
def test_a_constant_folding_bomb_is_refused_before_compiling(make, suffix, tmp_path):
    bomb = make(tmp_path / "bomb" / f"model{suffix}", 40_000)  # 1.6 GB of floats from a few KB
    assert sum(p.stat().st_size for p in bomb.parent.iterdir()) < 8192
    with pytest.raises(ExportError, match="constant folding would create"):
        Classifier.load(bomb)
    small = make(tmp_path / "small" / f"model{suffix}", 10)  # the same graph folding 100,000 floats loads
    clf = Classifier.load(small)
    assert clf.class_names == ["a", "b", "c"]


def test_a_huge_computed_tensor_is_refused(tmp_path):
    """A fixed-size Tile of the input to 2**28 elements per image: refused, whatever folding does."""
    nodes = [oh.make_node("Tile", ["input", "reps"], ["big"]),
             oh.make_node("ReduceMean", ["big"], ["m"], axes=[2, 3], keepdims=0),
             oh.make_node("Identity", ["m"], ["logits"])]
    reps = oh.make_tensor("reps", TensorProto.INT64, [4], [1, 1, 2**12, 2**11])
    graph = oh.make_graph(nodes, "tile", [oh.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [oh.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])], [reps])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    for key, value in METADATA.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(tmp_path / "tile.onnx"))
    with pytest.raises(ExportError, match="elements per image"):
        Classifier.load(tmp_path / "tile.onnx")


# ----------------------------------------------------------------------------- the runtime cache
def _twin(tiny_model, tmp_path: Path) -> Path:
    """A second model: the same weights with another temperature (another cache key)."""
    twin = _copy(tiny_model[0] / "model", tmp_path / "twin")
    card = json.loads((twin / "model.json").read_text())
    card["calibration"] = {**(card.get("calibration") or {}), "temperature": 3.0}
    (twin / "model.json").write_text(json.dumps(card))
    return twin


def test_an_entry_renamed_to_another_models_key_is_not_used(tiny_model, measured_cache, tmp_path, monkeypatch):
    twin = _twin(tiny_model, tmp_path)
    mine, theirs = runtime_dir(tiny_model[0] / "model"), runtime_dir(twin)
    assert mine != theirs
    shutil.copytree(mine, theirs)  # the first model's graphs under the twin's key
    clf = Classifier.load(twin, backend="onnxruntime")
    assert type(clf.runner) is TorchRunner  # the record names the first model's key: not used
    lines = []
    refuse_to_measure(monkeypatch)  # what matters is that a measurement starts, for the twin's own key
    choice = prepare_runtime(twin, log=lines.append)  # measured again for its own key
    assert "measuring" in lines[0] and choice["key"] == accelerated.runtime_key(twin)


def test_a_cache_root_of_another_user_or_a_link_runs_eager(tiny_model, measured_cache, tmp_path, monkeypatch):
    real_uid = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: real_uid + 4242)  # the root now belongs to "someone else"
    lines = []
    clf = load_classifier(tiny_model[0], log=lines.append)
    assert type(clf.runner) is TorchRunner and "another user" in lines[-1] and "VISIONTUNE_CACHE" in lines[-1]
    monkeypatch.setattr(os, "getuid", lambda: real_uid)
    root = runtimes_root()
    root.rename(tmp_path / "elsewhere")
    root.symlink_to(tmp_path / "elsewhere")  # a planted link: never followed
    lines = []
    clf = load_classifier(tiny_model[0], log=lines.append)
    assert type(clf.runner) is TorchRunner and "not a folder of this user's" in lines[-1]


def test_the_cache_root_is_private(tiny_model, measured_cache):
    root = runtimes_root()
    for lock in root.glob("*.lock"):
        lock.unlink()
    os.chmod(root, 0o755)  # as an older release made it
    lines = []
    prepare_runtime(tiny_model[0], log=lines.append)
    assert "measured before" in lines[-1]
    assert (root.stat().st_mode & 0o777) == 0o700
    locks = list(root.glob("*.lock"))
    assert locks and all((p.stat().st_mode & 0o777) == 0o600 for p in locks)


def test_a_planted_lock_link_creates_nothing_elsewhere(tiny_model, own_cache, tmp_path):
    root = runtimes_root()
    root.mkdir(parents=True, mode=0o700)
    name = accelerated.entry_name(accelerated.runtime_key(tiny_model[0] / "model")) + ".lock"
    target = tmp_path / "created elsewhere"
    (root / name).symlink_to(target)
    lines = []
    choice = prepare_runtime(tiny_model[0], log=lines.append)
    assert choice["backend"] == "eager" and not target.exists() and "lock" in lines[-1]


def test_a_held_lock_times_out_with_a_message_instead_of_hanging(tiny_model, own_cache):
    root = runtimes_root()
    root.mkdir(parents=True, mode=0o700)
    lock = root / (accelerated.entry_name(accelerated.runtime_key(tiny_model[0] / "model")) + ".lock")
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another process measuring (or stuck)
        lines = []
        choice = prepare_runtime(tiny_model[0], log=lines.append, lock_timeout=0.0)
    assert choice["backend"] == "eager" and choice["verified"] == []
    assert "held" in lines[-1] and str(lock) in lines[-1] and "eager" in lines[-1]


def _sparse_weights(model_dir: Path, extra_bytes: int) -> None:
    """Declare an extra tensor of ``extra_bytes`` in the safetensors header; the file grows sparsely."""
    path = model_dir / "model.safetensors"
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + size])
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    header["junk"] = {"dtype": "U8", "shape": [extra_bytes], "data_offsets": [end, end + extra_bytes]}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)) + text + raw[8 + size:])
        fh.truncate(8 + len(text) + end + extra_bytes)


def test_a_crafted_weights_file_is_refused_before_it_is_hashed_and_leaves_no_entry(tiny_model, own_cache, tmp_path,
                                                                                   monkeypatch, capsys):
    from conftest import vt_main

    crafted = _copy(tiny_model[0] / "model", tmp_path / "crafted")
    _sparse_weights(crafted, 2**32)  # 4 GiB, sparse: nothing on disk

    def never(*args):
        raise AssertionError("hashed before validation")

    monkeypatch.setattr(accelerated, "_files_digest", never)
    with pytest.raises(ArtifactError, match="does not have"):
        prepare_runtime(crafted, log=lambda _: None)
    with pytest.raises(VisiontuneError):
        load_classifier(crafted, log=lambda _: None)
    monkeypatch.undo()
    image = next(tiny_model[1].rglob("*.jpg"))
    code, _, err = vt_main(capsys, "predict", str(crafted), str(image), "--backend", "auto")
    assert code == 2 and "does not have" in err and "Traceback" not in err
    assert not runtimes_root().exists() or not [p for p in runtimes_root().iterdir() if p.is_dir()]


def test_graph_files_in_the_cache_are_read_without_following_links(tiny_model, measured_cache, tmp_path):
    choice = prepare_runtime(tiny_model[0], log=lambda _: None)
    entry = runtime_dir(tiny_model[0] / "model")
    graph = entry / GRAPH_FILES["onnxruntime"]
    graph.rename(tmp_path / "moved.onnx")
    graph.symlink_to(tmp_path / "moved.onnx")
    clf = Classifier.load(tiny_model[0], backend="onnxruntime")
    assert "onnxruntime" in choice["verified"] and type(clf.runner) is TorchRunner

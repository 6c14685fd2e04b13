"""Fuzzing the readers of exported graphs from strangers: ONNX bytes, OpenVINO XML, and the
visiontune metadata inside them (inference/graph_files.py, inference/runners.py).

Whatever the bytes, loading ends in a model or in visiontune's own error, never anything else,
and a small file never makes the reader allocate in proportion to a number it declares.
"""

from __future__ import annotations

import json
import tracemalloc

import pytest
from hypothesis import given
from hypothesis import strategies as st

from visiontune.core.errors import VisiontuneError
from visiontune.inference.graph_files import onnx_model_bytes
from visiontune.inference.runners import card_from_metadata, openvino_compile

pytestmark = pytest.mark.fuzz
PEAK_BYTES = 64 * 2**20

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=20)
VALID = {"class_names": json.dumps(["a", "b"]),
         "preprocessing": json.dumps({"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}),
         "architecture": "", "temperature": "1.0", "task": "single"}
KEYS = [*VALID, "thresholds"]


def _bounded(call):
    """Run ``call``; only visiontune's errors may escape, and Python allocations stay bounded."""
    tracemalloc.start()
    try:
        call()
    except VisiontuneError:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < PEAK_BYTES


@given(props=st.dictionaries(st.sampled_from(KEYS), st.text(max_size=200) | json_values.map(json.dumps), max_size=6),
       keep_valid=st.booleans())
def test_graph_metadata_gives_a_card_or_a_clear_error(props, keep_valid, tmp_path_factory):
    merged = {**VALID, **props} if keep_valid else props
    folder = tmp_path_factory.mktemp("meta")
    _bounded(lambda: card_from_metadata(folder / "model.onnx", merged, "onnx"))


@pytest.fixture(scope="module")
def onnx_bytes() -> bytes:
    """A small valid classifier graph with visiontune metadata (a convolution, a mean, a folded shape)."""
    import numpy as np
    from onnx import TensorProto
    from onnx import helper as oh

    weights = oh.make_tensor("w", TensorProto.FLOAT, [3, 3, 3, 3], np.linspace(-1, 1, 81).tolist())
    shape = oh.make_tensor("shape", TensorProto.INT64, [2], [1, 3])
    nodes = [oh.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]),
             oh.make_node("ReduceMean", ["c"], ["m"], axes=[2, 3], keepdims=0),
             oh.make_node("ConstantOfShape", ["shape"], ["zero"],
                          value=oh.make_tensor("v", TensorProto.FLOAT, [1], [0])),
             oh.make_node("Add", ["m", "zero"], ["logits"])]
    graph = oh.make_graph(nodes, "small", [oh.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, 8, 8])],
                          [oh.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])], [weights, shape])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    for key, value in {**VALID, "class_names": json.dumps(["a", "b", "c"])}.items():
        model.metadata_props.add(key=key, value=value)
    return model.SerializeToString()


@given(data=st.data())
def test_mutated_onnx_files_load_or_fail_clearly(onnx_bytes, data, tmp_path_factory):
    raw = bytearray(onnx_bytes)
    for _ in range(data.draw(st.integers(1, 8))):
        where = data.draw(st.integers(0, len(raw) - 1))
        raw[where] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[:data.draw(st.integers(0, len(raw)))]
    folder = tmp_path_factory.mktemp("onnx")
    (folder / "model.onnx").write_bytes(bytes(raw))
    _bounded(lambda: onnx_model_bytes(folder / "model.onnx"))


@given(raw=st.binary(max_size=2048))
def test_arbitrary_bytes_as_onnx_fail_clearly(raw, tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    (folder / "model.onnx").write_bytes(raw)
    _bounded(lambda: onnx_model_bytes(folder / "model.onnx"))


SHAPES = st.lists(st.integers(-3, 2**40), min_size=0, max_size=4).map(lambda dims: ",".join(map(str, dims)))


@given(shape=SHAPES, element_type=st.sampled_from(["f32", "i64", "u8", "u1", "f16", "bogus"]),
       offset=st.integers(-8, 2**40), size=st.integers(0, 64))
def test_crafted_openvino_xml_compiles_or_fails_clearly(shape, element_type, offset, size, tmp_path_factory):
    pytest.importorskip("openvino")
    xml = f"""<?xml version="1.0"?>
<net name="fuzz" version="11"><layers>
<layer id="0" name="input" type="Parameter" version="opset1"><data shape="?,3,8,8" element_type="f32"/>
<output><port id="0" precision="FP32" names="input"><dim>-1</dim><dim>3</dim><dim>8</dim><dim>8</dim></port>
</output></layer>
<layer id="1" name="c" type="Const" version="opset1">
<data element_type="{element_type}" shape="{shape}" offset="{offset}" size="{size}"/>
<output><port id="0"/></output></layer>
<layer id="2" name="shape" type="Const" version="opset1"><data element_type="i64" shape="2" offset="0" size="16"/>
<output><port id="0" precision="I64"><dim>2</dim></port></output></layer>
<layer id="3" name="b" type="Broadcast" version="opset3"><input><port id="0"/><port id="1"/></input>
<output><port id="2" names="logits"/></output></layer>
<layer id="4" name="out" type="Result" version="opset1"><input><port id="0"/></input></layer>
</layers><edges><edge from-layer="1" from-port="0" to-layer="3" to-port="0"/>
<edge from-layer="2" from-port="0" to-layer="3" to-port="1"/>
<edge from-layer="3" from-port="2" to-layer="4" to-port="0"/>
</edges></net>"""
    folder = tmp_path_factory.mktemp("ov")
    (folder / "model.xml").write_text(xml)
    (folder / "model.bin").write_bytes(bytes(range(64)))
    _bounded(lambda: openvino_compile(folder / "model.xml"))

"""Open Inference Protocol (KServe v2) tests: Triton's own HTTP client against a real uvicorn server.

Parity, not numbers: the v2 answers must equal ``/v1/predict``'s for the same images, and an FP32
input must equal the BYTES input it was preprocessed from.
"""

from __future__ import annotations

import base64
import json
import struct

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
httpclient = pytest.importorskip("tritonclient.http")
from test_serve import GatedModel, png_bytes, running_server, sample_files  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from visiontune.data.image import load_image  # noqa: E402
from visiontune.serve import ServeSettings  # noqa: E402
from visiontune.task import get_task  # noqa: E402

MODEL = "visiontune"  # ServeSettings.model_name's default
CLOSE = {"rtol": 1e-4, "atol": 1e-6}  # the same images batched differently: float noise only


@pytest.fixture(scope="module")
def client(server):
    triton = httpclient.InferenceServerClient(server.removeprefix("http://"))
    yield triton
    triton.close()


@pytest.fixture(scope="module")
def images(trained_run) -> list[bytes]:
    """A PNG from the training data and a JPEG made from another."""
    from PIL import Image

    first, second = sample_files(trained_run[1], 2)
    return [first.read_bytes(), png_bytes(Image.open(second).convert("RGB"), "JPEG", quality=90)]


def v1_probabilities(url: str, clf, blobs: list[bytes]) -> tuple[np.ndarray, list]:
    """``/v1/predict``'s probabilities ``[n, C]`` (class order) and its labels."""
    files = [("files", (f"{i}.img", blob)) for i, blob in enumerate(blobs)]
    rows = httpx.post(f"{url}/v1/predict?top_k={len(clf.class_names)}", files=files, timeout=30).json()["predictions"]
    if clf.task.name == "multi":
        return np.array([[r["scores"][c] for c in clf.class_names] for r in rows]), [r["labels"] for r in rows]
    probs = [[next(t["probability"] for t in r["top_k"] if t["label"] == c) for c in clf.class_names] for r in rows]
    return np.array(probs), [r["label"] for r in rows]


def text(element: bytes | str) -> str:
    """A BYTES output element: bytes from binary data, a string from JSON (as tritonclient gives them)."""
    return element.decode() if isinstance(element, bytes) else element


def bytes_input(blobs: list[bytes], binary: bool = True):
    tensor = httpclient.InferInput("image", [len(blobs)], "BYTES")
    if binary:
        return tensor.set_data_from_numpy(np.array(blobs, dtype=np.object_))
    # JSON elements are strings: the images travel in base64
    return tensor.set_data_from_numpy(np.array([base64.b64encode(b) for b in blobs], dtype=np.object_),
                                      binary_data=False)


def test_health_and_metadata(client, clf):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
    assert not client.is_model_ready("other") and not client.is_model_ready(MODEL, "2")
    server = client.get_server_metadata()
    assert server["name"] == "visiontune" and server["version"] and "binary_tensor_data" in server["extensions"]
    meta = client.get_model_metadata(MODEL)
    assert meta["name"] == MODEL and meta["versions"] == ["1"] and meta["platform"] == "visiontune"
    inputs = {t["name"]: (t["datatype"], t["shape"]) for t in meta["inputs"]}
    assert inputs == {"image": ("BYTES", [-1]), "pixel_values": ("FP32", [-1, *clf.preprocessing.input_size])}
    outputs = {t["name"]: (t["datatype"], t["shape"]) for t in meta["outputs"]}
    assert outputs == {"probabilities": ("FP32", [-1, len(clf.class_names)]), "labels": ("BYTES", [-1]),
                       "unknown_score": ("FP32", [-1])}  # the model has an unknown-score (tests/test_unknown.py)
    with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
        client.get_model_metadata("nope")


def test_bytes_infer_equals_v1_predict(client, server, clf, images):
    want, labels = v1_probabilities(server, clf, images)
    default = client.infer(MODEL, [bytes_input(images)], request_id="r1")  # all outputs, binary
    assert default.get_response()["id"] == "r1" and default.get_output("labels")["parameters"]["binary_data_size"]
    as_json = client.infer(MODEL, [bytes_input(images, binary=False)],
                           outputs=[httpclient.InferRequestedOutput(n, binary_data=False)
                                    for n in ("labels", "probabilities")])
    assert [o["name"] for o in as_json.get_response()["outputs"]] == ["labels", "probabilities"]
    assert "data" in as_json.get_output("probabilities")
    mixed = client.infer(MODEL, [bytes_input(images)], outputs=[
        httpclient.InferRequestedOutput("probabilities", binary_data=False), httpclient.InferRequestedOutput("labels")])
    for result in (default, as_json, mixed):
        probs = result.as_numpy("probabilities")
        assert probs.dtype == np.float32 and probs.shape == (2, len(clf.class_names))
        np.testing.assert_allclose(probs, want, **CLOSE)
        np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
        assert [text(s) for s in result.as_numpy("labels")] == labels
    only = client.infer(MODEL, [bytes_input(images[:1])], outputs=[httpclient.InferRequestedOutput("labels")])
    assert only.as_numpy("probabilities") is None and text(only.as_numpy("labels")[0]) == labels[0]


def test_fp32_infer_equals_bytes_infer(client, clf, images):
    pixels = torch.stack([clf.transform(load_image(b)) for b in images]).numpy()
    reference = client.infer(MODEL, [bytes_input(images)]).as_numpy("probabilities")
    for binary in (True, False):
        tensor = httpclient.InferInput("pixel_values", list(pixels.shape), "FP32")
        tensor.set_data_from_numpy(pixels, binary_data=binary)
        np.testing.assert_allclose(client.infer(MODEL, [tensor]).as_numpy("probabilities"), reference, **CLOSE)


class MultiLabel:
    """The trained model read as a multi-label one (a sigmoid per class, thresholds 0.3)."""

    task, thresholds = get_task("multi"), [0.3, 0.3, 0.3]

    def __init__(self, clf):
        self.clf = clf

    def __getattr__(self, name):
        return getattr(self.clf, name)


def test_multi_label_labels_are_json_sets(clf, images):
    model = MultiLabel(clf)
    with running_server(model) as url:
        want, labels = v1_probabilities(url, model, images)
        triton = httpclient.InferenceServerClient(url.removeprefix("http://"))
        try:
            result = triton.infer(MODEL, [bytes_input(images)])
        finally:
            triton.close()
    np.testing.assert_allclose(result.as_numpy("probabilities"), want, **CLOSE)
    assert [json.loads(text(s)) for s in result.as_numpy("labels")] == labels


def _infer(url: str, request: dict, tail: bytes = b"", model: str = MODEL, version: str | None = None,
           **headers) -> httpx.Response:
    body = json.dumps(request).encode()
    if tail:
        headers["inference-header-content-length"] = str(len(body))
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    return httpx.post(url + path, content=body + tail, headers=headers, timeout=30)


def test_bad_requests_get_protocol_errors(server, clf, images):
    c, h, w = clf.preprocessing.input_size
    png = base64.b64encode(images[0]).decode()
    half = base64.b64encode(images[0][: len(images[0]) // 2]).decode()  # a truncated PNG
    one = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [png]}
    pixels = {"name": "pixel_values", "datatype": "FP32", "shape": [1, c, h, w]}
    cases = {
        "wrong model": (404, _infer(server, {"inputs": [one]}, model="resnet")),
        "wrong version": (404, httpx.get(f"{server}/v2/models/{MODEL}/versions/7")),
        "not json": (400, httpx.post(f"{server}/v2/models/{MODEL}/infer", content=b"{nope")),
        "NaN literal": (400, httpx.post(f"{server}/v2/models/{MODEL}/infer", content=b'{"inputs": NaN}')),
        "no inputs": (400, _infer(server, {"inputs": []})),
        "unknown input": (400, _infer(server, {"inputs": [{**one, "name": "img"}]})),
        "wrong datatype": (400, _infer(server, {"inputs": [{**one, "datatype": "FP32"}]})),
        "shape vs data": (400, _infer(server, {"inputs": [{**one, "shape": [2]}]})),
        "bad shape": (400, _infer(server, {"inputs": [{**pixels, "shape": [1, c, h + 1, w],
                                                       "data": [0.0] * c * (h + 1) * w}]})),
        "too few values": (400, _infer(server, {"inputs": [{**pixels, "data": [0.0] * 5}]})),
        "NaN pixels": (400, _infer(server, {"inputs": [{**pixels, "parameters": {"binary_data_size": c * h * w * 4}}]},
                                   np.full(c * h * w, np.nan, "<f4").tobytes())),
        "not base64": (400, _infer(server, {"inputs": [{**one, "data": ["%%%"]}]})),
        "corrupt image": (400, _infer(server, {"inputs": [{**one, "data": [half]}]})),
        "not an image": (415, _infer(server, {"inputs": [{**one, "data": [base64.b64encode(b"hello").decode()]}]})),
        "size mismatch": (400, _infer(server, {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                                           "parameters": {"binary_data_size": 3}}]},
                                      struct.pack("<I", 99) + b"abc")),
        "unknown output": (400, _infer(server, {"inputs": [one], "outputs": [{"name": "logits"}]})),
        "too many images": (413, _infer(server, {"inputs": [{**one, "shape": [65], "data": [png] * 65}]})),
    }
    for name, (status, answer) in cases.items():
        assert answer.status_code == status, (name, answer.status_code, answer.text)
        assert isinstance(answer.json()["error"], str) and answer.json()["error"], name
    assert "unknown model 'resnet'" in cases["wrong model"][1].json()["error"]
    assert "normalised" in cases["NaN pixels"][1].json()["error"]
    assert _infer(server, {"inputs": [one]}).status_code == 200  # the server is fine afterwards


# audit 8: values of any JSON type where a string, a number or an object belongs; only a string can
# be looked up among the input names (a list or an object is unhashable: it raised TypeError, a 500)
ONE = {"name": "image", "datatype": "BYTES", "shape": [1], "data": ["aGk="]}
MISTYPED = {
    "input name an object": {"inputs": [{"name": {"x": 1}}]},
    "input name a list": {"inputs": [{"name": ["image"]}]},
    "output name a list": {"inputs": [ONE], "outputs": [{"name": ["image"]}]},
    "output name an object": {"inputs": [ONE], "outputs": [{"name": {"labels": 1}}]},
    "datatype a list": {"inputs": [{**ONE, "datatype": ["BYTES"]}]},
    "shape an object": {"inputs": [{**ONE, "shape": {"n": 1}}]},
    "shape of lists": {"inputs": [{**ONE, "shape": [[1]]}]},
    "data an object": {"inputs": [{**ONE, "data": {"aGk=": 1}}]},
    "parameters a list": {"inputs": [{**ONE, "parameters": ["shared_memory_region"]}]},
    "binary_data_size a list": {"inputs": [{**ONE, "parameters": {"binary_data_size": [3]}}]},
    "binary_data_output an object": {"inputs": [ONE], "parameters": {"binary_data_output": {"x": 1}}},
    "binary_data a list": {"inputs": [ONE], "outputs": [{"name": "labels", "parameters": {"binary_data": [True]}}]},
    "inputs an object": {"inputs": {"image": ONE}},
    "input a list": {"inputs": [["image"]]},
    "outputs a string": {"inputs": [ONE], "outputs": "labels"},
    "id an object": {"inputs": [ONE], "id": {"x": 1}},
    "id a list": {"inputs": [ONE], "id": ["r1"]},
}


@pytest.mark.parametrize("version", [None, "1"])
@pytest.mark.parametrize("case", sorted(MISTYPED))
def test_values_of_the_wrong_type_get_400(server, case, version):
    answer = _infer(server, MISTYPED[case], version=version)
    assert answer.status_code == 400, (case, answer.status_code, answer.text)
    assert isinstance(answer.json()["error"], str) and answer.json()["error"]


def test_error_messages_echo_client_values_in_bounded_size(server):
    answer = _infer(server, {"inputs": [{"name": "x" * 100_000}]})
    assert answer.status_code == 400 and "unknown input 'xxx" in answer.json()["error"]
    assert len(answer.text) < 500


def test_a_full_queue_refuses_every_infer_path_before_reading_it(clf):
    """Audit 8: /v2/models/NAME/versions/1/infer was only refused after its body was read and parsed.

    The queue is made full by setting the app's admission counter (no timing): a body the endpoint
    would answer with 400 gets the middleware's 503, on every path that queues images.
    """
    from fastapi.testclient import TestClient

    from visiontune.serve import create_app

    app = create_app(clf, ServeSettings(warmup=False, max_queue=2))
    state = app.state.vt
    paths = ["/v1/predict", f"/v2/models/{MODEL}/infer", f"/v2/models/{MODEL}/versions/1/infer"]
    with TestClient(app, base_url="http://localhost") as client:
        assert any(client.get("/readyz").status_code == 200 for _ in range(100))  # loaded: each call yields
        state.pending = 2
        for path in paths:
            busy = client.post(path, content=b"{not json", headers={"content-type": "application/json"})
            assert busy.status_code == 503, (path, busy.text)
            assert busy.headers["retry-after"] == "1" and busy.json()["error"] == "overloaded"
        state.pending = 0  # the same bodies, now routed: the endpoints' own answers
        for path in paths:
            assert client.post(path, content=b"{not json", headers={"content-type": "application/json"}
                               ).status_code in (400, 415), path


def test_api_key_limits_timeout_and_readiness(clf, images, tmp_path):
    settings = ServeSettings(warmup=False, api_key="k", max_queue=2, max_body_mb=0.05, timeout_s=0.3)
    one = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(images[0]).decode()]}
    gated = GatedModel(clf)
    with running_server(gated, settings) as url:
        assert httpx.get(f"{url}/v2/health/live").status_code == 200  # health needs no key
        assert httpx.get(f"{url}/v2/health/ready").status_code == 200
        for path in ("/v2", f"/v2/models/{MODEL}", f"/v2/models/{MODEL}/ready"):
            assert httpx.get(url + path).status_code == 401, path
        refused = _infer(url, {"inputs": [one]})
        assert refused.status_code == 401 and "API key" in refused.json()["error"]
        key = {"x-api-key": "k"}
        assert httpx.get(f"{url}/v2", headers=key).status_code == 200
        assert _infer(url, {"inputs": [{**one, "shape": [3], "data": one["data"] * 3}]}, **key).status_code == 413
        assert _infer(url, {"inputs": [one], "pad": "x" * 60_000}, **key).status_code == 413  # body limit
        try:  # the model is held until the answer arrives: the server's 0.3 s deadline answered
            late = _infer(url, {"inputs": [one]}, **key)
            assert gated.entered.is_set() and late.status_code == 504 and late.json()["error"]
        finally:
            gated.release.set()
    broken = tmp_path / "model"
    broken.mkdir()
    (broken / "model.json").write_text("{not json")
    with running_server(str(broken), ServeSettings(warmup=False), wait_ready=False) as url:
        assert httpx.get(f"{url}/v2/health/live").status_code == 200
        assert httpx.get(f"{url}/v2/health/ready").status_code == 503
        assert _infer(url, {"inputs": [one]}).status_code == 503

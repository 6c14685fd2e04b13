"""The Open Inference Protocol (KServe v2, Triton's HTTP API) on ``/v2``, beside ``/v1``.

Routes: ``GET /v2/health/live``, ``GET /v2/health/ready`` (no API key), ``GET /v2`` (server
metadata), and for the model ``NAME`` (``ServeSettings.model_name``, ``visiontune`` unless set;
``/versions/1`` may follow it): ``GET /v2/models/NAME`` (metadata), ``GET .../ready`` and
``POST .../infer``.

An infer request has one input:

- ``image``, BYTES ``[n]``: encoded images (JPEG, PNG, ...), checked and decoded exactly as
  ``/v1/predict`` uploads are. In the binary tensor data extension (tritonclient's default) each
  element is the file's bytes; as JSON ``data``, each is the file's bytes in base64, since JSON
  strings cannot hold arbitrary bytes.
- ``pixel_values``, FP32 ``[n, 3, H, W]``: images already preprocessed as the model card says
  (``visiontune.data.preprocess.preprocess``), at the model's input size.

and two outputs (both unless ``outputs`` names some):

- ``probabilities``, FP32 ``[n, C]``: what ``/v1/predict`` reports, calibrated (softmax, or a
  sigmoid per label for a multi-label model);
- ``labels``, BYTES ``[n]``: the top-1 label (``unknown`` below ``--reject-below``), or for a
  multi-label model its label set as a JSON array (``["cat", "dog"]``, ``[]``): class names may
  hold any separator.

Binary tensor data extension: an ``Inference-Header-Content-Length`` header says how many bytes of
the body are JSON; an input with ``parameters.binary_data_size`` has its data in the bytes after
it (FP32 little-endian; each BYTES element a 4-byte little-endian length, then the bytes).
Outputs come back that way when requested (``parameters.binary_data_output`` for all, an output's
``parameters.binary_data`` for one). Errors are ``{"error": message}``, never a 5xx for bad input:
every value of the request is any JSON value until its type is checked (a list where a name
belongs cannot be looked up in a dict), and error messages show client values bounded in size.
"""

from __future__ import annotations

import base64
import binascii
import json
import reprlib
import struct
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from ..core.version import __version__
from ..data.preprocess import Preprocessing
from ..inference.rows import mark_unknown, probabilities
from .security import RequestError, check_api_key

if TYPE_CHECKING:  # the app imports this module: only type checkers read the other way
    from .app import ServeState

IMAGE, PIXELS = "image", "pixel_values"
INPUT_TYPES = {IMAGE: "BYTES", PIXELS: "FP32"}
OUTPUTS = ("probabilities", "labels")
UNKNOWN_SCORE = "unknown_score"  # an output of a model with an unknown-score: [n], below its threshold = unknown
VERSION = "1"  # the only version of the one model a server serves
HEADER_LENGTH = "inference-header-content-length"
# pixel_values may lie this far (in 0..1 pixel units) outside what real pixels normalise to: room
# for a client's own resampling, while values that overflow the network are refused
PIXEL_MARGIN = 0.5


def infer_paths(name: str) -> tuple[str, str]:
    """The URL paths of the model's infer endpoint, without and with its version: admission control
    refuses both cheaply while the queue is full."""
    return f"/v2/models/{name}/infer", f"/v2/models/{name}/versions/{VERSION}/infer"


class _ClientRepr(reprlib.Repr):
    """``repr`` of a client's value for an error message: a few levels, items and characters,
    whatever was sent (a 10 MB string or a list nested 900 deep is echoed as a short excerpt)."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother, self.maxlong = 3, 60, 60, 40
        self.maxlist = self.maxdict = self.maxtuple = 6

    def repr_int(self, x: int, level: int) -> str:
        # repr() of an int above 4300 digits raises ValueError (CPython's conversion limit)
        return f"<a {x.bit_length()}-bit integer>" if x.bit_length() > 128 else super().repr_int(x, level)


_shown = _ClientRepr().repr


class _ProtocolRoute(APIRoute):
    """A route whose :class:`RequestError` renders as the protocol's ``{"error": message}`` body
    (tritonclient shows ``error`` as the exception's message)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestError as exc:
                return JSONResponse({"error": exc.detail or exc.error}, exc.status, headers=exc.headers)

        return route


def router(state: ServeState) -> APIRouter:
    """The ``/v2`` routes, answering from the app's ``state`` with its limits and batching.

    Example:
        app.include_router(router(state))
    """
    settings = state.settings
    name = settings.model_name
    api = APIRouter(route_class=_ProtocolRoute, tags=["Open Inference Protocol (KServe v2)"])

    def model(request: Request, model_name: str) -> Any:
        """The classifier behind ``model_name``: 401 without the key, then 404 for another name, 503 until loaded."""
        check_api_key(settings.api_key, request.headers)
        version = request.path_params.get("version")
        if model_name != name or version not in (None, VERSION):
            asked = f"{model_name!r}" + (f" version {version!r}" if version is not None else "")
            raise RequestError(404, "unknown_model", f"unknown model {asked}: this server serves {name!r} "
                               f"version {VERSION!r}")
        return state.require_ready(request)

    @api.get("/v2/health/live", summary="Liveness (no API key)")
    async def live() -> Response:
        return Response(status_code=200)

    @api.get("/v2/health/ready", summary="Readiness: 503 until the model is loaded (no API key)")
    async def ready() -> Response:
        if state.ready:
            return Response(status_code=200)
        return Response(status_code=503, headers={"Retry-After": "1"})

    @api.get("/v2", summary="Server metadata")
    async def server_metadata(request: Request) -> dict[str, Any]:
        check_api_key(settings.api_key, request.headers)
        return {"name": "visiontune", "version": __version__, "extensions": ["binary_tensor_data"]}

    async def model_metadata(request: Request, model_name: str) -> dict[str, Any]:
        clf = model(request, model_name)
        return {"name": name, "versions": [VERSION], "platform": "visiontune",
                "inputs": [{"name": IMAGE, "datatype": "BYTES", "shape": [-1]},
                           {"name": PIXELS, "datatype": "FP32", "shape": [-1, *clf.preprocessing.input_size]}],
                "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(clf.class_names)]},
                            {"name": "labels", "datatype": "BYTES", "shape": [-1]}]
                + ([{"name": UNKNOWN_SCORE, "datatype": "FP32", "shape": [-1]}] if scored(clf) else [])}

    async def model_ready(request: Request, model_name: str) -> Response:
        model(request, model_name)
        return Response(status_code=200)

    async def infer(request: Request, model_name: str) -> Response:
        clf = model(request, model_name)
        if request.headers.get("content-encoding", "identity").lower() != "identity":
            raise RequestError(415, "unsupported_encoding", "compressed request bodies are not supported; "
                               "send the body uncompressed")
        body = await state.receive(request, _read_body)
        header, tail = split_body(body, request.headers.get(HEADER_LENGTH))
        inputs = read_inputs(header, tail, clf.preprocessing, settings.max_queue)
        outputs = requested_outputs(header, model_outputs(clf))
        request_id = header.get("id")
        if request_id is not None and not isinstance(request_id, str):
            raise RequestError(400, "bad_request", "'id' must be a string")
        logits, scores = clf.split(torch.stack(await state.logits(inputs)))
        probs = probabilities(logits, clf.temperature, task=clf.task)
        result = {"model_name": name, "model_version": VERSION, **({"id": request_id} if request_id else {})}
        values = {"probabilities": probs.numpy(), "labels": labels(clf, probs, settings.reject_below, scores)}
        if scores is not None:
            values[UNKNOWN_SCORE] = scores.numpy()
        return encode_response(result, outputs, values)

    for base in ("/v2/models/{model_name}", "/v2/models/{model_name}/versions/{version}"):
        documented = "versions" not in base  # the versioned twins behave the same
        api.add_api_route(base, model_metadata, methods=["GET"], summary="Model metadata: inputs and outputs",
                          include_in_schema=documented)
        api.add_api_route(f"{base}/ready", model_ready, methods=["GET"], summary="Model readiness",
                          include_in_schema=documented)
        api.add_api_route(f"{base}/infer", infer, methods=["POST"], summary="Classify images: inputs "
                          "'image' (BYTES) or 'pixel_values' (FP32)", include_in_schema=documented)
    return api


def scored(clf: Any) -> bool:
    """Whether the model answers with an unknown-score."""
    return getattr(clf, "unknown_threshold", None) is not None


def model_outputs(clf: Any) -> tuple[str, ...]:
    """The outputs this model gives: :data:`OUTPUTS`, and ``unknown_score`` when it has one."""
    return OUTPUTS + ((UNKNOWN_SCORE,) if scored(clf) else ())


def labels(clf: Any, probs: torch.Tensor, reject_below: float | None, scores: torch.Tensor | None = None
           ) -> list[str]:
    """Each row's label as ``/v1/predict`` decides it: the top-1 (``unknown`` below ``reject_below``
    or the unknown-score's threshold), or a multi-label model's label set at its thresholds (none
    for an unknown image), as a JSON array (``Task.answer_text``)."""
    task = clf.task
    rows = [task.row(p, clf.class_names, 1, thresholds=clf.thresholds, reject_below=reject_below) for p in probs]
    if scores is not None and scored(clf):
        rows = [mark_unknown(row, float(s), clf.unknown_threshold, task=task) for row, s in zip(rows, scores)]
    return [task.answer_text(row) for row in rows]


async def _read_body(request: Request) -> bytes:
    return b"".join([chunk async for chunk in request.stream()])


def _bad(detail: str) -> RequestError:
    return RequestError(400, "bad_request", detail)


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """The request's JSON object and the binary data after it (``Inference-Header-Content-Length``)."""
    size = len(body)
    if header_length is not None:
        try:
            size = int(header_length)
        except ValueError:  # also past CPython's 4300-digit limit of int()
            raise _bad(f"Inference-Header-Content-Length {_shown(header_length)} is not a number") from None
        if not 0 < size <= len(body):
            raise _bad(f"Inference-Header-Content-Length {size} does not fit the {len(body)} byte body")
    try:  # NaN and Infinity are not JSON: Python's parser would accept them
        header = json.loads(body[:size], parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _bad(f"the request is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise _bad("the request must be a JSON object")
    return header, body[size:]


def _parameters(where: dict[str, Any], what: str) -> dict[str, Any]:
    params = where.get("parameters", {})
    if not isinstance(params, dict):
        raise _bad(f"{what}: 'parameters' must be an object")
    if any(isinstance(key, str) and key.startswith("shared_memory") for key in params):
        raise _bad(f"{what}: the shared memory extension is not supported; send the data in the request")
    return params


def read_inputs(header: dict[str, Any], tail: bytes, pre: Preprocessing, max_images: int
                ) -> list[bytes] | list[torch.Tensor]:
    """The request's images: encoded (``image``) or preprocessed CHW tensors (``pixel_values``).

    Every field is checked before anything is sized by it: 400 for a malformed input, 413 for
    more than ``max_images`` images. ``pre`` is the model's preprocessing.
    """
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise _bad(f"'inputs' must hold exactly one tensor: {IMAGE!r} (BYTES, encoded images) or {PIXELS!r} "
                   f"(FP32, preprocessed [n, {', '.join(map(str, pre.input_size))}])")
    spec = inputs[0]
    name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
    if not isinstance(name, str) or name not in INPUT_TYPES:  # a list or an object is not hashable
        raise _bad(f"unknown input {_shown(name)}: this model takes {IMAGE!r} or {PIXELS!r}")
    if datatype != INPUT_TYPES[name]:
        raise _bad(f"input {name!r} must be {INPUT_TYPES[name]}, got {_shown(datatype)}")
    expected = [-1] if name == IMAGE else [-1, *pre.input_size]
    if not (isinstance(shape, list) and len(shape) == len(expected) and all(type(d) is int for d in shape)
            and shape[1:] == expected[1:]):
        raise _bad(f"input {name!r} must have shape {expected} (n images), got {_shown(shape)}")
    count = shape[0]
    if count < 1:
        raise _bad(f"input {name!r} holds no image")
    if count > max_images:
        raise RequestError(413, "too_many_images", f"at most {max_images} images per request")
    size = _parameters(spec, f"input {name!r}").get("binary_data_size")
    if size is None:
        if tail:
            raise _bad(f"binary data follows the JSON, but input {name!r} has no 'binary_data_size' parameter")
        if "data" not in spec:
            raise _bad(f"input {name!r} has neither 'data' nor a 'binary_data_size' parameter")
        if name == IMAGE:
            return _base64_images(spec["data"], count)
        return _pixel_rows(_json_floats(spec["data"]), shape, pre)
    if type(size) is not int or size != len(tail):
        raise _bad(f"input {name!r}: binary_data_size {_shown(size)} does not match the {len(tail)} bytes after "
                   "the JSON")
    if name == IMAGE:
        return _byte_elements(tail, count)
    if len(tail) % 4:
        raise _bad(f"input {name!r}: {len(tail)} bytes are not a whole number of FP32 values")
    return _pixel_rows(np.frombuffer(tail, dtype="<f4"), shape, pre)


def _byte_elements(raw: bytes, count: int) -> list[bytes]:
    """BYTES elements of the binary extension: each a little-endian uint32 length, then the bytes."""
    elements, pos = [], 0
    for _ in range(count):
        if pos + 4 > len(raw):
            raise _bad(f"binary BYTES data ends after {len(elements)} of {count} elements")
        (length,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + length > len(raw):
            raise _bad(f"BYTES element {len(elements)} declares {length} bytes; only {len(raw) - pos} follow")
        elements.append(raw[pos:pos + length])
        pos += length
    if pos != len(raw):
        raise _bad(f"{len(raw) - pos} bytes follow the {count} BYTES elements of the shape")
    return elements


def _base64_images(data: Any, count: int) -> list[bytes]:
    if not isinstance(data, list) or len(data) != count or not all(isinstance(x, str) for x in data):
        raise _bad(f"input {IMAGE!r} as JSON takes 'data': a list of {count} base64 strings (one per image)")
    try:
        return [base64.b64decode(x, validate=True) for x in data]
    except (binascii.Error, ValueError):
        raise _bad(f"input {IMAGE!r}: JSON elements must be the images' bytes in base64 (standard alphabet)") from None


def _json_floats(data: Any) -> np.ndarray:
    try:  # flat or nested as the shape: numpy refuses ragged lists
        values = np.asarray(data)
    except ValueError:
        raise _bad(f"input {PIXELS!r}: 'data' must be a list of numbers") from None
    if values.dtype.kind not in "iuf":
        raise _bad(f"input {PIXELS!r}: 'data' must be a list of numbers")
    return values


def _pixel_rows(values: np.ndarray, shape: list[int], pre: Preprocessing) -> list[torch.Tensor]:
    """Checked FP32 NCHW values -> one CHW tensor per image."""
    if values.size != int(np.prod(shape)):
        raise _bad(f"input {PIXELS!r}: shape {shape} needs {int(np.prod(shape))} values, got {values.size}")
    with np.errstate(over="ignore"):  # a float64 beyond FP32's range becomes inf: refused below, not logged
        batch = values.astype(np.float32).reshape(shape)  # a copy: the request's buffer is read-only
    mean = np.asarray(pre.mean, np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(pre.std, np.float32).reshape(1, -1, 1, 1)
    low, high = (-PIXEL_MARGIN - mean) / std, (1 + PIXEL_MARGIN - mean) / std
    if not np.all((batch >= low) & (batch <= high)):  # NaN fails both comparisons
        raise _bad(f"input {PIXELS!r} must be finite values normalised with the model's mean {list(pre.mean)} and "
                   f"std {list(pre.std)} from pixels in [0, 1]; send {IMAGE!r} to have the server preprocess")
    return list(torch.from_numpy(batch))


def requested_outputs(header: dict[str, Any], given: tuple[str, ...] = OUTPUTS) -> list[tuple[str, bool]]:
    """``(name, binary)`` of each output to return, in the request's order (all ``given`` when none are named)."""
    default = _parameters(header, "request").get("binary_data_output", False)
    if not isinstance(default, bool):
        raise _bad("parameter 'binary_data_output' must be true or false")
    outputs = header.get("outputs")
    if outputs is None or outputs == []:  # none named: all of them
        outputs = [{"name": name} for name in given]
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise _bad("'outputs' must be a list of objects with a 'name'")
    chosen: list[tuple[str, bool]] = []
    for output in outputs:
        name = output.get("name")
        if not isinstance(name, str) or name not in given:  # only a string can name one
            raise _bad(f"unknown output {_shown(name)}: this model gives {', '.join(map(repr, given))}")
        if name in (seen for seen, _ in chosen):
            raise _bad(f"output {name!r} is requested twice")
        params = _parameters(output, f"output {name!r}")
        if params.get("classification"):
            raise _bad("the classification extension is not supported; request 'labels' and 'probabilities'")
        binary = params.get("binary_data", default)
        if not isinstance(binary, bool):
            raise _bad(f"output {name!r}: parameter 'binary_data' must be true or false")
        chosen.append((name, binary))
    return chosen


def encode_response(result: dict[str, Any], outputs: list[tuple[str, bool]], values: dict[str, Any]) -> Response:
    """The infer response: JSON, or JSON then the binary outputs' bytes when any output is binary.

    ``values`` maps ``probabilities`` to a float array ``[n, C]`` and ``labels`` to ``n`` strings.
    """
    tensors, tail = [], []
    for name, binary in outputs:
        tensor, raw = _output_tensor(name, values[name], binary)
        if binary:
            tensor["parameters"] = {"binary_data_size": len(raw)}
            tail.append(raw)
        tensors.append(tensor)
    head = json.dumps({**result, "outputs": tensors}).encode()
    if not any(binary for _, binary in outputs):
        return Response(head, media_type="application/json")
    return Response(head + b"".join(tail), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(head))})


def _output_tensor(name: str, value: Any, binary: bool) -> tuple[dict[str, Any], bytes]:
    """An output's JSON description, with its ``data`` unless ``binary``, and else its bytes."""
    if name in ("probabilities", UNKNOWN_SCORE):
        tensor = {"name": name, "datatype": "FP32", "shape": list(value.shape)}
        if binary:
            return tensor, value.astype("<f4").tobytes()
        return {**tensor, "data": value.reshape(-1).tolist()}, b""
    tensor = {"name": name, "datatype": "BYTES", "shape": [len(value)]}
    if binary:
        return tensor, b"".join(struct.pack("<I", len(e)) + e for e in map(str.encode, value))
    return {**tensor, "data": list(value)}, b""

"""Property-based fuzzing of what ``visiontune serve`` reads from a request.

The Open Inference Protocol's parsers (``split_body``, ``read_inputs``, ``requested_outputs``) get
any bytes, any JSON value as the header, and valid requests with fields replaced, removed or their
binary data cut: only :class:`RequestError` with a 4xx status may escape, and a request never
allocates in proportion to a number it declares (a shape, a byte count, an element length). The
live app (``TestClient``, in this process) gets such bodies on both infer paths, and multipart
uploads with random part names, file names, content types and bytes on ``/v1/predict``: never a 5xx.

The number of examples comes from the profile in conftest.py (``VISIONTUNE_FUZZ``).
"""

from __future__ import annotations

import base64
import json
import struct
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("fastapi")
from conftest import FAST, make_image  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from test_serve import png_bytes  # noqa: E402

from visiontune.data.preprocess import Preprocessing  # noqa: E402
from visiontune.serve import ServeSettings, create_app  # noqa: E402
from visiontune.serve.oip import HEADER_LENGTH, infer_paths, read_inputs, requested_outputs, split_body  # noqa: E402
from visiontune.serve.security import RequestError  # noqa: E402

pytestmark = pytest.mark.fuzz

MODEL = "visiontune"
SIDE = FAST["img_size"]  # the input size of conftest's trained model, which the live app serves
PRE = Preprocessing((3, SIDE, SIDE), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
MAX_IMAGES = ServeSettings().max_queue
# far above what parsing a body of a few KB needs, far below what a declared size would cost
PEAK_BYTES = 64 * 2**20


# ----------------------------------------------------------------------------- strategies
def _images() -> list[bytes]:
    """A PNG and a JPEG of a class colour (small, real images the model can classify)."""
    img = make_image(np.random.default_rng(0), (220, 30, 30))
    return [png_bytes(img), png_bytes(img, "JPEG", quality=90)]


IMAGES = _images()
# an upload's bytes: anything, a real image, one cut short, one with a byte changed
PAYLOADS = (st.binary(max_size=200) | st.sampled_from(IMAGES)
            | st.tuples(st.sampled_from(IMAGES), st.floats(0, 1)).map(lambda t: t[0][: int(len(t[0]) * t[1])])
            | st.tuples(st.sampled_from(IMAGES), st.integers(0, 10**6), st.integers(0, 255)).map(
                lambda t: t[0][: t[1] % len(t[0])] + bytes([t[2]]) + t[0][t[1] % len(t[0]) + 1:]))
PROTOCOL_KEYS = ("inputs", "outputs", "name", "datatype", "shape", "data", "parameters", "binary_data_size",
                 "binary_data_output", "binary_data", "classification", "id", "shared_memory_region")
PROTOCOL_WORDS = ("image", "pixel_values", "probabilities", "labels", "BYTES", "FP32", "INT64", "")
# numbers a request may declare: sizes, counts, lengths (huge ones must cost nothing)
NUMBERS = (st.integers(-3, 300) | st.integers() | st.integers(2**31 - 2, 2**64 + 2)
           | st.sampled_from([2**32 - 1, 2**63, 10**12, 10**400, -(10**4000)]))
SCALARS = (st.none() | st.booleans() | NUMBERS | st.floats() | st.text(max_size=20)
           | st.sampled_from(PROTOCOL_WORDS))
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=6)
    | st.dictionaries(st.sampled_from(PROTOCOL_KEYS) | st.text(max_size=8), children, max_size=6),
    max_leaves=25)


def either(valid: st.SearchStrategy) -> st.SearchStrategy:
    """A field's valid values three times in four, else the same wrapped in a list or an object, or
    any JSON value: mostly valid fields, so that the checks after a field are reached too."""
    confused = valid.map(lambda v: [v]) | valid.map(lambda v: {"name": v}) | JSON_VALUES
    return mostly(valid, confused)


def mostly(usual: st.SearchStrategy, other: st.SearchStrategy) -> st.SearchStrategy:
    """``usual`` three times in four, else ``other`` (``one_of`` would flatten and weigh branches)."""
    return st.sampled_from([True, True, True, False]).flatmap(lambda pick: usual if pick else other)


def fields(required: dict[str, st.SearchStrategy] | None = None, **optional: st.SearchStrategy
           ) -> st.SearchStrategy:
    """An object with the ``required`` fields and any of the ``optional`` ones, each maybe confused."""
    return st.fixed_dictionaries({key: either(value) for key, value in (required or {}).items()},
                                 optional={key: either(value) for key, value in optional.items()})


# requests shaped like the protocol's, with fields of the wrong type: deep enough to reach every check
PARAMETERS = mostly(fields(binary_data_size=NUMBERS), fields(shared_memory_region=st.text(max_size=4)))
INPUT = fields({"name": st.sampled_from(["image", "pixel_values"]), "datatype": st.sampled_from(["BYTES", "FP32"]),
                "shape": st.sampled_from([[1], [2], [1, *PRE.input_size]]) | st.lists(NUMBERS, max_size=4)},
               data=st.lists(st.text("ABCDEFGHabcdefgh0123456789+/=", max_size=12) | st.floats(), max_size=4),
               parameters=PARAMETERS)
OUTPUT = fields({"name": st.sampled_from(["probabilities", "labels"])},
                parameters=fields(binary_data=st.booleans(), classification=NUMBERS))
SHAPED_HEADERS = st.fixed_dictionaries(
    {"inputs": st.lists(INPUT, min_size=1, max_size=1) | st.lists(INPUT, max_size=3)},
    optional={"outputs": st.lists(OUTPUT, max_size=3), "id": either(st.text(max_size=8)),
              "parameters": fields(binary_data_output=st.booleans())})
HEADERS = SHAPED_HEADERS | JSON_VALUES | st.dictionaries(st.sampled_from(PROTOCOL_KEYS), JSON_VALUES, max_size=5)
# Inference-Header-Content-Length as a client may send it (Starlette hands over latin-1 text)
HEADER_LENGTHS = (st.none() | NUMBERS.map(str) | st.text(max_size=12)
                  | st.sampled_from(["", " 5", "+3", "0x10", "1_0", "9" * 5000]))


def _pack(elements: list[bytes]) -> bytes:
    """BYTES elements in the binary extension: each a little-endian uint32 length, then the bytes."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def valid_requests(side: int, blobs: list[bytes] = IMAGES, fill: float = 0.0) -> list[tuple[dict[str, Any], bytes]]:
    """One infer request per way of sending images, ``(JSON header, binary tail)``: ``blobs`` as
    BYTES, or one image of ``fill`` values as FP32. Valid in the protocol; the images may not be."""
    pixels = [fill] * 3 * side * side
    as_base64 = [base64.b64encode(b).decode() for b in blobs]
    return [
        ({"id": "r1", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(blobs)], "data": as_base64}],
          "outputs": [{"name": "labels"}, {"name": "probabilities", "parameters": {"binary_data": False}}]}, b""),
        ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(blobs)],
                      "parameters": {"binary_data_size": len(_pack(blobs))}}],
          "parameters": {"binary_data_output": True}}, _pack(blobs)),
        ({"inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": [1, 3, side, side], "data": pixels}],
          "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}, b""),
        ({"inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": [1, 3, side, side],
                      "parameters": {"binary_data_size": 4 * len(pixels)}}]},
         np.full(len(pixels), fill, "<f4").tobytes()),
    ]


VALID = valid_requests(SIDE)


def _places(value: Any, path: tuple = ()) -> Iterator[tuple]:
    """The path of every value nested in ``value`` (dict keys and list indices), a list's first two
    elements standing for the rest: the fields, not the 3072 pixel values, are what a change hits."""
    yield path
    items = value.items() if isinstance(value, dict) else enumerate(value[:2]) if isinstance(value, list) else ()
    for key, child in items:
        yield from _places(child, (*path, key))


# how a field of a valid request is changed: its value wrapped in a list or an object (the type
# confusions), a number, any JSON value, or the field removed
MUTATIONS = ("list", "object", "number", "any", "remove")


@st.composite
def mutated_requests(draw: Callable) -> tuple[bytes, str | None]:
    """A request of :func:`valid_requests` (its images or pixel values maybe broken) with up to
    three fields changed (:data:`MUTATIONS`), its binary tail cut, extended, replaced or given a
    huge element length, and an Inference-Header-Content-Length that fits, lies or is not a
    number: ``(body, header length)``."""
    blobs = draw(mostly(st.just(IMAGES), st.lists(PAYLOADS, min_size=1, max_size=3)))
    fill = draw(mostly(st.just(0.0), st.floats(width=32)))
    header, tail = draw(st.sampled_from(valid_requests(SIDE, blobs, fill)))
    header = json.loads(json.dumps(header))  # a copy to change
    for _ in range(draw(mostly(st.integers(1, 3), st.just(0)))):
        places = list(_places(header))[1:]  # never the whole header: that is the arbitrary-header test
        if not places:
            break
        *parents, key = draw(st.sampled_from(places))
        owner = header
        for step in parents:
            owner = owner[step]
        how = draw(st.sampled_from(MUTATIONS))
        if how == "remove" and isinstance(owner, dict):
            del owner[key]
        else:
            owner[key] = {"list": lambda v: [v], "object": lambda v: {"x": v}, "number": lambda _: draw(NUMBERS),
                          "any": lambda _: draw(JSON_VALUES), "remove": lambda _: draw(JSON_VALUES)}[how](owner[key])
    # mostly framed as a client would, so that the changed fields are what gets parsed
    tail = draw(st.sampled_from(["keep"] * 5 + ["cut", "extend", "remove", "random", "huge length"]).flatmap(
        lambda how: st.binary(max_size=64) if how == "random" else st.just({
            "keep": tail, "cut": tail[: len(tail) // 2], "extend": tail + b"\0" * 7, "remove": b"",
            "huge length": struct.pack("<I", 2**32 - 1) + tail[4:]}[how])))
    text = json.dumps(header).encode()  # NaN as the literal JSON refuses
    framed = str(len(text)) if tail else None
    return text + tail, draw(mostly(st.just(framed), HEADER_LENGTHS))


# ----------------------------------------------------------------------------- the parsers
@contextmanager
def bounded_memory(limit: int = PEAK_BYTES) -> Iterator[None]:
    """Fail when the block's peak of traced allocations (Python and numpy) reaches ``limit``."""
    tracemalloc.start()
    try:
        yield
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < limit, f"{peak / 2**20:.0f} MiB allocated parsing a small request"


def client_error_or(call: Callable[[], Any]) -> Any:
    """``call()``'s result, or None for a :class:`RequestError` with a 4xx status and a message."""
    try:
        return call()
    except RequestError as exc:
        assert 400 <= exc.status < 500 and exc.error and str(exc), (exc.status, exc.error, str(exc))
        return None


def parse(body: bytes, header_length: str | None) -> None:
    """What the infer endpoint does with a body before the model sees it."""
    with bounded_memory():
        parts = client_error_or(lambda: split_body(body, header_length))
        if parts is None:
            return
        header, tail = parts
        assert isinstance(header, dict) and body.endswith(tail)
        inputs = client_error_or(lambda: read_inputs(header, tail, PRE, MAX_IMAGES))
        outputs = client_error_or(lambda: requested_outputs(header))
    if inputs is not None:
        assert 1 <= len(inputs) <= MAX_IMAGES
    if outputs is not None:
        assert outputs and all(name in ("probabilities", "labels") and isinstance(b, bool) for name, b in outputs)


@given(body=st.binary(max_size=400), header_length=HEADER_LENGTHS)
def test_split_body_takes_any_bytes(body, header_length):
    parse(body, header_length)


@given(header=HEADERS, tail=st.binary(max_size=64), header_length=HEADER_LENGTHS)
def test_parsers_take_any_json_value_as_the_header(header, tail, header_length):
    if isinstance(header, dict):  # as the parsers get it, NaN and huge integers included
        with bounded_memory():
            client_error_or(lambda: read_inputs(header, tail, PRE, MAX_IMAGES))
            client_error_or(lambda: requested_outputs(header))
    text = json.dumps(header).encode()
    parse(text + tail, str(len(text)) if tail else header_length)


@given(request=mutated_requests())
def test_parsers_take_mutated_valid_requests(request):
    parse(*request)


def _declaring(field: str, value: Any) -> tuple[bytes, str | None]:
    """The binary BYTES request with one declared number replaced."""
    header, tail = json.loads(json.dumps(VALID[1][0])), VALID[1][1]
    spec = header["inputs"][0]
    if field == "element length":
        tail = struct.pack("<I", value) + tail[4:]
    elif field == "shape":
        spec["shape"] = [value]
    else:
        spec["parameters"]["binary_data_size"] = value
    text = json.dumps(header).encode()
    return text + tail, str(value) if field == "header length" else str(len(text))


@pytest.mark.parametrize("field,value", [pytest.param("element length", 2**32 - 1, id="element length")]  # 4 bytes
                         + [pytest.param(f, v, id=f"{f} {n}") for f in ("shape", "binary_data_size", "header length")
                            for n, v in (("2**40", 2**40), ("10**400", 10**400))])
def test_declared_sizes_cost_nothing(field, value):
    """A request of a few KB declaring gigabytes (or more than memory holds) is refused within
    :data:`PEAK_BYTES`, never sized by what it declares."""
    body, length = _declaring(field, value)
    with bounded_memory():
        with pytest.raises(RequestError) as caught:
            header, tail = split_body(body, length)
            read_inputs(header, tail, PRE, MAX_IMAGES)
    assert 400 <= caught.value.status < 500


def test_the_valid_requests_parse():
    """The seeds of the mutations are valid: a mutation tests a refusal, not a typo here."""
    for header, tail in VALID:
        text = json.dumps(header).encode()
        parsed, rest = split_body(text + tail, str(len(text)) if tail else None)
        assert len(read_inputs(parsed, rest, PRE, MAX_IMAGES)) in (1, 2) and requested_outputs(parsed)


# ----------------------------------------------------------------------------- the live app
@pytest.fixture(scope="module")
def live(clf) -> Iterator[TestClient]:
    """conftest's trained model served by the app in this process (the lifespan loads it)."""
    assert tuple(clf.preprocessing.input_size) == PRE.input_size
    with TestClient(create_app(clf, ServeSettings(warmup=False)), base_url="http://localhost") as client:
        assert any(client.get("/readyz").status_code == 200 for _ in range(100))  # each call yields to the loader
        yield client


def assert_answered(answer) -> None:
    """No 5xx, and an error body with every refusal (a 503 would need concurrent requests)."""
    assert answer.status_code < 500, (answer.status_code, answer.text[:300])
    if answer.status_code >= 400:
        assert answer.json()["error"], answer.text[:300]


ASCII_LENGTHS = st.none() | NUMBERS.map(str) | st.text("0123456789 +-_x", max_size=8)
LIVE_BODIES = mostly(mutated_requests(), st.tuples(st.binary(max_size=300), ASCII_LENGTHS)
                     | st.tuples(HEADERS.map(lambda h: json.dumps(h).encode()), st.none()))


@given(request=LIVE_BODIES, path=st.sampled_from(infer_paths(MODEL)))
def test_infer_never_answers_5xx(live, request, path):
    body, length = request
    if length is not None and not (length.isascii() and length.isprintable()):  # not sendable in a header
        length = None
    assert_answered(live.post(path, content=body, headers={} if length is None else {HEADER_LENGTH: length}))


def multipart(parts: list[tuple[str, str | None, str | None, bytes]], boundary: str) -> bytes:
    """A multipart/form-data body written by hand: names, file names and types are not escaped."""
    out = []
    for name, filename, ctype, payload in parts:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'
        head += f'; filename="{filename}"\r\n' if filename is not None else "\r\n"
        head += f"Content-Type: {ctype}\r\n" if ctype is not None else ""
        out.append(head.encode() + b"\r\n" + payload + b"\r\n")
    return b"".join(out) + f"--{boundary}--\r\n".encode()


PARTS = st.tuples(mostly(st.sampled_from(["file", "files"]), st.text(max_size=10)),
                  mostly(st.text(max_size=20), st.none()),
                  mostly(st.sampled_from(["image/png", "image/jpeg", "application/octet-stream"]),
                         st.none() | st.text(max_size=20)), PAYLOADS)
BOUNDARIES = st.text("abcdefghijklmnopqrstuvwxyz0123456789-'()+_,./:=?", min_size=1, max_size=70)


@given(parts=st.lists(PARTS, max_size=5), copies=st.sampled_from([1, 1, 1, 40, 300]), boundary=BOUNDARIES,
       declared=mostly(st.none(), BOUNDARIES))
def test_predict_multipart_never_answers_5xx(live, parts, copies, boundary, declared):
    """Random parts, many of them (past the 64 images per request, and Starlette's 256 files), and a
    boundary in the Content-Type that may not be the body's."""
    body = multipart(parts * copies, boundary)
    ctype = f"multipart/form-data; boundary={declared or boundary}"
    assert_answered(live.post("/v1/predict", content=body, headers={"content-type": ctype}))

"""Hostile-input defences: a streaming body-size limit, safe image decoding, API-key checks.

Nothing here reads filesystem paths from requests: uploads are bytes, decoded in memory.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Iterable
from typing import Any

import torch
from PIL import Image

from ..core.errors import ImageDecodeError, VisiontuneError
from ..data.image import load_image
from ..data.preprocess import DecompressionBomb, open_image
from .settings import is_loopback

# HTTP status of each ImageDecodeError kind (anything else: 400)
DECODE_STATUS = {"decompression-bomb": (413, "image_too_large"), "non-image": (415, "unsupported_media_type")}


class RequestError(VisiontuneError):
    """A client error with its HTTP status; rendered as ``{"error": ..., "detail": ...}``."""

    def __init__(self, status: int, error: str, detail: str = "", headers: dict[str, str] | None = None):
        super().__init__(detail or error, kind=error)
        self.status, self.error, self.detail, self.headers = status, error, detail, headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": self.error, "detail": self.detail}


class BodyTooLarge(RequestError):
    def __init__(self, limit: int):
        super().__init__(413, "payload_too_large", f"request body above the {limit} byte limit")


def _json_response_messages(status: int, payload: dict[str, Any], extra: list[tuple[bytes, bytes]] = (),
                            close: bool = True):
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *([(b"connection", b"close")] if close else []), *extra]
    return ({"type": "http.response.start", "status": status, "headers": headers},
            {"type": "http.response.body", "body": body})


class AdmissionMiddleware:
    """ASGI middleware: 503 + Retry-After for each of ``paths`` while ``is_full()``, before any routing.

    Under overload most requests are refusals; answering them here, without FastAPI's routing,
    validation and exception handling, keeps each refusal cheap for the event loop, so refusals
    stay fast exactly when they are most numerous. The endpoint re-checks (it also counts the
    images of a request). One instance covers every path that queues images: a path left out
    (a protocol's versioned twin) would be refused only after its body was read and parsed.

    Example:
        app = AdmissionMiddleware(inner_app, lambda: state.pending >= 64, {"/v1/predict", "/v2/models/m/infer"})
    """

    def __init__(self, app: Callable, is_full: Callable[[], bool], paths: Iterable[str] = ("/v1/predict",)):
        # one path given alone is a path, not a set of one-character paths
        self.app, self.is_full = app, is_full
        self.paths = frozenset((paths,) if isinstance(paths, str) else paths)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope.get("path") in self.paths and self.is_full():
            error = RequestError(503, "overloaded", "server busy: request queue full")
            for message in _json_response_messages(503, error.body(), [(b"retry-after", b"1")], close=False):
                await send(message)
            return
        await self.app(scope, receive, send)


def host_name(header: str) -> str:
    """The host part of a ``Host`` header: ``localhost:8000`` -> ``localhost``, ``[::1]:80`` -> ``::1``
    (lower case, without a trailing dot)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return (header.rsplit(":", 1)[0] if header.count(":") == 1 else header).rstrip(".")


class LoopbackHostMiddleware:
    """ASGI middleware: 400 for a ``Host`` header that names no loopback host.

    A server without an API key only listens on loopback, yet a web page the user visits can
    point a DNS name at 127.0.0.1 (DNS rebinding) and read the answers: its requests carry the
    attacker's host name, which this refuses. Servers with an API key skip the check.

    Example:
        app = LoopbackHostMiddleware(inner_app)
    """

    def __init__(self, app: Callable):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            host = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"host"), None)
            if host is not None and not is_loopback(host_name(host)):
                error = RequestError(400, "bad_host", f"Host {host!r} is not a loopback name; this server has no API "
                                     "key and answers only localhost, 127.0.0.1 and ::1 (--api-key to serve others)")
                for message in _json_response_messages(400, error.body()):
                    await send(message)
                return
        await self.app(scope, receive, send)


def has_valid_key(expected: str | None, headers) -> bool:
    """True when no key is required or the request carries the right one."""
    try:
        check_api_key(expected, headers)
    except RequestError:
        return False
    return True


class BodyLimitMiddleware:
    """ASGI middleware: 413 for bodies above ``max_bytes``, never buffering them whole.

    A declared ``Content-Length`` above the limit is refused before any body byte is read;
    chunked or lying clients are cut off as soon as the running count of received
    ``http.request`` bytes passes the limit (the app sees :class:`BodyTooLarge`).

    Example:
        app = BodyLimitMiddleware(inner_app, max_bytes=10 * 2**20)
    """

    def __init__(self, app: Callable, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await self._send(send, RequestError(400, "bad_request", "invalid Content-Length"))
                    return
                if declared > self.max_bytes:
                    await self._send(send, BodyTooLarge(self.max_bytes))
                    return
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as exc:
            if not started:
                await self._send(send, exc)

    @staticmethod
    async def _send(send, exc: RequestError) -> None:
        for message in _json_response_messages(exc.status, exc.body()):
            await send(message)


def check_api_key(expected: str | None, headers) -> None:
    """Raise 401 unless ``X-API-Key`` or ``Authorization: Bearer`` matches ``expected``."""
    if not expected:
        return
    given = headers.get("x-api-key") or ""
    auth = headers.get("authorization") or ""
    if not given and auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise RequestError(401, "unauthorized", "missing or wrong API key (X-API-Key header)",
                           {"WWW-Authenticate": "Bearer"})


def decode_upload(data: bytes, transform: Callable, draft: int | None, max_pixels: int | None = None) -> torch.Tensor:
    """Validate and preprocess one uploaded image (run in a worker thread).

    The pixel count is checked from the header before any pixel is decoded, so a
    decompression bomb costs microseconds and no memory. Raises :class:`RequestError`:
    400 empty/truncated/corrupt, 413 too many pixels, 415 not an image (SVG, HTML, text).
    """
    if not data:
        raise RequestError(400, "empty_image", "empty input (0 bytes)")
    try:
        with open_image(data) as header:  # header only: refuses more than Image.MAX_IMAGE_PIXELS
            width, height = header.size
    except (DecompressionBomb, Image.DecompressionBombError) as exc:
        raise RequestError(413, "image_too_large", str(exc)) from None
    except Exception:
        raise RequestError(415, "unsupported_media_type", "not an image (unrecognised format)") from None
    if max_pixels is not None and width * height > max_pixels:
        raise RequestError(413, "image_too_large", f"{width}x{height} = {width * height / 1e6:.1f} MP is above this "
                           f"server's limit of {max_pixels / 1e6:.1f} MP (--max-pixels); send a smaller image")
    try:
        return transform(load_image(data, draft))
    except ImageDecodeError as exc:
        status, error = DECODE_STATUS.get(exc.kind, (400, "invalid_image"))
        raise RequestError(status, error, str(exc)) from None
    except Exception as exc:  # never a 5xx for a bad upload
        raise RequestError(400, "invalid_image", f"{type(exc).__name__}: {exc}") from None

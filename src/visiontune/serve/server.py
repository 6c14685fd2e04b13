"""The HTTP server around the app: uvicorn's h11 protocol with deadlines for slow clients.

uvicorn bounds idle keep-alive connections but not a request that arrives slowly: a client
sending its headers one line a second holds a connection (and a slot of ``limit_concurrency``)
for as long as it likes, and a few hundred such sockets make every endpoint answer 503. Here:

- **header deadline**: a connection waiting for a request's headers gets ``header_timeout_s``
  from its first byte (or from being accepted) to complete them, then a 408 and a close
  (nginx's ``client_header_timeout``); the body read runs under the app's request timeout;
- **lingering close**: when the server answers early (a 413 for a 50 MB upload, a 408, a 401)
  while the client is still sending, the connection is half-closed and up to ``LINGER_BYTES``
  or ``LINGER_S`` (``LINGER_IDLE_S`` of silence) of the rest is read and discarded before the
  close, so ordinary clients (urllib, requests) read the answer instead of a connection reset
  (nginx's ``lingering_close``);
- **connection limit** from the process's file-descriptor limit, so health checks stay
  answerable with hundreds of slow sockets open (each is closed by its deadline).

For exposure beyond a trusted network, run behind a reverse proxy (nginx, Caddy, a cloud load
balancer) that terminates TLS and buffers requests; see the README's "Security model".

Example:
    server = uvicorn.Server(server_config(create_app("runs/train-1"), ServeSettings(), "127.0.0.1", 8000))
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
from pathlib import Path
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..core.errors import ConfigError
from .settings import ServeSettings

LINGER_S = 30.0  # the most a lingering close waits for the client to stop sending (as nginx)
LINGER_IDLE_S = 5.0  # ... or this long without a byte from it
LINGER_BYTES = 64 * 2**20  # ... and the most it reads (discarded, never buffered)
MAX_HEADER_BYTES = 16 * 1024  # h11's bound on an incomplete request head
FD_RESERVE = 64  # descriptors kept for files, the model, logging


def _timeout_response(seconds: float) -> bytes:
    body = json.dumps({"error": "request_timeout",
                       "detail": f"request headers not received within {seconds:g} s"}).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class _LingeringTransport:
    """The connection's transport as uvicorn sees it: ``close()`` lingers while the client still sends."""

    def __init__(self, transport: asyncio.Transport, protocol: GuardedH11Protocol):
        self._transport, self._protocol, self._closing = transport, protocol, False

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._protocol.close_connection()

    def is_closing(self) -> bool:
        return self._closing or self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a header deadline and a lingering close (see the module doc)."""

    header_timeout_s: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._raw = transport
        self.transport = _LingeringTransport(transport, self)  # what the request cycles get
        self._deadline: asyncio.TimerHandle | None = None
        self._linger_left: int | None = None  # bytes still to discard while lingering
        self._linger_idle: asyncio.TimerHandle | None = None
        self._arm_deadline()

    def _arm_deadline(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_too_slow(self) -> None:
        self._deadline = None
        if not self._raw.is_closing():
            self._raw.write(_timeout_response(self.header_timeout_s))
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._linger_left is not None:  # discarding the rest of an answered request
            self._linger_left -= len(data)
            if self._linger_left <= 0:
                self._raw.close()
            else:
                self._linger_idle.cancel()
                self._linger_idle = self.loop.call_later(LINGER_IDLE_S, self._raw.close)
            return
        if self.conn.their_state is h11.IDLE:
            self._arm_deadline()  # a request starts arriving: its headers are on the clock
        before = self.cycle
        super().data_received(data)
        if self.cycle is not before:  # the head is complete: the app's request timeout takes over
            self._disarm_deadline()

    def close_connection(self) -> None:
        """Close now, or linger when the client is still sending a request body."""
        self._disarm_deadline()
        self._unset_keepalive_if_required()
        raw = self._raw
        if raw.is_closing():
            return
        if self.conn.their_state is h11.SEND_BODY and raw.can_write_eof():
            self._linger_left = LINGER_BYTES
            raw.write_eof()  # the answer is complete; the client sees it, then our FIN
            raw.resume_reading()
            self.loop.call_later(LINGER_S, raw.close)
            self._linger_idle = self.loop.call_later(LINGER_IDLE_S, raw.close)
            return
        raw.close()

    def on_response_complete(self) -> None:
        # answered before the request body was read (401, 404, a 503 of admission control): close,
        # lingering, rather than keep the connection and take the rest of the body as a new request's
        if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
            self.server_state.total_requests += 1
            self.transport.close()
            return
        super().on_response_complete()

    def eof_received(self) -> bool | None:
        return None  # the client is done sending: asyncio closes the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_deadline()
        super().connection_lost(exc)


def connection_limit(reserve: int = FD_RESERVE) -> int:
    """Connections uvicorn accepts before answering 503: the descriptor limit less a reserve."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 65536
    return max(32, soft - reserve)


def raise_fd_limit(target: int = 8192) -> None:
    """Lift the soft descriptor limit towards ``target`` (never above the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = target if hard == resource.RLIM_INFINITY else min(target, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass  # keep the soft limit; connection_limit() reads whichever is in force


def server_config(app: Any, settings: ServeSettings, host: str, port: int, **overrides: Any) -> uvicorn.Config:
    """The uvicorn configuration ``visiontune serve`` runs (also used by the tests and the bench)."""
    protocol = type("GuardedH11Protocol", (GuardedH11Protocol,), {"header_timeout_s": settings.timeout_s})
    # ws="none": no WebSocket routes, and an upgraded connection would stay under the header deadline
    options = dict(host=host, port=port, http=protocol, ws="none", log_level="warning", timeout_graceful_shutdown=30,
                   timeout_keep_alive=5, h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                   limit_concurrency=connection_limit())
    return uvicorn.Config(app, **{**options, **overrides})


def serve(model: str | os.PathLike, **options: Any) -> None:
    """Serve ``model`` over HTTP until SIGINT/SIGTERM: the ``visiontune serve`` command.

    uvicorn finishes in-flight requests and the batcher drains before it returns.

    Args:
        model: run dir, model/ dir, .onnx file or OpenVINO model (folder or .xml).
        **options: any option of ``visiontune serve`` by its key (:class:`ServeSettings`), e.g.
            ``port=8080``, ``max_batch=8``, ``api_key_file="key.txt"``.

    Example:
        >>> serve("runs/train-1", port=8080)  # doctest: +SKIP
    """
    settings = ServeSettings.from_dict(options).with_api_key()
    if not Path(model).exists():
        raise ConfigError(f"no model at {model}")
    from .app import create_app  # lazy: FastAPI and torch load only to serve

    app = create_app(str(model), settings)
    print(f"visiontune: serving {model} on http://{settings.host}:{settings.port}/ (docs: /docs)", file=sys.stderr)
    raise_fd_limit()  # before the connection limit is read from it
    uvicorn.Server(server_config(app, settings, settings.host, settings.port)).run()

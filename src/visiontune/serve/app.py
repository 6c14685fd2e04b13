"""The FastAPI app: ``/v1/predict``, ``/v1/model``, ``/healthz``, ``/readyz``, ``/docs``, a web page, and
the Open Inference Protocol's ``/v2`` routes (:mod:`visiontune.serve.oip`)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from fastapi import FastAPI, Query, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from ..export.runtime import load_classifier
from ..inference.rows import mark_unknown
from . import oip
from .batcher import Batcher, QueueFull, lower_thread_priority
from .security import (
    AdmissionMiddleware,
    BodyLimitMiddleware,
    LoopbackHostMiddleware,
    RequestError,
    check_api_key,
    decode_upload,
    has_valid_key,
)
from .settings import ServeSettings

STATIC = Path(__file__).parent / "static"
T = TypeVar("T")
# what a prediction row holds that the response leaves out: the path (none: an upload) and the
# error (an unreadable upload is refused with its status instead)
NOT_RESPONDED = ("path", "error")
RAW_TYPES = ("application/octet-stream",)
_PREDICT_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "file": {"type": "string", "format": "binary"},
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
    "image/*": {"schema": {"type": "string", "format": "binary"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


class ServeState:
    """What the routes share: the settings, the loaded model and its batcher, the admission counters.

    :meth:`receive` and :meth:`logits` are the one way from a request to logits for every protocol
    (``/v1/predict`` and the Open Inference Protocol's ``infer``): the same byte budget, image
    limit, queue, decoding limits and timeouts.
    """

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.clf: Any = None
        self.batcher: Batcher | None = None
        self.ready = False
        self.load_error = ""
        self.pending = 0  # images admitted (decoding, queued or in the model): admission control
        self.reserved = 0  # bytes of request bodies being received (declared, else --max-body-mb each)
        self.decoders = ThreadPoolExecutor(max_workers=settings.decode_threads,
                                           thread_name_prefix="visiontune-decode",
                                           initializer=lower_thread_priority, initargs=(settings.niceness,))

    def require_ready(self, request: Request) -> Any:
        """The loaded classifier; 401 without the API key, 503 (Retry-After) until the model is loaded."""
        check_api_key(self.settings.api_key, request.headers)
        if not self.ready:
            raise RequestError(503, "not_ready", self.load_error or "model loading", {"Retry-After": "1"})
        return self.clf

    async def receive(self, request: Request, read: Callable[[Request], Awaitable[T]]) -> T:
        """``read(request)``: the body, within the upload byte budget (else 503) and the request timeout
        (else 408)."""
        settings = self.settings
        # uploads being received hold memory: bounded in bytes (a stalled client holds only what it
        # declared), at what a full queue of the largest bodies would hold
        declared = _declared_length(request) or settings.max_body_bytes
        if self.reserved + declared > settings.max_queue * settings.max_body_bytes:
            raise RequestError(503, "overloaded", "server busy: too many uploads in progress",
                               {"Retry-After": "1", "Connection": "close"})
        self.reserved += declared
        try:  # a body trickling in holds a connection: it arrives within the request timeout or not at all
            async with asyncio.timeout(settings.timeout_s):
                return await read(request)
        except TimeoutError:
            raise RequestError(408, "request_timeout", f"request body not received within {settings.timeout_s:g} s",
                               {"Connection": "close"}) from None
        finally:
            self.reserved -= declared

    async def logits(self, inputs: Sequence[bytes | torch.Tensor]) -> list[torch.Tensor]:
        """The logits row of each input, in order: encoded images are checked and preprocessed by
        :func:`decode_upload` on the decoding threads, CHW tensors are taken as preprocessed.

        Raises :class:`RequestError`: 413 for more than ``max_queue`` inputs, 503 while the queue is
        full, 504 past the request timeout, and :func:`decode_upload`'s errors for a bad image.
        """
        settings, clf = self.settings, self.clf
        if len(inputs) > settings.max_queue:
            raise RequestError(413, "too_many_images", f"at most {settings.max_queue} images per request")
        if self.pending + len(inputs) > settings.max_queue:
            raise RequestError(503, "overloaded", "server busy: request queue full", {"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        draft = clf.preprocessing.draft_size()

        async def prepare(item: bytes | torch.Tensor) -> torch.Tensor:
            if isinstance(item, torch.Tensor):
                return item
            return await loop.run_in_executor(self.decoders, decode_upload, item, clf.transform, draft,
                                              settings.max_pixel_count)

        self.pending += len(inputs)
        try:
            async with asyncio.timeout(settings.timeout_s):
                tensors = await asyncio.gather(*(prepare(item) for item in inputs))
                return await self.batcher.submit(list(tensors))
        except TimeoutError:
            raise RequestError(504, "timeout", f"no answer within {settings.timeout_s:g} s") from None
        except QueueFull as exc:
            raise RequestError(503, "overloaded", str(exc), {"Retry-After": str(exc.retry_after)}) from None
        finally:
            self.pending -= len(inputs)


def _model_info(clf: Any) -> dict[str, Any]:
    card = clf.card
    pre = card.preprocessing.to_dict()
    return {"name": card.architecture.name if card.architecture else "", "classes": list(clf.class_names),
            "num_classes": len(clf.class_names), "input_size": pre["input_size"], "preprocessing": pre,
            "metrics": card.metrics, "calibrated": card.calibrated, "created": card.created, "task": card.task.name,
            **card.task.serve_info(clf.class_names, card.thresholds)}


def _local_docs(app: FastAPI) -> str:
    """Serve Swagger UI from the ``swagger-ui-bundle`` package when installed (else FastAPI's CDN)."""
    try:
        from swagger_ui_bundle import swagger_ui_path  # optional: a missing package means the CDN
    except ImportError:
        return "cdn"
    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title="visiontune API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png")
    return "local"


def create_app(model: str | os.PathLike | Any, settings: ServeSettings | None = None) -> FastAPI:
    """Build the app for ``model`` (a path, or an already loaded Classifier-like object).

    The model loads and warms up in the background once the server starts; ``/readyz`` and
    ``/v1/predict`` answer 503 until then.

    Example:
        import uvicorn
        uvicorn.run(create_app("runs/train-1", ServeSettings()), port=8000)
    """
    settings = settings or ServeSettings()
    state = ServeState(settings)

    async def load() -> None:
        try:
            loop = asyncio.get_running_loop()
            clf = model if hasattr(model, "logits") else await loop.run_in_executor(
                # on a decoding thread: its lower priority (--nice) passes to the runtime's own threads
                state.decoders, lambda: load_classifier(model, settings.precision, None, settings.backend))
            clf.decision_thresholds(settings.reject_below)  # --reject-below on a multi-label model: said here
            if settings.threshold_tpr is not None:
                clf.move_unknown_threshold(settings.threshold_tpr)
            batcher = Batcher(clf.outputs, settings.max_batch, settings.max_wait_ms, settings.max_queue,
                              settings.niceness)
            if settings.warmup:
                size = list(clf.preprocessing.input_size)
                await batcher.warmup(torch.zeros([min(2, settings.max_batch), *size]))
            await batcher.start()
            state.clf, state.batcher, state.ready = clf, batcher, True
        except Exception as exc:  # reported by /readyz; the process stays up for diagnosis
            state.load_error = f"{type(exc).__name__}: {exc}"

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = asyncio.create_task(load())
        yield
        await loader
        state.ready = False
        if state.batcher is not None:
            await state.batcher.stop()  # in-flight and queued images finish first
        state.decoders.shutdown(wait=True)

    app = FastAPI(title="visiontune", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.vt = state
    app.state.docs = _local_docs(app)
    if app.state.docs == "cdn":
        app.get("/docs", include_in_schema=False)(lambda: get_swagger_ui_html(openapi_url="/openapi.json",
                                                                               title="visiontune API"))
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    # before the body limit: refuse cheaply while the queue is full (added later = runs earlier), on every
    # path that queues images: /v1/predict and the protocol's infer, with and without its version
    app.add_middleware(AdmissionMiddleware, is_full=lambda: state.ready and state.pending >= settings.max_queue,
                       paths={"/v1/predict", *oip.infer_paths(settings.model_name)})
    if not settings.api_key:  # key-less servers listen on loopback only: refuse rebound host names
        app.add_middleware(LoopbackHostMiddleware)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: 503 until the model is loaded and warmed up")
    async def readyz(request: Request) -> JSONResponse:
        if state.ready:
            return JSONResponse({"status": "ready"})
        # the load error names paths and library internals: only for clients holding the key
        detail = state.load_error if has_valid_key(settings.api_key, request.headers) else ""
        return JSONResponse({"status": "failed" if state.load_error else "loading", "detail": detail},
                            status_code=503, headers={"Retry-After": "1"})

    @app.get("/v1/model", summary="Model name, classes, input size and metrics")
    async def model_info(request: Request) -> dict[str, Any]:
        return _model_info(state.require_ready(request))

    @app.post("/v1/predict", summary="Classify one or more images", openapi_extra=_PREDICT_BODY)
    async def predict(request: Request, top_k: int = Query(5, ge=1, le=1000)) -> dict[str, Any]:
        clf = state.require_ready(request)  # a full queue was refused earlier, unread (AdmissionMiddleware)
        logits = await state.logits(await state.receive(request, _read_images))
        return {"predictions": [_row(clf, row, top_k, settings.reject_below) for row in logits]}

    app.include_router(oip.router(state))
    return app


def _row(clf: Any, outputs: torch.Tensor, top_k: int, reject_below: float | None) -> dict[str, Any]:
    """The prediction row ``Classifier.predict`` gives for the same outputs (without path/error): a
    single-label model's label (``unknown`` below ``reject_below``), or a multi-label model's label
    set at its per-label thresholds and every label's score; with an unknown-score, ``unknown``
    and ``unknown_score`` (see :mod:`visiontune.inference.rows`)."""
    task = clf.task
    logits, score = clf.split(outputs) if hasattr(clf, "split") else (outputs, None)
    row = task.row(task.probabilities(logits, clf.temperature), clf.class_names, top_k, clf.calibrated,
                   thresholds=clf.thresholds, reject_below=reject_below)
    if score is not None and getattr(clf, "unknown_threshold", None) is not None:
        row = mark_unknown(row, float(score), clf.unknown_threshold, task=task)
    return {k: v for k, v in row.items() if k not in NOT_RESPONDED}


def _declared_length(request: Request) -> int | None:
    try:  # BodyLimitMiddleware has refused anything above the limit or unparsable
        return int(request.headers["content-length"])
    except (KeyError, ValueError):
        return None


async def _read_images(request: Request) -> list[bytes]:
    """Upload bytes from multipart ``file``/``files`` fields or a raw image body (never a path)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=256, max_fields=64)
        except RequestError:
            raise
        except Exception as exc:
            raise RequestError(400, "bad_multipart", f"could not parse the form: {exc}") from None
        try:
            uploads = [v for k, v in form.multi_items() if k in ("file", "files") and not isinstance(v, str)]
            if not uploads:
                raise RequestError(400, "no_file", "multipart body needs a 'file' or 'files' field with an image")
            return [await upload.read() for upload in uploads]
        finally:
            await form.close()
    if ctype.startswith("image/") or ctype in RAW_TYPES:
        chunks = [chunk async for chunk in request.stream()]
        return [b"".join(chunks)]
    raise RequestError(415, "unsupported_media_type",
                       "send multipart/form-data with 'file'/'files', or raw bytes as image/* or "
                       "application/octet-stream")

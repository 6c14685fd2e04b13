"""HTTP API tests against the real app on a real uvicorn server (127.0.0.1, free port)."""

from __future__ import annotations

import importlib.util
import io
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from conftest import CLASSES, vt_main  # noqa: E402

import visiontune  # noqa: E402
from visiontune.core.errors import ConfigError  # noqa: E402
from visiontune.serve import ServeSettings, create_app  # noqa: E402
from visiontune.serve.server import server_config  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, what: str, timeout: float = 60) -> None:
    """Poll ``condition()`` until it holds; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def served(model, settings: ServeSettings | None = None, wait_ready: bool = True):
    """Serve ``create_app(model, settings)`` in a thread; yield (base URL, app, uvicorn.Server);
    shut down gracefully (the caller may set ``should_exit`` itself, as SIGTERM would)."""
    app = create_app(model, settings or ServeSettings(warmup=False))
    port = free_port()
    server = uvicorn.Server(server_config(app, settings or ServeSettings(), "127.0.0.1", port, log_level="error",
                                          lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(f"{url}/readyz" if wait_ready else f"{url}/healthz"), "the server to be ready")
        yield url, app, server
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "the server did not shut down"


@contextmanager
def running_server(model, settings: ServeSettings | None = None, wait_ready: bool = True):
    """Serve ``create_app(model, settings)`` in a thread; yield its base URL; shut down gracefully."""
    with served(model, settings, wait_ready) as (url, _, _):
        yield url


def png_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def sample_files(data: Path, n: int = 3) -> list[Path]:
    return sorted(data.rglob("*.png"))[:: 10][:n]


def test_parity_multipart_and_raw(server, clf, trained_run):
    files = sample_files(trained_run[1], 3)
    expected = clf.predict([str(f) for f in files], top_k=3)
    multipart = [("files", (f.name, f.read_bytes(), "image/png")) for f in files]
    r = httpx.post(f"{server}/v1/predict?top_k=3", files=multipart, timeout=30)
    assert r.status_code == 200, r.text
    got = r.json()["predictions"]
    assert len(got) == 3
    for want, have in zip(expected, got):
        assert have["label"] == want["label"] and have["calibrated"] == want["calibrated"]
        assert [t["label"] for t in have["top_k"]] == [t["label"] for t in want["top_k"]]
        np.testing.assert_allclose([t["probability"] for t in have["top_k"]],
                                   [t["probability"] for t in want["top_k"]], atol=1e-5)
    raw = httpx.post(f"{server}/v1/predict?top_k=1", content=files[0].read_bytes(),
                     headers={"content-type": "image/png"}, timeout=30)
    assert raw.status_code == 200
    one = raw.json()["predictions"][0]
    assert len(one["top_k"]) == 1 and one["label"] == expected[0]["label"]
    assert abs(one["probability"] - expected[0]["probability"]) < 1e-5
    single = httpx.post(f"{server}/v1/predict", files={"file": ("x.png", files[1].read_bytes())}, timeout=30)
    assert single.status_code == 200 and len(single.json()["predictions"][0]["top_k"]) == 3  # 3 classes


def test_info_endpoints(server, clf):
    assert httpx.get(f"{server}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{server}/readyz").status_code == 200
    info = httpx.get(f"{server}/v1/model").json()
    assert info["classes"] == clf.class_names and info["input_size"] == list(clf.preprocessing.input_size)
    assert "metrics" in info and "model_dir" not in info
    assert httpx.get(f"{server}/openapi.json").json()["paths"]["/v1/predict"]
    docs = httpx.get(f"{server}/docs").text
    assert "swagger" in docs.lower()
    if importlib.util.find_spec("swagger_ui_bundle"):  # Swagger UI served locally, no CDN
        assert "/docs-assets/swagger-ui-bundle.js" in docs and "cdn." not in docs
        assert httpx.get(f"{server}/docs-assets/swagger-ui-bundle.js").status_code == 200
    page = httpx.get(f"{server}/")
    assert page.status_code == 200 and "/static/app.js" in page.text and "http" not in page.text.split("<body>")[1]
    assert httpx.get(f"{server}/static/app.js").status_code == 200


def _corpus(tmp: Path) -> dict[str, tuple[bytes, str, set[int]]]:
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    jpeg = png_bytes(rgb, "JPEG")
    bomb = tmp / "bomb.png"
    if not bomb.exists():
        Image.new("L", (20000, 20000)).save(bomb, optimize=False, compress_level=9)
    frames = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    exif = Image.Exif()
    exif[0x0112] = 6
    bad = {
        "text": (b"hello, I am not an image", "image/png", {415}),
        "zero": (b"", "image/png", {400}),
        "truncated": (jpeg[: len(jpeg) // 2], "image/jpeg", {400}),
        "svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>', "image/svg+xml", {415}),
        "html": (b"<html><body><img src=x onerror=alert(1)></body></html>", "image/png", {415}),
        "bomb": (bomb.read_bytes(), "image/png", {413}),
        "form-no-file": (b"", "multipart", {400}),
        "wrong-type": (b"{}", "application/json", {415}),
    }
    good = {
        "gif": (gif.getvalue(), "image/gif"),
        "png16": (png_bytes(Image.fromarray((np.arange(40 * 40).reshape(40, 40) * 40).astype(np.uint16))), "image/png"),
        "cmyk": (png_bytes(rgb.convert("CMYK"), "JPEG"), "image/jpeg"),
        "rgba": (png_bytes(rgb.convert("RGBA")), "image/png"),
        "exif": (png_bytes(rgb, "JPEG", exif=exif), "image/jpeg"),
    }
    return bad, good


def test_hostile_corpus(server, tmp_path_factory, monkeypatch):
    from PIL import ImageFile

    bad, good = _corpus(tmp_path_factory.mktemp("corpus"))
    decoded = []  # the sizes of the images whose pixels were decoded (ImageFile.load)
    load = ImageFile.ImageFile.load

    def recording_load(img):
        decoded.append(img.size)
        return load(img)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recording_load)
    for name, (body, ctype, codes) in bad.items():
        decoded.clear()
        if ctype == "multipart":
            r = httpx.post(f"{server}/v1/predict", files={"other": ("a.txt", b"x")}, timeout=30)
        else:
            r = httpx.post(f"{server}/v1/predict", content=body, headers={"content-type": ctype}, timeout=30)
        assert r.status_code in codes, (name, r.status_code, r.text)
        assert r.json()["error"], name
        if name == "bomb":  # refused from the header: its 400 megapixels were never decoded
            assert r.json()["error"] == "image_too_large" and (20000, 20000) not in decoded, decoded
        # the same bytes as a multipart upload are refused the same way
        if ctype != "multipart":
            m = httpx.post(f"{server}/v1/predict", files={"file": (name, body)}, timeout=30)
            assert m.status_code in codes | {415} and m.status_code < 500, (name, m.status_code)
    for name, (body, ctype) in good.items():
        r = httpx.post(f"{server}/v1/predict", content=body, headers={"content-type": ctype}, timeout=30)
        assert r.status_code == 200, (name, r.text)
    assert httpx.get(f"{server}/healthz").status_code == 200


def test_bomb_between_one_and_two_times_the_limit(server, monkeypatch):
    """Pillow only warns between MAX_IMAGE_PIXELS and twice that; the server still refuses."""
    body = png_bytes(Image.new("RGB", (40, 40)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1600 px: 1.6x the limit
    r = httpx.post(f"{server}/v1/predict", content=body, headers={"content-type": "image/png"}, timeout=30)
    assert r.status_code == 413 and r.json()["error"] == "image_too_large"


def test_body_limit_streaming(clf):
    with running_server(clf, ServeSettings(warmup=False, max_body_mb=0.05)) as url:
        big = b"\0" * 200_000
        r = httpx.post(f"{url}/v1/predict", content=big, headers={"content-type": "image/png"}, timeout=30)
        assert r.status_code == 413 and r.json()["error"] == "payload_too_large"

        def chunks():  # no Content-Length: the limit is enforced while streaming
            for _ in range(50):
                yield b"\0" * 8192

        r = httpx.post(f"{url}/v1/predict", content=chunks(), headers={"content-type": "image/png"}, timeout=30)
        assert r.status_code == 413
        r = httpx.post(f"{url}/v1/predict", files={"file": ("a.png", big)}, timeout=30)
        assert r.status_code == 413


class GatedModel:
    """Delegates to the real classifier, but every forward pass sets ``entered`` and then waits
    for ``release``: a test decides when the model answers."""

    def __init__(self, clf):
        self.clf, self.entered, self.release = clf, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.clf, name)

    def outputs(self, batch):  # what the server runs: the logits (and the unknown-score)
        self.entered.set()
        if not self.release.wait(120):
            raise RuntimeError("the test never released the model")
        return self.clf.outputs(batch)


def _post_image(url: str, body: bytes) -> httpx.Response:
    return httpx.post(f"{url}/v1/predict", content=body, headers={"content-type": "image/png"}, timeout=60)


def test_queue_full_503_and_timeout_504(clf, trained_run):
    """A request held in the model, one in the queue (max_queue 1): the rest of a burst is refused
    at once with 503 and Retry-After; released, the held and the queued one answer 200."""
    import concurrent.futures
    import itertools

    body = sample_files(trained_run[1], 1)[0].read_bytes()
    gated = GatedModel(clf)
    settings = ServeSettings(warmup=False, max_queue=1, max_batch=1, max_wait_ms=0, timeout_s=60)
    with served(gated, settings) as (url, app, _), concurrent.futures.ThreadPoolExecutor(6) as pool:
        try:
            held = pool.submit(_post_image, url, body)
            assert gated.entered.wait(60), "the first request never reached the model"
            burst = [pool.submit(_post_image, url, body) for _ in range(5)]
            # at most one fits in the queue: four are refused while the model is still held
            refused = [f.result() for f in itertools.islice(concurrent.futures.as_completed(burst), 4)]
            assert [r.status_code for r in refused] == [503] * 4, [r.text for r in refused]
            assert refused[0].headers["retry-after"] and refused[0].json()["error"] == "overloaded"
        finally:
            gated.release.set()
        codes = sorted(f.result().status_code for f in burst)
        assert held.result().status_code == 200 and codes in ([503] * 5, [200] + [503] * 4), codes
        many = [("files", (f"{i}.png", body)) for i in range(2)]
        assert httpx.post(f"{url}/v1/predict", files=many, timeout=30).status_code == 413  # > max_queue
    gated = GatedModel(clf)
    with served(gated, ServeSettings(warmup=False, timeout_s=0.3)) as (url, _, _):
        try:  # the model is held until the answer arrives: the deadline, not the model, answered
            r = _post_image(url, body)
            assert gated.entered.is_set() and r.status_code == 504 and r.json()["error"] == "timeout"
        finally:
            gated.release.set()


def test_shutdown_finishes_in_flight(clf, trained_run):
    """Like SIGTERM under uvicorn: should_exit while requests are in flight -> they still get 200."""
    import concurrent.futures

    body = sample_files(trained_run[1], 1)[0].read_bytes()
    gated = GatedModel(clf)
    settings = ServeSettings(warmup=False, max_batch=1, max_wait_ms=0)
    with served(gated, settings) as (url, app, server), concurrent.futures.ThreadPoolExecutor(3) as pool:
        try:
            futures = [pool.submit(_post_image, url, body) for _ in range(3)]
            assert gated.entered.wait(60), "no request reached the model"
            batcher = app.state.vt.batcher
            wait_until(lambda: batcher.queue.qsize() == 2, "the other two requests to be queued")
            server.should_exit = True  # while one request is in the model and two are queued
        finally:
            gated.release.set()
        assert [f.result().status_code for f in futures] == [200, 200, 200]
    assert batcher.queue.qsize() == 0


def test_api_key(clf, trained_run):
    body = sample_files(trained_run[1], 1)[0].read_bytes()
    with running_server(clf, ServeSettings(warmup=False, api_key="s3cret")) as url:
        headers = {"content-type": "image/png"}
        assert httpx.post(f"{url}/v1/predict", content=body, headers=headers).status_code == 401
        assert httpx.get(f"{url}/v1/model", headers={"x-api-key": "nope"}).status_code == 401
        ok = httpx.post(f"{url}/v1/predict", content=body, headers={**headers, "x-api-key": "s3cret"})
        assert ok.status_code == 200
        assert httpx.get(f"{url}/v1/model", headers={"authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(f"{url}/healthz").status_code == 200


def test_readyz_503_until_loaded_and_cli_refuses_public_bind(trained_run, monkeypatch, capsys):
    with running_server(str(trained_run[0].run_dir), ServeSettings(), wait_ready=False) as url:
        first = httpx.get(f"{url}/readyz")
        assert first.status_code in (200, 503)
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(f"{url}/v1/model").status_code == 200
    monkeypatch.delenv("VISIONTUNE_API_KEY", raising=False)
    code, _, err = vt_main(capsys, "serve", trained_run[0].run_dir, "--host", "0.0.0.0")
    assert code == 2 and "--api-key" in err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are a Linux feature")
def test_inference_threads_run_below_the_event_loop_priority():
    """Saturated CPU: the event loop (503s, health checks) must be scheduled before model work."""
    import os
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from visiontune.serve.batcher import Batcher

    def nice_of_this_thread(_=None):
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    base = nice_of_this_thread()
    batcher = Batcher(nice_of_this_thread, niceness=5)
    assert batcher._executor.submit(nice_of_this_thread).result() == min(19, base + 5)
    batcher._executor.shutdown()
    with ThreadPoolExecutor(1) as plain:
        assert plain.submit(nice_of_this_thread).result() == base  # default threads untouched
    assert nice_of_this_thread() == base


def test_admission_middleware_refuses_before_routing():
    import asyncio

    from visiontune.serve.security import AdmissionMiddleware

    called, sent = [], []

    async def inner(scope, receive, send):
        called.append(scope["path"])

    async def send(message):
        sent.append(message)

    full = AdmissionMiddleware(inner, is_full=lambda: True)
    asyncio.run(full({"type": "http", "path": "/v1/predict"}, None, send))
    assert not called and sent[0]["status"] == 503
    assert (b"retry-after", b"1") in sent[0]["headers"] and b"overloaded" in sent[1]["body"]
    asyncio.run(full({"type": "http", "path": "/healthz"}, None, send))  # other paths are never refused
    assert called == ["/healthz"]
    # one instance covers every path that queues images, the protocol's versioned infer included
    from visiontune.serve.oip import infer_paths

    called.clear()
    sent.clear()
    paths = {"/v1/predict", *infer_paths("m")}
    assert "/v2/models/m/versions/1/infer" in paths
    every = AdmissionMiddleware(inner, is_full=lambda: True, paths=paths)
    for path in sorted(paths):
        asyncio.run(every({"type": "http", "path": path}, None, send))
    assert not called and [m["status"] for m in sent if "status" in m] == [503] * 3
    asyncio.run(every({"type": "http", "path": "/v2/models/m/ready"}, None, send))
    one = AdmissionMiddleware(inner, is_full=lambda: True, paths="/v1/predict")  # a path, not its characters
    asyncio.run(one({"type": "http", "path": "/"}, None, send))
    assert called == ["/v2/models/m/ready", "/"]


# ----------------------------------------------------------------------------- hostile clients (issue 16)
def _open(url: str, head: bytes) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.sendall(head)
    return sock


def _closed_by_server(sock: socket.socket, within: float) -> bytes | None:
    """What the server sent before closing ``sock`` (None: still open after ``within`` s)."""
    sock.settimeout(0.2)
    got, deadline = b"", time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return got
        if not chunk:
            return got
        got += chunk
    return None


def _still_open(sock: socket.socket) -> bool:
    """Whether the server has neither answered nor closed ``sock`` yet (without waiting)."""
    sock.setblocking(False)
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    except ConnectionResetError:
        return False
    finally:
        sock.setblocking(True)
    return False


def test_slow_clients_cannot_starve_health_endpoints(clf, trained_run):
    """260 stalled connections (half in their headers, half in their bodies) with --timeout-s 3:
    health, readiness, /v1/model and /v1/predict answer while the stalls are held, and every
    stalled connection is then closed by its deadline."""
    body = sample_files(trained_run[1], 1)[0].read_bytes()
    key = {"x-api-key": "k"}
    with served(clf, ServeSettings(warmup=False, timeout_s=3, api_key="k")) as (url, _, server):
        slow_heads = [_open(url, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n") for _ in range(130)]
        slow_bodies = [_open(url, b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: k\r\n"
                                  b"Content-Type: image/png\r\nContent-Length: 100000\r\n\r\n" + body[:10])
                       for _ in range(130)]
        wait_until(lambda: len(server.server_state.connections) >= 260, "every stalled request in the server's hands")
        for method, path, kwargs in (("GET", "/healthz", {}), ("GET", "/readyz", {}), ("GET", "/v1/model", key),
                                     ("POST", "/v1/predict", {**key, "content-type": "image/png"})):
            answer = httpx.request(method, url + path, headers=kwargs, timeout=10,
                                   content=body if method == "POST" else None)
            assert answer.status_code == 200, path
        # answered while the stalls were still held (before their request timeout closed them)
        assert all(_still_open(s) for s in slow_heads[::13] + slow_bodies[::13])
        heads = [_closed_by_server(s, 10) for s in slow_heads]
        bodies = [_closed_by_server(s, 10) for s in slow_bodies]
        assert all(h is not None and h.startswith(b"HTTP/1.1 408") for h in heads)
        assert all(b is not None and b.startswith(b"HTTP/1.1 408") and b"request_timeout" in b for b in bodies)
        for s in slow_heads + slow_bodies:
            s.close()


def test_an_oversized_upload_reads_the_413_not_a_reset(clf):
    """urllib sends all 50 MB before reading; the server answers at once, then drains (lingering close)."""
    import urllib.error
    import urllib.request

    with running_server(clf, ServeSettings(warmup=False, max_body_mb=10)) as url:
        request = urllib.request.Request(f"{url}/v1/predict", data=b"\0" * (50 * 2**20),
                                         headers={"Content-Type": "image/png"}, method="POST")
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=30)
        assert caught.value.code == 413 and b"payload_too_large" in caught.value.read()
        assert httpx.get(f"{url}/healthz").status_code == 200


def test_keyless_server_answers_only_loopback_host_names(clf):
    with running_server(clf) as url:
        port = url.rsplit(":", 1)[1]
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost", f"[::1]:{port}"):
            assert httpx.get(f"{url}/v1/model", headers={"host": host}).status_code == 200, host
        for host in (f"evil.example:{port}", "attacker.test", f"10.0.0.5:{port}"):  # DNS rebinding
            refused = httpx.get(f"{url}/v1/model", headers={"host": host})
            assert refused.status_code == 400 and refused.json()["error"] == "bad_host", host
    with running_server(clf, ServeSettings(warmup=False, api_key="k")) as url:  # a key decides instead
        assert httpx.get(f"{url}/v1/model", headers={"host": "api.example", "x-api-key": "k"}).status_code == 200


def test_readyz_keeps_the_load_error_from_clients_without_the_key(tmp_path):
    broken = tmp_path / "model"
    broken.mkdir()
    (broken / "model.json").write_text("{not json")
    with running_server(str(broken), ServeSettings(warmup=False, api_key="k"), wait_ready=False) as url:
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/readyz").json()["status"] == "loading" and time.monotonic() < deadline:
            time.sleep(0.05)
        anonymous = httpx.get(f"{url}/readyz")
        assert anonymous.status_code == 503 and anonymous.json() == {"status": "failed", "detail": ""}
        assert "model.json" in httpx.get(f"{url}/readyz", headers={"x-api-key": "k"}).json()["detail"]


def test_api_key_file_and_the_ps_warning(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("VISIONTUNE_API_KEY", raising=False)
    key_file = tmp_path / "key with space"
    key_file.write_text("s3cret\n")
    assert ServeSettings(api_key_file=str(key_file)).with_api_key().api_key == "s3cret"
    assert ServeSettings(api_key="inline").with_api_key().api_key == "inline"
    assert "visible to every user" in capsys.readouterr().err
    monkeypatch.setenv("VISIONTUNE_API_KEY", "from-env")
    assert ServeSettings(host="0.0.0.0").with_api_key().api_key == "from-env"  # a key: any host may be bound
    with pytest.raises(ConfigError, match="not both"):
        ServeSettings(api_key="a", api_key_file=str(key_file)).with_api_key()
    code, _, err = vt_main(capsys, "serve", tmp_path, "--api-key-file", tmp_path / "missing")
    assert code == 2 and "--api-key-file" in err and "Traceback" not in err


def test_serve_answers_with_label_sets(ml_run, ml_data):
    clf = visiontune.load(ml_run.run_dir)
    image = sorted((ml_data.parent / "img").glob("*.png"))[1]
    want = clf.predict([str(image)])[0]
    with running_server(clf) as url:
        got = httpx.post(f"{url}/v1/predict", files={"file": ("x.png", image.read_bytes())}, timeout=30).json()
        info = httpx.get(f"{url}/v1/model", timeout=30).json()
    row = got["predictions"][0]
    assert row["labels"] == want["labels"] and set(row["scores"]) == set(CLASSES)
    assert row["scores"] == pytest.approx(want["scores"], abs=1e-5)
    assert info["task"] == "multi" and set(info["thresholds"]) == set(CLASSES)


def test_serve_refuses_uploads_above_max_pixels_from_the_header():
    import io

    from PIL import Image

    from visiontune.serve.security import RequestError, decode_upload

    def png(side: int) -> bytes:
        buf = io.BytesIO()
        Image.new("L", (side, side)).save(buf, "PNG")  # a few KB however many pixels
        return buf.getvalue()

    big = png(3000)
    assert len(big) < 100_000
    with pytest.raises(RequestError) as info:
        decode_upload(big, lambda img: img.size, None, max_pixels=4_000_000)
    assert info.value.status == 413 and "--max-pixels" in str(info.value)
    assert decode_upload(png(1000), lambda img: img.size, None, max_pixels=4_000_000) == (1000, 1000)

"""Bounded load test of ``visiontune serve`` on loopback; results to bench/SERVE_RESULTS.md.

Starts the server as a subprocess, then drives it with an async httpx client:
  levels     1, 8 and 32 concurrent clients for --duration s each: throughput, p50/p99, errors, 5xx
  overload   64 clients against a server with a small queue: 503 share and latency, then recovery
  soak       (--soak S) 4 clients for S seconds: RSS drift of the server process and errors

Example:
    python bench/serve_load.py --model /tmp/hym-serve --images data/hymenoptera/train --soak 600
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    """``visiontune serve MODEL`` on a free loopback port, stopped with SIGTERM."""

    def __init__(self, model: str, *flags: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "visiontune.cli", "serve", model, "--port", str(self.port), *flags]
        self.proc = subprocess.Popen(cmd, cwd=ROOT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError("server exited")
            time.sleep(0.2)
        raise RuntimeError("server not ready")

    def stop(self) -> int:
        self.proc.terminate()  # SIGTERM: graceful shutdown
        return self.proc.wait(60)


async def drive(url: str, images: list[bytes], clients: int, seconds: float) -> dict:
    """``clients`` closed-loop clients posting raw images for ``seconds``."""
    lat: list[float] = []
    codes: dict[int, int] = {}
    busy_lat: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        async def one(worker: int) -> None:
            nonlocal errors
            i = worker
            while time.perf_counter() < stop_at:
                body = images[i % len(images)]
                i += clients
                t0 = time.perf_counter()
                try:
                    r = await client.post(f"{url}/v1/predict", content=body, headers={"content-type": "image/jpeg"})
                except httpx.HTTPError:
                    errors += 1
                    continue
                dt = time.perf_counter() - t0
                codes[r.status_code] = codes.get(r.status_code, 0) + 1
                if r.status_code == 200:
                    lat.append(dt)
                elif r.status_code == 503:
                    busy_lat.append(dt)
                    await asyncio.sleep(float(r.headers.get("retry-after", "1")) / 10)
                else:
                    errors += 1

        start = time.perf_counter()
        await asyncio.gather(*(one(w) for w in range(clients)))
        wall = time.perf_counter() - start
    ms = lambda xs, q: float(np.percentile(xs, q) * 1000) if xs else float("nan")  # noqa: E731
    return {"clients": clients, "ok": len(lat), "rps": len(lat) / wall, "p50": ms(lat, 50), "p99": ms(lat, 99),
            "codes": dict(sorted(codes.items())), "errors": errors, "5xx": sum(n for c, n in codes.items() if c >= 500
                                                                             and c != 503),
            "busy_p50": ms(busy_lat, 50), "busy_p99": ms(busy_lat, 99)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="/tmp/hym-serve")
    p.add_argument("--images", default=str(ROOT / "data/hymenoptera/train"))
    p.add_argument("--duration", type=float, default=30.0, help="seconds per load level (30)")
    p.add_argument("--levels", default="1,8,32", help="client counts; empty to skip")
    p.add_argument("--no-overload", action="store_true", help="skip the overload section")
    p.add_argument("--soak", type=float, default=0.0, help="soak seconds at 4 clients (0: skip)")
    p.add_argument("--out", default=str(ROOT / "bench/SERVE_RESULTS.md"))
    args = p.parse_args()
    paths = sorted(q for q in Path(args.images).rglob("*") if q.suffix.lower() in (".jpg", ".jpeg", ".png"))[:64]
    images = [q.read_bytes() for q in paths]
    lines = ["# Serving benchmark (`python bench/serve_load.py`)\n",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared), Python {platform.python_version()}; "
             f"model {args.model}; {len(images)} distinct JPEGs from {args.images}, raw-bytes POSTs on loopback.\n"]

    if args.levels:
        server = Server(args.model)  # defaults: --max-batch 16 --max-wait-ms 10 --max-queue 64
        try:
            lines += ["## Load levels (default settings)\n",
                      "| clients | req/s | p50 ms | p99 ms | statuses | errors | 5xx |",
                      "| --- | --- | --- | --- | --- | --- | --- |"]
            base = None
            for n in (int(x) for x in args.levels.split(",")):
                res = asyncio.run(drive(server.url, images, n, args.duration))
                base = base or res["rps"]
                print(res, flush=True)
                lines.append(f"| {n} | {res['rps']:.1f} ({res['rps'] / base:.2f}x) | {res['p50']:.0f} | "
                             f"{res['p99']:.0f} | "
                             f"{res['codes']} | {res['errors']} | {res['5xx']} |")
        finally:
            lines.append(f"\nSIGTERM exit code: {server.stop()} "
                         "(uvicorn re-raises SIGTERM after a graceful shutdown)\n")

    if not args.no_overload:
        lines += ["## Overload: 64 clients, --max-queue 8 (clients back off Retry-After/10 on 503)\n",
                  "Side by side in this run: inference/decoding threads at the event loop's priority (`--nice 0`) "
                  "and below it (default `--nice 10`).\n",
                  "| --nice | statuses | 503 p50 ms | 503 p99 ms | 200 p50 ms | 200 p99 ms | served req/s | 5xx other "
                  "than 503 | recovery (1 client, 5 s) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for nice in ("0", "10"):
            server = Server(args.model, "--max-queue", "8", "--timeout-s", "5", "--nice", nice)
            try:
                over = asyncio.run(drive(server.url, images, 64, min(args.duration, 15)))
                after = asyncio.run(drive(server.url, images, 1, 5))
                print(nice, over, after, flush=True)
                lines.append(f"| {nice} | {over['codes']} | {over['busy_p50']:.1f} | {over['busy_p99']:.1f} | "
                             f"{over['p50']:.0f} | {over['p99']:.0f} | {over['rps']:.1f} | {over['5xx']} | "
                             f"{after['codes']}, p50 {after['p50']:.0f} ms |")
            finally:
                server.stop()
        lines.append("")

    if args.soak:
        server = Server(args.model)
        try:
            asyncio.run(drive(server.url, images, 4, 20))  # warm-up: allocator and caches settle
            samples, results, t_end = [rss_mb(server.proc.pid)], [], time.monotonic() + args.soak
            while time.monotonic() < t_end:
                results.append(asyncio.run(drive(server.url, images, 4, min(60, t_end - time.monotonic()))))
                samples.append(rss_mb(server.proc.pid))
            ok = sum(r["ok"] for r in results)
            errs = sum(r["errors"] for r in results)
            drift = (samples[-1] - samples[0]) / samples[0] * 100
            print(samples, ok, errs, flush=True)
            lines += [f"## Soak: 4 clients for {args.soak:.0f} s (after a 20 s warm-up)\n",
                      f"- {ok} requests, errors {errs}, RSS {samples[0]:.0f} MB -> {samples[-1]:.0f} MB "
                      f"(max {max(samples):.0f} MB), drift {drift:+.1f}%",
                      f"- RSS samples (MB, one per minute): {', '.join(f'{s:.0f}' for s in samples)}\n"]
        finally:
            server.stop()
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Dynamic batching: concurrent requests share one forward pass, off the event loop.

Requests enter a bounded :class:`asyncio.Queue`; one worker task takes what is waiting (up to
``max_batch``), waits at most ``max_wait_ms`` for more, then runs the model in a dedicated
inference thread on the stacked batch. A full queue refuses at once (HTTP 503) instead of
letting latency grow without bound.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch


def lower_thread_priority(niceness: int) -> None:
    """Run the calling thread, and threads it starts later, ``niceness`` steps below normal priority.

    Used as the initializer of the inference and decoding threads: when the CPU is saturated the
    event loop (admission control, 503s, health checks) is scheduled first. Linux applies nice
    values per thread, and OpenMP workers inherit it from the thread that first runs a parallel
    region; elsewhere this does nothing.

    Example:
        ThreadPoolExecutor(1, initializer=lower_thread_priority, initargs=(10,))
    """
    if niceness <= 0 or not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + niceness))
    except OSError:
        pass  # not permitted in some sandboxes: run at normal priority


class QueueFull(Exception):
    """The bounded queue cannot take the request now; retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: int = 1):
        super().__init__("server busy: request queue full")
        self.retry_after = retry_after


@dataclass
class _Item:
    tensor: torch.Tensor
    future: asyncio.Future = field(repr=False)


class Batcher:
    """Group single-image tensors into batches for ``infer`` (NCHW float -> logits).

    Example:
        batcher = Batcher(clf.logits, max_batch=16, max_wait_ms=10, max_queue=64)
        await batcher.start()
        logits = await batcher.submit([tensor])
    """

    def __init__(self, infer: Callable[[torch.Tensor], torch.Tensor], max_batch: int = 16,
                 max_wait_ms: float = 10.0, max_queue: int = 64, niceness: int = 0):
        self.infer = infer
        self.max_batch = max(1, max_batch)
        self.max_wait = max(0.0, max_wait_ms) / 1000.0
        self.queue: asyncio.Queue[_Item | None] = asyncio.Queue(maxsize=max(1, max_queue))
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="visiontune-infer",
                                            initializer=lower_thread_priority, initargs=(niceness,))
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="visiontune-batcher")

    async def warmup(self, batch: torch.Tensor) -> None:
        """One forward pass on the inference thread itself (its kernels and thread pool get set up)."""
        await asyncio.get_running_loop().run_in_executor(self._executor, self.infer, batch)

    async def stop(self) -> None:
        """Finish everything already queued, then stop the worker (graceful shutdown)."""
        if self._task is not None:
            await self.queue.put(None)
            await self._task
            self._task = None
        self._executor.shutdown(wait=True)

    async def submit(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Queue preprocessed CHW tensors; return their logits rows, in order.

        Raises :class:`QueueFull` when they do not all fit. Cancelling the awaiting task
        (a timeout) drops the items that have not reached the model yet.
        """
        if self._task is None:
            raise RuntimeError("batcher not started")
        if self.queue.maxsize - self.queue.qsize() < len(tensors):
            raise QueueFull()
        loop = asyncio.get_running_loop()
        items = [_Item(t, loop.create_future()) for t in tensors]
        for item in items:
            self.queue.put_nowait(item)
        try:
            return list(await asyncio.gather(*(item.future for item in items)))
        finally:
            for item in items:
                if not item.future.done():
                    item.future.cancel()

    async def _collect(self, first: _Item) -> list[_Item]:
        batch = [first]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch:
            try:
                item = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), remaining)
                except TimeoutError:
                    break
            if item is None:  # stop sentinel: put it back for the main loop, after this batch
                self.queue.put_nowait(None)
                break
            batch.append(item)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self.queue.get()
            if first is None:
                return
            batch = [item for item in await self._collect(first) if not item.future.done()]
            if not batch:
                continue
            try:
                stacked = torch.stack([item.tensor for item in batch])
                logits = await loop.run_in_executor(self._executor, self.infer, stacked)
            except Exception as exc:  # a model failure fails this batch, not the server
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            for row, item in enumerate(batch):
                if not item.future.done():
                    item.future.set_result(logits[row])

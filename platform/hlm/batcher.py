"""Natural request batching on an asyncio event loop: whatever queued while the last batch ran is the next batch.

A lone request starts at once (no wait when the queue is empty); under load, requests pile up while one batch
computes, so the next one is full. One batch runs at a time, which is what one forward pass on one replica's
cores wants.

Why not ``@serve.batch``: Ray 2.60 forms a batch *before* it takes the ``max_concurrent_batches`` permit
(``ray/serve/batching.py``, ``_process_batches``), so with no wait it queues many batches of one behind the running
batch, and with a wait every lone request pays it. Here the batch is formed only when the previous one is done.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class MicroBatcher(Generic[T, R]):
    """``await submit(item)`` returns ``fn(batch)[i]`` for the batch the item ran in.

    ``fn`` is awaited once per batch (run blocking work through ``asyncio.to_thread`` inside it, so the event loop
    keeps accepting requests meanwhile). An exception from ``fn`` goes to every caller of that batch.
    ``max_wait_s`` > 0 holds a batch that is not full for up to that long, for more items (0: never wait).
    """

    def __init__(self, fn: Callable[[list[T]], Awaitable[list[R]]], *, max_batch_size: int, max_wait_s: float = 0.0):
        if max_batch_size < 1 or max_wait_s < 0:
            raise ValueError(f"max_batch_size must be >= 1 and max_wait_s >= 0, got {max_batch_size}, {max_wait_s}")
        self.fn, self.max_batch_size, self.max_wait_s = fn, max_batch_size, max_wait_s
        self.sizes: Counter[int] = Counter()  # batch size -> how many batches had it
        self._queue: asyncio.Queue[tuple[T, asyncio.Future]] | None = None
        self._worker: asyncio.Task | None = None

    async def submit(self, item: T) -> R:
        if self._worker is None:  # the loop exists only once a request arrives (a replica's __init__ has none)
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="hlm-micro-batcher")
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        return await future

    def stats(self) -> dict:
        batches, items = sum(self.sizes.values()), sum(s * n for s, n in self.sizes.items())
        return {"batches": batches, "items": items, "mean_size": round(items / batches, 2) if batches else None,
                "largest": max(self.sizes, default=0), "max_batch_size": self.max_batch_size}

    async def _next_batch(self) -> list[tuple[T, asyncio.Future]]:
        batch = [await self._queue.get()]
        deadline = asyncio.get_running_loop().time() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return [(item, future) for item, future in batch if not future.done()]  # drop callers that gave up

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            self.sizes[len(batch)] += 1
            try:
                results = await self.fn([item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} items")
            except Exception as e:  # the callers get it; the worker must live on for the next batch
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)

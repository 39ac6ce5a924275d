"""MicroBatcher on a plain asyncio loop: lone requests alone, concurrent ones together, results back in order."""

from __future__ import annotations

import asyncio

import pytest

from hlm.batcher import MicroBatcher


def doubled_in_batches(seen: list[list[int]], gate: asyncio.Event | None = None):
    async def fn(items: list[int]) -> list[int]:
        seen.append(list(items))
        if gate is not None:
            await gate.wait()
        return [2 * x for x in items]
    return fn


def test_a_lone_request_runs_at_once_in_a_batch_of_one():
    seen: list[list[int]] = []

    async def body():
        batcher = MicroBatcher(doubled_in_batches(seen), max_batch_size=8)
        return [await batcher.submit(x) for x in (1, 2, 3)], batcher.stats()

    results, stats = asyncio.run(body())
    assert results == [2, 4, 6] and seen == [[1], [2], [3]]
    assert stats == {"batches": 3, "items": 3, "mean_size": 1.0, "largest": 1, "max_batch_size": 8}


def test_requests_that_queue_while_a_batch_runs_form_the_next_batch_up_to_its_size():
    seen: list[list[int]] = []

    async def body():
        gate = asyncio.Event()
        batcher = MicroBatcher(doubled_in_batches(seen, gate), max_batch_size=4)
        first = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0)  # the first batch starts and blocks on the gate
        await asyncio.sleep(0)
        rest = [asyncio.create_task(batcher.submit(x)) for x in range(1, 7)]
        await asyncio.sleep(0)
        gate.set()
        return await asyncio.gather(first, *rest)

    assert asyncio.run(body()) == [2 * x for x in range(7)]  # each caller gets its own item's result
    assert seen == [[0], [1, 2, 3, 4], [5, 6]]


def test_an_error_reaches_every_caller_of_its_batch_and_the_next_batch_still_runs():
    async def fn(items: list[str]) -> list[str]:
        if "bad" in items:
            raise ValueError("no")
        return items

    async def body():
        batcher = MicroBatcher(fn, max_batch_size=4)
        failed = await asyncio.gather(batcher.submit("bad"), return_exceptions=True)
        return failed, await batcher.submit("ok")

    failed, ok = asyncio.run(body())
    assert isinstance(failed[0], ValueError) and ok == "ok"


def test_a_wrong_number_of_results_is_an_error_not_a_misrouted_answer():
    async def fn(items: list[int]) -> list[int]:
        return items[:-1]

    async def body():
        return await MicroBatcher(fn, max_batch_size=2).submit(1)

    with pytest.raises(RuntimeError, match="returned 0 results for 1 items"):
        asyncio.run(body())


def test_a_wait_gathers_requests_that_arrive_within_it():
    seen: list[list[int]] = []

    async def body():
        batcher = MicroBatcher(doubled_in_batches(seen), max_batch_size=8, max_wait_s=5.0)
        first = asyncio.create_task(batcher.submit(1))
        await asyncio.sleep(0)
        rest = [asyncio.create_task(batcher.submit(x)) for x in range(2, 9)]  # the 8th item fills the batch
        return await asyncio.gather(first, *rest)

    assert asyncio.run(body()) == [2 * x for x in range(1, 9)] and seen == [list(range(1, 9))]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_batch_size"):
        MicroBatcher(doubled_in_batches([]), max_batch_size=0)

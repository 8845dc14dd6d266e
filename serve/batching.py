"""Adaptive batching inside the serving process.

Requests queue for the model; whenever the model is free, everything queued (up to
``max_batch_size`` rows) goes into one call. There is no timer: under light load a request
runs at once, alone, and waits for nothing; under load the requests that arrived during the
previous call form the next batch, so batches grow with load (and GPU throughput with them)
and shrink again when it falls.

Why not a second BentoML service with a ``batchable=True`` API (what this replaced): its
extra HTTP hop per request (serialize, Unix socket, parse, dispatch) cost more CPU than the
model. Measured on 2 CPU cores with the digits demo model at concurrency 16: 265 requests/s
with the hop, 557 without it (``bench/results/cpu-2core-serve``)."""
from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

logger = logging.getLogger("serve")

Predict = Callable[[np.ndarray, int], np.ndarray]
"""``predict(rows, slot)``: ``slot`` (0 .. slots - 1) says which model thread runs the call, so
that each thread uses its own IO binding and buffers."""


class AdaptiveBatcher:
    """``await batcher(rows)`` -> ``predict(rows, slot)``, computed in a batch with whatever
    else is waiting. ``predict`` runs on dedicated model threads (ONNX Runtime releases the
    GIL, so the event loop keeps accepting and decoding requests meanwhile), at most ``slots``
    calls at a time. One (the default) suits a CPU, where a session already uses every core;
    on a GPU a second call can copy its batch while the first one computes."""

    def __init__(self, predict: Predict, *, max_batch_size: int, slots: int = 1) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        self.predict = predict
        self.max_batch_size = max_batch_size
        self.slots = slots
        self.batches = 0  # model calls made, and the rows they carried: the mean batch size is
        self.rows = 0     # rows / batches (reported by /metadata)
        self._pending: deque[tuple[np.ndarray, asyncio.Future[np.ndarray]]] = deque()
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="model")

    async def __call__(self, rows: np.ndarray) -> np.ndarray:
        """Results for ``rows`` (split into chunks of at most ``max_batch_size`` rows)."""
        if len(rows) == 0:
            raise ValueError("no rows to predict")
        if len(rows) <= self.max_batch_size:  # the usual case: no task per chunk to gather
            return await self._submit(rows)
        chunks = [rows[i:i + self.max_batch_size] for i in range(0, len(rows), self.max_batch_size)]
        results = await asyncio.gather(*(self._submit(chunk) for chunk in chunks))
        return np.concatenate(results, axis=0)

    async def _submit(self, rows: np.ndarray) -> np.ndarray:
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done() or self._worker.get_loop() is not loop:
            self._wakeup = asyncio.Event()
            # a fresh context: the worker outlives the request that happened to start it
            self._worker = loop.create_task(self._serve(self._wakeup), name="adaptive-batcher",
                                            context=contextvars.Context())
        assert self._wakeup is not None
        future: asyncio.Future[np.ndarray] = loop.create_future()
        self._pending.append((rows, future))
        self._wakeup.set()
        return await future

    def _take_batch(self) -> list[tuple[np.ndarray, asyncio.Future[np.ndarray]]]:
        """The oldest requests, in order, while they fit in ``max_batch_size`` rows (the first
        always fits: chunks are never larger); requests whose caller has gone are dropped."""
        batch: list[tuple[np.ndarray, asyncio.Future[np.ndarray]]] = []
        size = 0
        while self._pending:
            rows, future = self._pending[0]
            if future.done():  # cancelled: the client went away
                self._pending.popleft()
                continue
            if batch and size + len(rows) > self.max_batch_size:
                break
            batch.append(self._pending.popleft())
            size += len(rows)
        return batch

    async def _serve(self, wakeup: asyncio.Event) -> None:
        """Take a batch whenever a model thread is free (so batches grow while all are busy)."""
        free = list(range(self.slots))
        freed = asyncio.Event()
        calls: set[asyncio.Task[None]] = set()
        try:
            while True:
                if not free:
                    freed.clear()
                    await freed.wait()
                    continue
                batch = self._take_batch()
                if not batch:
                    wakeup.clear()
                    await wakeup.wait()
                    continue
                slot = free.pop()
                call = asyncio.create_task(self._call(batch, slot))
                calls.add(call)

                def done(task: asyncio.Task[None], slot: int = slot) -> None:
                    calls.discard(task)
                    free.append(slot)
                    freed.set()

                call.add_done_callback(done)
                if self.slots == 1:
                    await asyncio.wait({call})  # one at a time: the next batch gathers meanwhile
        finally:
            for call in calls:
                call.cancel()

    async def _call(self, batch: list[tuple[np.ndarray, asyncio.Future[np.ndarray]]], slot: int) -> None:
        """One model call for ``batch`` on model thread ``slot``; answers or fails its callers."""
        loop = asyncio.get_running_loop()
        try:
            stacked = batch[0][0] if len(batch) == 1 else np.concatenate([rows for rows, _ in batch], axis=0)
            results = await loop.run_in_executor(self._executor, self.predict, stacked, slot)
            if len(results) != len(stacked):
                raise RuntimeError(f"the model returned {len(results)} rows for {len(stacked)}")
        except Exception as exc:  # the callers answer 500; the batcher keeps serving
            logger.exception("model call failed for a batch of %d request(s)", len(batch))
            _fail(batch, exc)
            return
        except BaseException as exc:  # cancelled (the loop is shutting down): nobody is left waiting
            _fail(batch, exc)
            raise
        self.batches += 1
        self.rows += len(stacked)
        start = 0
        for rows, future in batch:
            if not future.done():
                future.set_result(results[start:start + len(rows)])
            start += len(rows)

    def stats(self) -> dict[str, float]:
        return {"model_calls": self.batches, "rows": self.rows,
                "mean_batch_size": round(self.rows / self.batches, 2) if self.batches else 0.0}


def _fail(batch: list[tuple[np.ndarray, asyncio.Future[np.ndarray]]], exc: BaseException) -> None:
    """Fail every request of ``batch`` still waiting, each with its own exception (one shared
    object would collect every caller's traceback)."""
    for _, future in batch:
        if future.done():
            continue
        if isinstance(exc, asyncio.CancelledError):
            future.cancel()
        else:
            error = RuntimeError(f"model call failed: {exc}")
            error.__cause__ = exc
            future.set_exception(error)

"""A batching TensorFlow server: the stronger peer `cnnserve bench` compares with.

REFERENCE IMPLEMENTATION, NOT PART OF THE PRODUCT. What a careful engineer writes once
the tutorial-style server (``reference_server.py``, whose loading, decoding and answer it
reuses) is too slow: FastAPI, Pillow to decode and resize to 224×224 on the thread pool,
and an asyncio queue that collects up to 32 requests (or waits a few milliseconds for
more) and runs ONE TensorFlow SavedModel call per batch on a thread. No limits, no
metrics. Answers ``POST /v1/classify`` (raw image body) with the same JSON as the
tutorial server, plus an ``X-Batch-Size`` header: how many requests shared its
TensorFlow call (the bench reports the mean; tests check that batches form).

    python loadtests/batching_reference_server.py --model-dir model_repository/fashion_mnist/1
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np
import reference_server
from fastapi import FastAPI, Request, Response
from starlette.concurrency import run_in_threadpool

MAX_BATCH = int(os.environ.get("REFERENCE_MAX_BATCH", "32"))
MAX_WAIT_S = float(os.environ.get("REFERENCE_MAX_WAIT_MS", "5")) / 1e3

Item = tuple[np.ndarray, "asyncio.Future[tuple[np.ndarray, int]]"]


async def batch_loop(queue: asyncio.Queue[Item]) -> None:
    """Take what is queued (up to MAX_BATCH, waiting at most MAX_WAIT_S for more after
    the first), run one TensorFlow call on a thread, hand each request its row."""
    loop = asyncio.get_running_loop()
    while True:
        items = [await queue.get()]
        deadline = loop.time() + MAX_WAIT_S
        while len(items) < MAX_BATCH:
            try:
                items.append(queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                items.append(await asyncio.wait_for(queue.get(), remaining))
            except TimeoutError:
                break
        batch = np.stack([x for x, _ in items])
        try:
            probabilities = await asyncio.to_thread(reference_server.predict, batch)
        except Exception as exc:  # every waiter hears of it, the loop goes on
            for _, future in items:
                if not future.done():
                    future.set_exception(exc)
            continue
        for row, (_, future) in zip(probabilities, items, strict=True):
            if not future.done():
                future.set_result((row, len(items)))


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    reference_server.load_model()
    queue: asyncio.Queue[Item] = asyncio.Queue()
    reference_server.state["queue"] = queue
    task = asyncio.create_task(batch_loop(queue))
    yield
    task.cancel()


app = FastAPI(title="reference (batching TensorFlow) classifier", lifespan=lifespan)


@app.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/v1/classify")
async def classify(request: Request, response: Response) -> dict[str, object]:
    pixels = await run_in_threadpool(reference_server.decode, await request.body())
    future: asyncio.Future[tuple[np.ndarray, int]] = asyncio.get_running_loop().create_future()
    await reference_server.state["queue"].put((pixels, future))
    probabilities, size = await future
    response.headers["X-Batch-Size"] = str(size)
    return reference_server.answer(probabilities)


if __name__ == "__main__":
    reference_server.main("batching_reference_server:app", __doc__ or "")

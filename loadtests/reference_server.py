"""The tutorial-style image classifier server: the baseline `cnnserve bench` compares with.

REFERENCE IMPLEMENTATION, NOT PART OF THE PRODUCT. This is the server most people write
first, kept deliberately plain: FastAPI, Pillow to decode, one TensorFlow ``model(...)``
call per request, no batching, no limits, no metrics. It serves the same SavedModel and
answers ``POST /v1/classify`` with a raw image body, so the bench puts the same load on
both servers.

    python loadtests/reference_server.py --model-dir model_repository/fashion_mnist/1

``batching_reference_server.py`` beside it reuses the loading, decoding, answer and
command line below, and batches the TensorFlow calls.
"""

from __future__ import annotations

import argparse
import io
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
import uvicorn
from fastapi import FastAPI, Request
from PIL import Image

MODEL_DIR_ENV = "REFERENCE_MODEL_DIR"
state: dict[str, Any] = {}


def load_model() -> None:
    model_dir = Path(os.environ[MODEL_DIR_ENV])
    state["model"] = tf.saved_model.load(str(model_dir))
    labels = model_dir / "assets.extra" / "labels.txt"
    state["labels"] = labels.read_text().splitlines() if labels.exists() else []


def decode(body: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(body)).convert("RGB").resize((224, 224))
    return np.asarray(image, dtype=np.uint8)


def predict(batch: np.ndarray) -> np.ndarray:
    model = state["model"].signatures["serving_default"]
    return model(image=tf.constant(batch))["probabilities"].numpy()


def answer(probabilities: np.ndarray) -> dict[str, object]:
    best = int(np.argmax(probabilities))
    labels = state["labels"]
    label = labels[best] if best < len(labels) else str(best)
    return {"label": label, "class_id": best, "score": float(probabilities[best])}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    load_model()
    yield


app = FastAPI(title="reference (tutorial-style) classifier", lifespan=lifespan)


@app.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/v1/classify")
async def classify(request: Request) -> dict[str, object]:
    x = np.expand_dims(decode(await request.body()), 0)
    return answer(predict(x)[0])


def main(app_name: str = "reference_server:app", description: str = __doc__) -> None:
    parser = argparse.ArgumentParser(description=description.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    # The module is imported again by each uvicorn worker; the variable tells it the model.
    os.environ[MODEL_DIR_ENV] = str(args.model_dir.resolve())
    uvicorn.run(
        app_name,
        app_dir=str(Path(__file__).parent),
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level="warning",
        # Not tutorial code: on a busy box a worker still importing TensorFlow misses
        # uvicorn's 5 s health check and is restarted, again and again.
        timeout_worker_healthcheck=120,
    )


if __name__ == "__main__":
    main()

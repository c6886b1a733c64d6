"""How long a worker's other requests wait while it takes in large JSON `:predict` bodies:
the measurement behind docs/failure-modes.md's "large JSON bodies at once".

    python loadtests/json_stall.py http://127.0.0.1:8000 --model fashion_mnist \\
        --images 12 --rounds 6

It posts ``--rounds`` `:predict` bodies of ``--images`` images as pixel lists
(224x224x3, integers, or floats with ``--floats``), one after another, while a thread
polls ``/healthz`` every ``--every`` seconds, and prints one JSON object: the body's
size, each `:predict`'s seconds, and the polls' count, median, p99 and longest wait (ms).
A `/healthz` waits as long as the worker's event loop is stopped, parsing or converting.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from typing import Any

import httpx

from service.bench.overload import percentile, rounded_ms
from service.cli_types import POSITIVE, at_least


def pixel_body(images: int, floats: bool) -> bytes:
    """``images`` different 224x224 RGB images as a `:predict` body of pixel lists."""
    rows = []
    for i in range(images):
        row = [[(x * 7 + i) % 256, (x * 13) % 256, (255 - x) % 256] for x in range(224)]
        rows.append([[[float(v) for v in px] for px in row] if floats else row] * 224)
    return json.dumps({"instances": rows}).encode()


def run(
    url: str, model: str, *, images: int, rounds: int, floats: bool, every: float
) -> dict[str, Any]:
    body = pixel_body(images, floats)
    waits: list[float] = []
    done = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            while not done.is_set():
                began = time.perf_counter()
                client.get("/healthz").raise_for_status()
                waits.append(time.perf_counter() - began)
                done.wait(every)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    took = []
    try:
        with httpx.Client(base_url=url, timeout=120) as client:
            for _ in range(rounds):
                began = time.perf_counter()
                answer = client.post(
                    f"/v1/models/{model}:predict",
                    content=body,
                    headers={"content-type": "application/json"},
                )
                took.append(round(time.perf_counter() - began, 4))
                answer.raise_for_status()
    finally:
        done.set()
        poller.join(30)
    ms = [w * 1000 for w in waits]
    return {
        "body_bytes": len(body),
        "images": images,
        "predict_s": took,
        "predict_median_s": statistics.median(took),
        "polls": len(ms),
        "poll_p50_ms": rounded_ms(percentile(ms, 50)),
        "poll_p99_ms": rounded_ms(percentile(ms, 99)),
        "poll_longest_ms": rounded_ms(max(ms, default=None)),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("url", help="the gateway's REST address, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", default="fashion_mnist")
    parser.add_argument("--images", type=at_least(1), default=12)
    parser.add_argument("--rounds", type=at_least(1), default=6)
    parser.add_argument("--floats", action="store_true", help="pixels as floats (12.0)")
    parser.add_argument("--every", type=POSITIVE, default=0.005, help="seconds between polls")
    args = parser.parse_args(argv)
    result = run(
        args.url.rstrip("/"),
        args.model,
        images=args.images,
        rounds=args.rounds,
        floats=args.floats,
        every=args.every,
    )
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()

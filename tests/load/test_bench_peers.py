"""What the issue's measurement needs from `cnnserve bench`: the photo mix, wrk sending
varied bodies, MobileNetV3-Small built and served with TensorFlow's answers, and the
batching TensorFlow peer. Real servers on 127.0.0.1; no timing is asserted."""

from __future__ import annotations

import hashlib
import io
import json
import os
import statistics
import sys
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.bench import mobilenet
from service.bench.photos import photo_mix
from service.bench.process import started
from service.bench.wrk import Load, run_wrk
from service.config import Settings
from service.launch import free_port
from service.repository import read_card, version_dirs
from service.training.evaluate import load_signature
from tests.helpers.http_stub import QuietHandler, http_stub
from tests.helpers.loadtests import LOADTESTS, load_module
from tests.helpers.server import Server

pytestmark = [pytest.mark.load, pytest.mark.slow]


def test_photo_mix_is_deterministic_and_weighs_about_10_kib() -> None:
    mix = photo_mix()
    assert len(mix.images) == 200
    assert 8 * 1024 <= mix.median_bytes <= 12 * 1024, mix.median_bytes
    assert len(set(mix.images)) == 200
    assert Image.open(io.BytesIO(mix.images[0])).size == (224, 224)
    assert photo_mix(10).images == photo_mix(10).images
    assert photo_mix(10, seed=1).images != photo_mix(10).images


@pytest.fixture
def body_recorder() -> Iterator[tuple[str, list[str]]]:
    """A tiny HTTP server that answers 200 and records the sha256 of every POST body."""
    seen: list[str] = []

    class Handler(QuietHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append(hashlib.sha256(body).hexdigest())
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

    with http_stub(Handler) as url:
        yield url, seen


def test_wrk_sends_a_random_body_of_the_set_per_request(
    body_recorder: tuple[str, list[str]], tmp_path: Path
) -> None:
    url, seen = body_recorder
    images = photo_mix(6).images
    paths = []
    for i, data in enumerate(images):
        paths.append(tmp_path / f"{i}.jpg")
        paths[-1].write_bytes(data)
    result = run_wrk(url, Load("/v1/classify", bodies=tuple(paths)), connections=2, seconds=1)
    assert result["ok"] > 0 and not result["errors"]
    assert len(set(seen)) > 1
    assert set(seen) <= {hashlib.sha256(x).hexdigest() for x in images}


def test_mobilenet_repository_serves_tensorflows_answers_with_litert(
    tmp_path: Path, start_server: Callable[..., Server]
) -> None:
    version_dir = mobilenet.build_repository(tmp_path)
    card = read_card(version_dir)
    litert = card["runtimes"]["litert"]
    assert litert["verified"] and litert.get("precision", "float32") == "float32"
    assert card["architecture"]["num_classes"] == 1000
    images = photo_mix(6).images
    # Seeded weights: the same model twice; calibrated: not one answer for every image.
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(x)).convert("RGB")) for x in images])
    first = load_signature(version_dir)(pixels)
    assert len({int(i) for i in first.argmax(axis=1)}) > 1
    again = mobilenet.build_repository(tmp_path / "again")
    np.testing.assert_allclose(load_signature(again)(pixels), first, atol=1e-6)

    server = start_server(version_dir.parents[1], env={"CNNSERVE_RUNTIME": "litert"})
    answers = mobilenet.check_answers(server.url, version_dir, images, Settings())
    assert answers["ok"] and answers["images"] == 6
    assert answers["max_score_diff"] <= mobilenet.ANSWER_TOLERANCE


def test_batching_peer_answers_like_the_tutorial_server_and_batches(
    tiny_repo: Path, tmp_path: Path
) -> None:
    version_dir = max(version_dirs(tiny_repo / "tiny").items())[1]
    reference = load_module("reference_server")
    os.environ[reference.MODEL_DIR_ENV] = str(version_dir)
    try:
        reference.load_model()
    finally:
        del os.environ[reference.MODEL_DIR_ENV]
    images = photo_mix(16).images
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, str(LOADTESTS / "batching_reference_server.py")]
    cmd += ["--model-dir", str(version_dir), "--port", str(port)]

    def classify(image: bytes) -> tuple[dict[str, object], int]:
        request = urllib.request.Request(
            url + "/v1/classify", data=image, headers={"Content-Type": "image/jpeg"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read()), int(response.headers["X-Batch-Size"])

    with (
        started(
            cmd,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
            ready_url=url + "/healthz",
            log=tmp_path / "batching-peer.log",
        ),
        ThreadPoolExecutor(16) as pool,
    ):
        answered = [list(pool.map(classify, images)) for _ in range(3)]
    for wave in answered:
        for image, (body, _) in zip(images, wave, strict=True):
            expected = reference.answer(reference.predict(reference.decode(image)[None])[0])
            assert body["class_id"] == expected["class_id"]
            assert body["label"] == expected["label"]
            assert body["score"] == pytest.approx(expected["score"], abs=1e-5)
    sizes = [size for wave in answered for _, size in wave]
    assert max(sizes) > 1, sizes
    assert statistics.mean(sizes) >= 1

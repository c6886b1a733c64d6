"""The metrics module: bounded labels, the batcher observer, and several processes
writing to one PROMETHEUS_MULTIPROC_DIR as uvicorn's workers do."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from service import metrics, requestlog
from service.batching import BatchingConfig, DynamicBatcher
from service.errors import DeadlineExceeded, Overloaded
from tests.helpers.core import until, whole

ROOT = Path(__file__).resolve().parents[2]


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_request_labels_are_checked_against_fixed_sets() -> None:
    with pytest.raises(ValueError, match="protocol"):
        metrics.observe_request("websocket", "/v1/classify", "m", "1", 200, 0.1)
    with pytest.raises(ValueError, match="stage"):
        metrics.observe_stage("m", "postprocess", 0.1)
    with pytest.raises(ValueError, match="event"):
        metrics.observe_model_event("m", "exploded")
    with pytest.raises(ValueError, match="reason"):
        metrics.observe_shed("", "bad luck")


def test_request_is_counted_with_its_code_and_latency() -> None:
    labels = {"protocol": "grpc", "route": "/t.P/Predict", "model": "req", "version": "3"}
    before = value("cnnserve_requests_total", **labels, code="504")
    metrics.observe_request("grpc", "/t.P/Predict", "req", "3", 504, 0.2)
    assert value("cnnserve_requests_total", **labels, code="504") == before + 1
    hist = {"protocol": "grpc", "route": "/t.P/Predict", "model": "req", "version": "3"}
    assert value("cnnserve_request_duration_seconds_bucket", **hist, le="0.25") >= 1
    assert value("cnnserve_request_duration_seconds_bucket", **hist, le="0.1") == 0


def test_predicted_classes_come_from_the_model_labels() -> None:
    probabilities = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.0, 0.3, 0.7], [0.2, 0.7, 0.1]])
    # Fewer labels than classes: the class id stands in, still bounded by the class count.
    metrics.observe_predictions("mix", 2, ["cat", "dog"], probabilities)
    counts = {
        c: value("cnnserve_predictions_total", model="mix", version="2", **{"class": c})
        for c in ("cat", "dog", "2")
    }
    assert counts == {"cat": 1, "dog": 2, "2": 1}
    labels = {"model": "mix", "version": "2"}
    assert value("cnnserve_top1_confidence_ratio_count", **labels) == 4
    assert value("cnnserve_top1_confidence_ratio_sum", **labels) == pytest.approx(3.1)
    assert value("cnnserve_top1_confidence_ratio_bucket", **labels, le="0.7") == 2


def test_an_announced_version_has_every_class_at_zero() -> None:
    metrics.announce_version("fresh", 1, ["a", "b"])
    body = metrics.render()[0].decode()
    for label in ("a", "b"):
        assert (
            f'cnnserve_predictions_total{{class="{label}",model="fresh",version="1"}} 0.0' in body
        )
    assert 'cnnserve_in_flight_requests{model="fresh"} 0.0' in body


def test_version_states_are_one_hot() -> None:
    metrics.observe_version_state("states", 4, "LOADING")
    metrics.observe_version_state("states", 4, "AVAILABLE")
    on = {
        s: value("cnnserve_model_versions", model="states", version="4", state=s)
        for s in metrics.VERSION_STATES
    }
    assert on == {"START": 0, "LOADING": 0, "AVAILABLE": 1, "UNLOADING": 0, "END": 0}
    metrics.observe_configured([], ["states", "other"])
    metrics.observe_configured(["states", "other"], ["other"])
    assert value("cnnserve_model_configured", model="states") == 0
    assert value("cnnserve_model_configured", model="other") == 1


def test_batcher_reports_batches_queue_and_rejections() -> None:
    config = BatchingConfig(
        max_batch_size=2, batch_timeout_micros=0, max_enqueued_batches=1, num_batch_threads=1
    )
    observer = metrics.BatcherMetrics("batchy", 1, config.queue_capacity)
    release = asyncio.Event()
    capacity, per_image = "cnnserve_queue_capacity", "cnnserve_inference_seconds_per_image"

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        started = asyncio.Event()

        def predict(batch: np.ndarray, deadline: float | None = None) -> np.ndarray:
            loop.call_soon_threadsafe(started.set)
            asyncio.run_coroutine_threadsafe(release.wait(), loop).result(5)
            return batch[:, :1].astype(np.float32)

        async with DynamicBatcher(whole(predict), config, observer=observer) as batcher:
            first = asyncio.create_task(batcher.submit(np.ones((2, 3)), deadline=None))
            await started.wait()  # the first batch is on the thread; the queue is empty
            queued = asyncio.create_task(batcher.submit(np.ones((2, 3)), deadline=None))
            await until(lambda: value("cnnserve_queue_depth", model="batchy", version="1") == 2)
            with pytest.raises(Overloaded):
                await batcher.submit(np.ones((1, 3)), deadline=None)
            release.set()
            await asyncio.gather(first, queued)
            assert value(per_image, model="batchy", version="1") > 0
            assert value(capacity, model="batchy", version="1") == 2

    asyncio.run(asyncio.wait_for(scenario(), 10))
    assert value("cnnserve_batch_size_count", model="batchy") == 2
    assert value("cnnserve_batch_size_sum", model="batchy") == 4
    shed = "cnnserve_overload_rejections_total"
    assert value(shed, model="batchy", reason="queue_full") == 1
    assert value(shed, model="batchy", reason="queue_budget") == 0  # exists, reads 0
    assert value("cnnserve_deadline_expirations_total", model="batchy") == 0
    assert value("cnnserve_queue_depth", model="batchy", version="1") == 0
    # Stopped (its version unloaded): no queue. They read what they last were before.
    assert value(capacity, model="batchy", version="1") == 0
    assert value(per_image, model="batchy", version="1") == 0
    stage = {"model": "batchy"}
    assert value("cnnserve_stage_duration_seconds_count", **stage, stage="queue_wait") == 2
    assert value("cnnserve_stage_duration_seconds_count", **stage, stage="inference") == 2


# --- several processes, one directory -------------------------------------------------

WRITER = """
import sys
from service import metrics  # notes this process as it is imported
metrics.observe_request("rest", "/v1/classify", "mp", "1", 200, 0.01)
metrics.IN_FLIGHT.labels("mp").set(int(sys.argv[1]))
metrics.observe_version_state("mp", 1, "AVAILABLE")
print("written", flush=True)
sys.stdin.readline()
"""


@pytest.fixture
def multiproc_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # Only render() reads the variable in this process; the writers get it at start.
    monkeypatch.setenv(metrics.MULTIPROC_ENV, str(tmp_path))
    return tmp_path


@pytest.fixture
def writers(multiproc_dir: Path) -> Iterator[list[subprocess.Popen[str]]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), metrics.MULTIPROC_ENV: str(multiproc_dir)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(n)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for n in (3, 4)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline() == "written\n"
        yield procs
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


# The series each writer process counts 1 in (WRITER), as scrape() keys it.
WRITTEN_REQUESTS = (
    "cnnserve_requests_total",
    (
        ("code", "200"),
        ("model", "mp"),
        ("protocol", "rest"),
        ("route", "/v1/classify"),
        ("version", "1"),
    ),
)


def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def end(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(10) == 0


def test_processes_are_summed_and_dead_ones_leave_the_gauges(
    writers: list[subprocess.Popen[str]], multiproc_dir: Path
) -> None:
    requests = WRITTEN_REQUESTS
    in_flight = ("cnnserve_in_flight_requests", (("model", "mp"),))
    available = (
        "cnnserve_model_versions",
        (("model", "mp"), ("state", "AVAILABLE"), ("version", "1")),
    )
    samples = scrape()
    assert samples[requests] == 2
    assert samples[in_flight] == 7
    assert samples[available] == 2

    end(writers[0])
    samples = scrape()
    assert samples[requests] == 2  # totals never go backwards
    assert samples[in_flight] == 4  # the exited worker's gauges are gone
    assert samples[available] == 1
    assert not (multiproc_dir / metrics.PROCESSES_DIR / str(writers[0].pid)).exists()

    end(writers[1])
    samples = scrape()
    assert samples[requests] == 2
    assert in_flight not in samples


def test_a_process_that_never_set_a_min_over_workers_gauge_is_left_out_of_it(
    writers: list[subprocess.Popen[str]], multiproc_dir: Path
) -> None:
    """The writers never set cnnserve_backend_up (as a worker still starting, or failing
    to start in a loop): made at import, their 0 pulled the min to 0, and the
    CnnserveBackendDown page fired for a backend that answered."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), metrics.MULTIPROC_ENV: str(multiproc_dir)}
    setter = "from service import metrics; metrics.observe_backend(True); print('set')"
    done = subprocess.run(
        [sys.executable, "-c", setter], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert done.stdout == "set\n", done.stderr
    # The setter exited: livemin keeps only live processes' values; the writers set none.
    assert ("cnnserve_backend_up", ()) not in scrape()
    keeper = subprocess.Popen(
        [sys.executable, "-c", setter + "; import sys; sys.stdin.readline()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    try:
        assert keeper.stdout is not None and keeper.stdout.readline() == "set\n"
        assert scrape()[("cnnserve_backend_up", ())] == 1  # the writers' nothing: no 0
    finally:
        keeper.kill()
        keeper.wait()


# --- request records ---------------------------------------------------------------------


@pytest.fixture
def access_lines(
    capsys: pytest.CaptureFixture[str],
) -> Iterator[Callable[[], list[dict[str, object]]]]:
    """Call it to stop the access log (writing what is queued) and read its lines."""
    stop = requestlog.configure_access_log(True)

    def lines() -> list[dict[str, object]]:
        stop()
        return [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    try:
        yield lines
    finally:
        stop()


def test_a_record_collects_what_the_core_notes_and_is_closed_once(
    access_lines: Callable[[], list[dict[str, object]]],
) -> None:
    route = "/tensorflow.serving.PredictionService/Predict"
    labels = {"protocol": "grpc", "route": route, "model": "rec", "version": "5"}
    before = value("cnnserve_requests_total", **labels, code="504")
    with (
        pytest.raises(DeadlineExceeded),
        requestlog.recorded(requestlog.RequestRecord("id-7", "grpc", "POST", route=route)),
    ):
        requestlog.note_target("rec", 5)
        requestlog.note_timings({"decode": 0.002})
        raise DeadlineExceeded("too late")
    requestlog.note_target("elsewhere", 1)  # outside any record: ignored
    assert value("cnnserve_requests_total", **labels, code="504") == before + 1
    (line,) = access_lines()
    assert line["request_id"] == "id-7" and line["status"] == 504
    assert (line["model"], line["version"], line["route"]) == ("rec", 5, route)
    assert line["timings_ms"] == {"decode": 2.0}


def test_a_call_cancelled_by_the_servers_stop_is_not_the_clients_499() -> None:
    """Calls still running when gRPC's stop ran out of grace were logged as 499 (the
    client closed), which sent people looking at the clients."""
    route = "/cnnserve.v1.ImageClassifier/Classify"
    labels = {"protocol": "grpc", "route": route, "model": "", "version": ""}
    before = {
        code: value("cnnserve_requests_total", **labels, code=code) for code in ("499", "503")
    }
    for stopping, code in ((False, "499"), (True, "503")):
        with (
            pytest.raises(asyncio.CancelledError),
            requestlog.recorded(
                requestlog.RequestRecord("id", "grpc", "POST", route=route),
                stopping.__bool__,
            ),
        ):
            raise asyncio.CancelledError
        assert value("cnnserve_requests_total", **labels, code=code) == before[code] + 1


def test_a_dead_process_that_counted_nothing_leaves_no_files(
    writers: list[subprocess.Popen[str]], multiproc_dir: Path
) -> None:
    """A worker that dies before it serves (a respawn failing to start, in a loop) left
    its files of zeros for good: ~4 KB a start, and every scrape read them all."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), metrics.MULTIPROC_ENV: str(multiproc_dir)}
    failed_start = subprocess.run(
        [sys.executable, "-c", "from service import metrics; import os; print(os.getpid())"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    pid = failed_start.stdout.strip()
    assert list(multiproc_dir.glob(f"*_{pid}.db"))  # import made its files
    end(writers[0])  # one that counted requests
    scrape()
    assert not list(multiproc_dir.glob(f"*_{pid}.db"))
    assert list(multiproc_dir.glob(f"counter_{writers[0].pid}.db"))  # its totals stay
    assert scrape()[WRITTEN_REQUESTS] == 2


def tally_written(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Set once metrics.TURN writes what it counted."""
    written = threading.Event()
    flush = metrics.TURN.flush

    def flush_and_say() -> None:
        flush()
        written.set()

    monkeypatch.setattr(metrics.TURN, "flush", flush_and_say)
    return written


def test_the_loops_refusals_are_written_together_soon_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The HTTP protocol's refusals at the headers are counted in the process and
    # written together, TALLY_SECONDS after the first (metrics.TurnTally): nothing
    # before then, every one of them after, as the direct calls would have written them.
    requests = {"protocol": "rest", "route": "/turn", "model": "", "version": ""}
    shed = {"model": "", "reason": "backlog"}
    before = (
        value("cnnserve_requests_total", **requests, code="503"),
        value("cnnserve_requests_total", **requests, code="504"),
        value("cnnserve_overload_rejections_total", **shed),
        value("cnnserve_request_duration_seconds_count", **requests),
        value("cnnserve_request_duration_seconds_sum", **requests),
    )
    seen: list[tuple[float, ...]] = []
    written = tally_written(monkeypatch)

    async def turn() -> None:
        for seconds in (0.001, 0.002, 0.3):
            metrics.observe_request("rest", "/turn", "", "", 503, seconds, deferred=True)
            metrics.observe_shed("", "backlog", deferred=True)
        metrics.observe_request("rest", "/turn", "", "", 504, 0.2, deferred=True)
        for _ in range(3):  # turns of the loop go by
            await asyncio.sleep(0)
        seen.append(
            (
                value("cnnserve_requests_total", **requests, code="503"),
                value("cnnserve_overload_rejections_total", **shed),
            )
        )
        await asyncio.to_thread(written.wait, 10)

    asyncio.run(turn())
    assert written.is_set()
    assert seen == [before[0:1] + before[2:3]]  # nothing written within the turns
    assert value("cnnserve_requests_total", **requests, code="503") == before[0] + 3
    assert value("cnnserve_requests_total", **requests, code="504") == before[1] + 1
    assert value("cnnserve_overload_rejections_total", **shed) == before[2] + 3
    assert value("cnnserve_request_duration_seconds_count", **requests) == before[3] + 4
    assert value("cnnserve_request_duration_seconds_sum", **requests) == pytest.approx(
        before[4] + 0.503
    )


def test_deferred_counts_outside_a_running_loop_are_written_at_once() -> None:
    labels = {"model": "", "reason": "bodies"}
    before = value("cnnserve_overload_rejections_total", **labels)
    metrics.observe_shed("", "bodies", deferred=True)
    assert value("cnnserve_overload_rejections_total", **labels) == before + 1


def test_counts_of_a_loop_that_stopped_before_its_write_are_not_lost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A loop that stops and closes with the count's write still scheduled never runs it:
    # the next count, elsewhere, writes both (it waited for that loop's write before).
    labels = {"model": "", "reason": "connections"}
    before = value("cnnserve_overload_rejections_total", **labels)

    def count() -> None:
        metrics.observe_shed("", "connections", deferred=True)

    for _ in range(2):  # the second loop: scheduled on it, and not run either
        loop = asyncio.new_event_loop()
        loop.call_soon(count)
        loop.call_soon(loop.stop)  # the loop's last turn: the write would come later
        loop.run_forever()
        loop.close()
    assert value("cnnserve_overload_rejections_total", **labels) == before
    written = tally_written(monkeypatch)

    async def count_and_wait() -> None:
        count()
        await asyncio.to_thread(written.wait, 10)

    asyncio.run(count_and_wait())
    assert value("cnnserve_overload_rejections_total", **labels) == before + 3


@pytest.mark.parametrize(
    "values", [[0.0, 1e-6, 0.005, 0.0050001, 0.3, 7.0, 1e9], [0.02] * 5, [2.5], []]
)
def test_several_values_observed_at_once_fill_the_buckets_observe_would(
    values: list[float],
) -> None:
    # metrics._observe_all reads prometheus-client's bucket bounds and values: held
    # here to what observe() makes of the same values, bucket by bucket.
    from prometheus_client import CollectorRegistry, Histogram

    registry = CollectorRegistry()
    one = Histogram("one_seconds", "x", buckets=metrics.LATENCY_BUCKETS, registry=registry)
    all_ = Histogram("all_seconds", "x", buckets=metrics.LATENCY_BUCKETS, registry=registry)
    for v in values:
        one.observe(v)
    metrics._observe_all(all_, values)

    def samples(name: str) -> dict[tuple[str, str], float]:
        return {
            (s.name.removeprefix(name), s.labels.get("le", "")): s.value
            for family in registry.collect()
            if family.name == name
            for s in family.samples
            if not s.name.endswith("_created")
        }

    assert samples("all_seconds") == samples("one_seconds")
    assert len(samples("all_seconds")) == len(metrics.LATENCY_BUCKETS) + 3

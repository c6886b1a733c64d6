"""Both runtimes on real tiny SavedModels: same answers, thread safety, conversion cache."""

from __future__ import annotations

import json
import logging
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from service.errors import InvalidRequest, ModelLoadError
from service.repository import read_card
from service.runtimes import conversion, create_runtime
from service.runtimes.base import Runtime
from service.runtimes.card import verified_litert
from service.runtimes.litert import MAX_CHUNK, LiteRTRuntime, _main_graph_tensors, _open
from service.runtimes.tensorflow import TensorFlowRuntime
from tests.helpers.models import publish_tiny

pytestmark = pytest.mark.slow

U8 = npt.NDArray[np.uint8]


def _images(n: int, seed: int = 0, size: int = 224) -> U8:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _write_float_model(path: Path) -> None:
    """A foreign SavedModel: float32 [N,32,32,3] input, per-channel max as its one output."""
    import keras
    import tensorflow as tf

    inp = keras.Input((32, 32, 3), dtype="float32")
    model = keras.Model(inp, keras.layers.GlobalMaxPooling2D()(inp))

    def serve(pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"scores": model(pixels)}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serving_default", serve, [tf.TensorSpec([None, 32, 32, 3], tf.float32, name="pixels")]
    )
    archive.write_out(str(path), verbose=False)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runtimes")


@pytest.fixture(scope="module")
def shipped(root: Path) -> Path:
    """A cnnserve export whose card records a verified model.tflite."""
    return publish_tiny(root / "repo", "shipped", with_litert=True)


@pytest.fixture(scope="module")
def plain(root: Path) -> Path:
    """A cnnserve export without model.tflite: LiteRT must convert it."""
    return publish_tiny(root / "repo", "plain", seed=1)


@pytest.fixture(scope="module")
def float_model(root: Path) -> Path:
    _write_float_model(root / "float" / "1")
    return root / "float" / "1"


@pytest.fixture(scope="module")
def tf_rt(shipped: Path) -> TensorFlowRuntime:
    rt = TensorFlowRuntime(shipped)
    rt.load()
    return rt


@pytest.fixture(scope="module")
def lite_rt(shipped: Path, root: Path) -> LiteRTRuntime:
    rt = LiteRTRuntime(shipped, cache_dir=root / "unused-cache")
    rt.load()
    return rt


def test_both_runtimes_report_the_model(tf_rt: TensorFlowRuntime, lite_rt: LiteRTRuntime) -> None:
    assert lite_rt.artifact == tf_rt.version_dir / "assets.extra" / "model.tflite"
    for rt in (tf_rt, lite_rt):
        info = rt.info
        assert (info.input.height, info.input.width, info.input.dtype) == (224, 224, "uint8")
        assert (info.input.scale, info.input.offset) == (1.0, 0.0)
        assert info.num_classes == 3
        assert (info.input_name, info.output_name) == ("image", "probabilities")


def test_predictions_are_probabilities_and_litert_matches_tensorflow(
    tf_rt: TensorFlowRuntime, lite_rt: LiteRTRuntime
) -> None:
    batch = _images(5)
    expected = tf_rt.predict(batch)
    got = lite_rt.predict(batch)
    for out in (expected, got):
        assert out.shape == (5, 3) and out.dtype == np.float32
        np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_changing_batch_sizes_keep_correct_answers(
    tf_rt: TensorFlowRuntime, lite_rt: LiteRTRuntime
) -> None:
    # Sizes as the batcher sends them: below a chunk, a chunk, chunks and a remainder,
    # many chunks, and back to 1: one interpreter, resized between chunks of different
    # sizes, must answer each with its own input.
    sizes = [1, MAX_CHUNK + 1, 32, MAX_CHUNK, 4 * MAX_CHUNK - 1, 3, 1]
    interpreters = []  # the objects, kept: an id could be reused
    for i, n in enumerate(sizes):
        batch = _images(n, seed=i)
        got = lite_rt.predict(batch)
        assert got.shape == (n, 3)
        np.testing.assert_allclose(got, tf_rt.predict(batch), atol=1e-4)
        interpreters.append(lite_rt._local.interpreter)
    # One interpreter on this thread, the same whatever the sizes.
    assert all(each is interpreters[0] for each in interpreters)


@pytest.mark.parametrize("kind", ["tensorflow", "litert"])
def test_parts_are_answered_as_their_concatenation(
    kind: str, tf_rt: TensorFlowRuntime, lite_rt: LiteRTRuntime
) -> None:
    # The batcher's requests as it hands them over: parts of several sizes whose rows
    # straddle LiteRT's chunks (it copies them into its input piece by piece), answered
    # row for row as the batch they make. TensorFlow concatenates them (the default).
    rt: Runtime = tf_rt if kind == "tensorflow" else lite_rt
    parts = [_images(n, seed=10 + i) for i, n in enumerate([1, MAX_CHUNK + 1, 1, 1, 2, 1])]
    whole = rt.predict(np.concatenate(parts))
    got = rt.predict_parts(parts)
    assert got.shape == whole.shape == (sum(map(len, parts)), 3)
    np.testing.assert_array_equal(got, whole)
    np.testing.assert_array_equal(rt.predict_parts(parts[1:2]), rt.predict(parts[1]))
    # Checked as a batch is: a wrong shape is the client's error. (The batcher puts
    # only requests of one shape and dtype in a batch.)
    with pytest.raises(InvalidRequest, match="shape"):
        rt.predict_parts([_images(1, size=32)])


def test_litert_serves_a_signature_only_through_the_main_graph(shipped: Path) -> None:
    """The serving signature is run through the main graph's input and output (the
    public tensor API). cnnserve's artifacts have one signature, the main graph; one
    whose signature names other tensors (another graph's) is refused with what to do."""
    opened = _open(verified_litert(shipped, read_card(shipped)).read_bytes(), 1)
    runner = opened.get_signature_runner("serving_default")
    (given,) = [d["index"] for d in runner.get_input_details().values()]
    (answered,) = [d["index"] for d in runner.get_output_details().values()]
    assert _main_graph_tensors(opened, given, answered) == (given, answered)
    elsewhere = 1 + max(d["index"] for d in opened.get_tensor_details())
    with pytest.raises(ValueError, match="not the main graph's; convert the SavedModel"):
        _main_graph_tensors(opened, elsewhere, answered)
    with pytest.raises(ValueError, match="not the main graph's"):
        _main_graph_tensors(opened, given, elsewhere)


def _write_two_output_model(path: Path) -> None:
    """A foreign SavedModel with two outputs: logits, and the probabilities served."""
    import keras
    import tensorflow as tf

    inp = keras.Input((32, 32, 3), dtype="uint8")
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inp))
    logits = keras.layers.Dense(4)(pooled)
    model = keras.Model(inp, logits)

    def serve(images: tf.Tensor) -> dict[str, tf.Tensor]:
        out = model(images)
        return {"logits": out, "probabilities": tf.nn.softmax(out)}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serving_default", serve, [tf.TensorSpec([None, 32, 32, 3], tf.uint8, name="images")]
    )
    archive.write_out(str(path), verbose=False)


def test_litert_serves_the_probabilities_of_a_signature_with_several_outputs(
    root: Path, tmp_path: Path
) -> None:
    version = root / "two_outputs" / "1"
    _write_two_output_model(version)
    lite = LiteRTRuntime(version, cache_dir=tmp_path)
    reference = TensorFlowRuntime(version)
    assert lite.load().output_name == reference.load().output_name == "probabilities"
    try:
        parts = [_images(n, seed=20 + n, size=32) for n in (1, 2, 2)]
        got = lite.predict_parts(parts)
        np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(got, reference.predict(np.concatenate(parts)), atol=1e-5)
    finally:
        lite.unload()
        reference.unload()


@pytest.mark.parametrize("kind", ["tensorflow", "litert"])
def test_concurrent_predicts_match_single_threaded(
    kind: str, tf_rt: TensorFlowRuntime, lite_rt: LiteRTRuntime
) -> None:
    rt: Runtime = tf_rt if kind == "tensorflow" else lite_rt
    # Same sizes, different pixels: a shared interpreter would mix up threads' inputs.
    batches = [_images(n, seed=seed) for seed, n in enumerate((4, 4, 4, 4, 1, 1))]
    expected = [rt.predict(b) for b in batches]
    threads = 4
    start = threading.Barrier(threads)

    def work(i: int) -> list[npt.NDArray[np.float32]]:
        start.wait()  # all threads inside predict together, not one after another
        return [rt.predict(batches[(i + k) % len(batches)]) for k in range(12)]

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(work, range(threads)))
    for i, outs in enumerate(results):
        for k, out in enumerate(outs):
            np.testing.assert_allclose(out, expected[(i + k) % len(batches)], atol=1e-6)


def test_litert_converts_once_into_the_cache(
    plain: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = LiteRTRuntime(plain, cache_dir=tmp_path)
    first.load()
    assert first.artifact is not None and first.artifact.parent.parent == tmp_path
    assert first.artifact.parent.name == conversion.cache_key(plain)
    record = json.loads((first.artifact.parent / conversion.VERIFICATION).read_text())
    assert record["verified"] is True and record["max_abs_diff"] <= conversion.LITERT_TOLERANCE
    # 4 random images plus the warmup records' 1 + 8.
    assert record["verified_samples"] == 13
    stamp = first.artifact.stat().st_mtime_ns

    def no_conversion(saved_model: Path) -> bytes:
        raise AssertionError("converted again despite a verified cache entry")

    monkeypatch.setattr(conversion, "convert_saved_model", no_conversion)
    second = LiteRTRuntime(plain, cache_dir=tmp_path)
    second.load()
    assert second.artifact == first.artifact and first.artifact.stat().st_mtime_ns == stamp
    reference = TensorFlowRuntime(plain)
    reference.load()
    batch = _images(4, seed=3)
    np.testing.assert_allclose(second.predict(batch), reference.predict(batch), atol=1e-4)


def test_a_newer_conversion_revision_converts_again(
    plain: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A cache filled before a change to what conversion makes (a graph rewrite) must not
    # keep serving the older graph.
    old = LiteRTRuntime(plain, cache_dir=tmp_path)
    old.load()
    monkeypatch.setattr(conversion, "CONVERSION_REVISION", conversion.CONVERSION_REVISION + 1)
    new = LiteRTRuntime(plain, cache_dir=tmp_path)
    new.load()
    assert old.artifact is not None and new.artifact is not None
    assert new.artifact.parent != old.artifact.parent and new.artifact.is_file()
    assert new.artifact.parent.name == conversion.cache_key(plain)


def test_a_float_input_model_gets_pixels_scaled_to_unit_range(
    float_model: Path, tmp_path: Path
) -> None:
    batch = np.zeros((2, 32, 32, 3), np.uint8)
    batch[:, 5, 7] = (255, 51, 0)
    for rt in (TensorFlowRuntime(float_model), LiteRTRuntime(float_model, cache_dir=tmp_path)):
        info = rt.load()
        assert (info.input.dtype, info.input.height, info.num_classes) == ("float32", 32, 3)
        assert (info.input_name, info.output_name) == ("pixels", "scores")
        assert info.input.scale == pytest.approx(1 / 255) and info.input.offset == 0.0
        np.testing.assert_allclose(rt.predict(batch), [[1.0, 0.2, 0.0]] * 2, atol=1e-6)


def test_a_float_input_model_follows_the_cards_normalization(float_model: Path) -> None:
    card = float_model / "assets.extra" / "model_card.json"
    card.parent.mkdir(exist_ok=True)
    card.write_text(json.dumps({"preprocessing": {"normalization": {"scale": 2, "offset": -1}}}))
    try:
        rt = TensorFlowRuntime(float_model)
        rt.load()
        out = rt.predict(np.full((1, 32, 32, 3), 3, np.uint8))
    finally:
        card.unlink()
    np.testing.assert_allclose(out, [[5.0, 5.0, 5.0]])


def test_a_model_answering_other_than_probabilities_is_served_with_a_warning(
    float_model: Path, shipped: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Its scores are reported as they are (as TF Serving would); the log says so once,
    with what warm-up saw. A softmax model (the shipped export) says nothing."""
    from service.loading import prepare_version

    def load(folder: Path) -> None:
        prepared = prepare_version(
            folder,
            runtime_factory=create_runtime,
            runtime_name="tensorflow",
            cache_dir=tmp_path,
            threads=1,
        )
        prepared.runtime.unload()

    with caplog.at_level(logging.WARNING, logger="service.loading"):
        load(shipped)
        assert "not probabilities" not in caplog.text
        load(float_model)  # the per-channel max of a black image: rows summing to 0
    (said,) = [r.getMessage() for r in caplog.records if "not probabilities" in r.message]
    assert str(float_model) in said and "summing to 0 to 0" in said and "softmax" in said


@pytest.mark.parametrize("kind", ["tensorflow", "litert"])
def test_a_folder_that_is_not_a_saved_model_is_refused(kind: str, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "saved_model.pb").write_bytes(b"not a protobuf")
    for folder in (empty, broken):
        rt = create_runtime(kind, folder, cache_dir=tmp_path / "cache", threads=1)
        with pytest.raises(ModelLoadError, match=str(folder)):
            rt.load()
        assert not rt.ready


def _break(folder: Path, how: str) -> None:
    if how == "truncated saved_model.pb":
        pb = folder / "saved_model.pb"
        pb.write_bytes(pb.read_bytes()[:100])
    elif how == "saved_model.pb without the serving signature":
        from service.proto_gen.tensorflow.core.protobuf import saved_model_pb2

        saved = saved_model_pb2.SavedModel.FromString((folder / "saved_model.pb").read_bytes())
        del saved.meta_graphs[0].signature_def["serving_default"]
        (folder / "saved_model.pb").write_bytes(saved.SerializeToString())
    elif how == "no variables":
        shutil.rmtree(folder / "variables")
    elif how == "no variables.index":
        (folder / "variables" / "variables.index").unlink()
    elif how == "no variables data shard":
        for shard in (folder / "variables").glob("variables.data-*"):
            shard.unlink()
    elif how == "empty variables data shard":
        for shard in (folder / "variables").glob("variables.data-*"):
            shard.write_bytes(b"")
    elif how == "truncated variables data shard":
        for shard in (folder / "variables").glob("variables.data-*"):
            shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif how == "garbage variables data shard":  # same size: only the bytes differ
        for shard in (folder / "variables").glob("variables.data-*"):
            shard.write_bytes(_damaged(shard.read_bytes()))


@pytest.mark.parametrize(
    "how",
    [
        "truncated saved_model.pb",
        "saved_model.pb without the serving signature",
        "no variables",
        "no variables.index",
        "no variables data shard",
        "empty variables data shard",
        "truncated variables data shard",
        "garbage variables data shard",
    ],
)
def test_a_corrupt_saved_model_beside_a_verified_artifact_is_refused(
    how: str, shipped: Path, tmp_path: Path
) -> None:
    # The artifact alone could serve, but TF Serving would refuse the folder: so do we.
    folder = tmp_path / "1"
    shutil.copytree(shipped, folder)
    _break(folder, how)
    rt = LiteRTRuntime(folder, cache_dir=tmp_path / "cache")
    with pytest.raises(ModelLoadError, match=str(folder)) as refused:
        rt.load()
    assert not rt.ready
    if how in ("no variables", "no variables.index"):  # the folder was named for the index
        missing = "variables/" if how == "no variables" else "variables/variables.index"
        assert refused.value.message.endswith(f"but {missing} is missing"), refused.value


def _swap_saved_model(folder: Path, source: Path) -> None:
    """``folder``'s SavedModel replaced by ``source``'s; its artifact and card kept."""
    (folder / "saved_model.pb").unlink()
    shutil.rmtree(folder / "variables")
    shutil.copy2(source / "saved_model.pb", folder / "saved_model.pb")
    shutil.copytree(source / "variables", folder / "variables")


def test_an_artifact_beside_another_saved_model_is_not_served(
    shipped: Path, plain: Path, tmp_path: Path
) -> None:
    """A version folder whose SavedModel was replaced served the old weights from the
    old artifact, even a SavedModel that is no image classifier."""
    assert verified_litert(
        shipped, json.loads((shipped / "assets.extra/model_card.json").read_text())
    )
    # Another image model: the artifact is not its twin, so it is converted afresh.
    other = tmp_path / "other" / "1"
    shutil.copytree(shipped, other)
    _swap_saved_model(other, plain)
    rt = LiteRTRuntime(other, cache_dir=tmp_path / "cache")
    rt.load()
    assert rt.artifact is not None and "assets.extra" not in str(rt.artifact)
    images = _images(2)
    reference = TensorFlowRuntime(plain)
    reference.load()
    np.testing.assert_allclose(rt.predict(images), reference.predict(images), atol=1e-4)
    # A SavedModel that takes no image: refused, whatever artifact is beside it.
    import keras
    import tensorflow as tf

    vector_in = keras.Input((10,), dtype="float32")
    vectors = keras.Model(vector_in, keras.layers.Dense(3)(vector_in))
    archive = keras.export.ExportArchive()
    archive.track(vectors)
    archive.add_endpoint(
        "serving_default",
        lambda x: {"scores": vectors(x)},
        [tf.TensorSpec([None, 10], tf.float32, name="x")],
    )
    archive.write_out(str(tmp_path / "vectors"), verbose=False)
    foreign = tmp_path / "foreign" / "1"
    shutil.copytree(shipped, foreign)
    _swap_saved_model(foreign, tmp_path / "vectors")
    with pytest.raises(ModelLoadError, match=r"input 'x' is float32 \[None, 10\]"):
        LiteRTRuntime(foreign, cache_dir=tmp_path / "cache").load()


def test_an_artifact_of_another_shape_is_refused_without_a_record(
    shipped: Path, float_model: Path, tmp_path: Path
) -> None:
    """Cards from before saved_model_sha256: the shapes still have to agree."""
    folder = tmp_path / "1"
    shutil.copytree(shipped, folder)
    card_path = folder / "assets.extra" / "model_card.json"
    card = json.loads(card_path.read_text())
    del card["runtimes"]["litert"]["saved_model_sha256"]
    card_path.write_text(json.dumps(card))
    rt = LiteRTRuntime(folder, cache_dir=tmp_path / "cache")
    rt.load()  # the SavedModel it was made from: served
    rt.unload()
    _swap_saved_model(folder, float_model)
    with pytest.raises(ModelLoadError):
        LiteRTRuntime(folder, cache_dir=tmp_path / "cache").load()


def test_signatures_are_read_at_load_and_outlive_the_folder(shipped: Path, tmp_path: Path) -> None:
    folder = tmp_path / "1"
    shutil.copytree(shipped, folder)
    rt = LiteRTRuntime(folder, cache_dir=tmp_path / "cache")
    rt.load()
    shutil.rmtree(folder)  # deleted while it serves: metadata must still answer
    assert set(rt.signature_defs().signature_def) == {
        "serving_default",
        "predict_image_bytes",
        "__saved_model_init_op",
    }
    rt.unload()
    with pytest.raises(RuntimeError, match="not loaded"):
        rt.signature_defs()


def test_a_wrong_batch_is_an_invalid_request(
    tf_rt: TensorFlowRuntime, lite_rt: LiteRTRuntime
) -> None:
    for rt in (tf_rt, lite_rt):
        for bad in (
            np.zeros((2, 224, 224), np.uint8),
            np.zeros((2, 100, 100, 3), np.uint8),
            np.zeros((2, 224, 224, 3), np.float64),
        ):
            with pytest.raises(InvalidRequest, match="expected"):
                rt.predict(bad)
        assert rt.predict(np.zeros((0, 224, 224, 3), np.uint8)).shape == (0, 3)


def test_auto_picks_litert_for_a_verified_artifact(shipped: Path, tmp_path: Path) -> None:
    rt = create_runtime("auto", shipped, cache_dir=tmp_path, threads=1)
    assert isinstance(rt, LiteRTRuntime) and rt.name == "litert"
    assert rt.load().num_classes == 3
    assert not any(tmp_path.iterdir())  # the shipped artifact needed no conversion
    with pytest.raises(ValueError, match="unknown runtime"):
        create_runtime("onnx", shipped, cache_dir=tmp_path, threads=1)


def test_auto_falls_back_to_tensorflow_when_conversion_does_not_verify(
    plain: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(conversion, "LITERT_TOLERANCE", -1.0)  # nothing can verify
    with caplog.at_level(logging.WARNING):
        rt = create_runtime("auto", plain, cache_dir=tmp_path, threads=1)
    assert isinstance(rt, TensorFlowRuntime)
    # Said once TensorFlow has loaded it (service.loading), with why.
    reason = rt.fallback_reason or ""
    assert "no verified LiteRT artifact" in reason and "refusing" in caplog.text + reason
    folder = tmp_path / conversion.cache_key(plain)
    assert not (folder / conversion.ARTIFACT).exists()  # never kept, never served
    # The refusal is cached: a second worker does not convert again to learn the same.
    monkeypatch.setattr(conversion, "convert_saved_model", lambda _: pytest.fail("reconverted"))
    with pytest.raises(ModelLoadError, match="refusing"):
        LiteRTRuntime(plain, cache_dir=tmp_path).load()


def test_only_a_one_thread_litert_computes_on_the_caller(
    tf_rt: TensorFlowRuntime, shipped: Path, tmp_path: Path
) -> None:
    """What lets the batcher run short batches on the event loop (service.batching)."""
    assert LiteRTRuntime(shipped, cache_dir=tmp_path).computes_on_caller  # 0 = one thread
    assert LiteRTRuntime(shipped, cache_dir=tmp_path, threads=1).computes_on_caller
    assert not LiteRTRuntime(shipped, cache_dir=tmp_path, threads=2).computes_on_caller
    assert not tf_rt.computes_on_caller


def test_a_thread_that_loaded_and_warmed_litert_keeps_no_interpreters(
    shipped: Path, tmp_path: Path
) -> None:
    """prepare_runtime runs on a pool thread that never predicts again: its interpreters
    (packed weights, arenas) are freed once warm-up is done, and a later predict on the
    same thread still works (it makes them again)."""
    from service.loading import prepare_runtime

    prepared = prepare_runtime(LiteRTRuntime(shipped, cache_dir=tmp_path), shipped)
    rt = prepared.runtime
    assert isinstance(rt, LiteRTRuntime)
    assert getattr(rt._local, "interpreter", None) is None
    out = rt.predict(_images(2, seed=0))
    assert out.shape[0] == 2 and rt._local.interpreter is not None
    rt.leave_thread()
    assert getattr(rt._local, "interpreter", None) is None


def _damaged(data: bytes) -> bytes:
    """``data`` with 400 bytes in its middle set to 0xFF (a NaN as float32), same size:
    what a bad copy or disk leaves, and what the card's sizes cannot show."""
    middle = len(data) // 2
    return data[:middle] + b"\xff" * 400 + data[middle + 400 :]


def _card_without(folder: Path, *fields: str) -> None:
    """Drop ``fields`` from the card's litert record: a card written before them."""
    path = folder / "assets.extra" / "model_card.json"
    card = json.loads(path.read_text())
    for name in fields:
        del card["runtimes"]["litert"][name]
    path.write_text(json.dumps(card))


def test_export_records_the_digests_a_load_checks(shipped: Path) -> None:
    from service.runtimes.card import file_digest, variables_data_digest

    record = read_card(shipped)["runtimes"]["litert"]
    assert record["sha256"] == file_digest(shipped / "assets.extra" / "model.tflite")
    assert record["variables_data_sha256"] == variables_data_digest(shipped)


def test_a_damaged_artifact_is_refused_by_its_recorded_digest(
    shipped: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "61"
    shutil.copytree(shipped, folder)
    artifact = folder / "assets.extra" / "model.tflite"
    artifact.write_bytes(_damaged(artifact.read_bytes()))
    with pytest.raises(ModelLoadError, match=r"model\.tflite is not the artifact export verified"):
        LiteRTRuntime(folder, cache_dir=tmp_path / "cache").load()
    # auto serves the SavedModel instead (which is intact), with TensorFlow.
    rt = create_runtime("auto", folder, cache_dir=tmp_path / "cache", threads=1)
    assert isinstance(rt, TensorFlowRuntime)
    # Without the digest (older cards), a truncated artifact still differs in size.
    _card_without(folder, "sha256")
    artifact.write_bytes(_damaged(artifact.read_bytes())[:-100])
    with pytest.raises(ModelLoadError, match=r"model\.tflite is \d+ bytes, export wrote"):
        LiteRTRuntime(folder, cache_dir=tmp_path / "cache").load()


def test_non_finite_warm_up_answers_fail_the_load(shipped: Path, tmp_path: Path) -> None:
    """The safety net for what no record catches: a card without the artifact's digest
    beside a same-size damaged artifact loads, but answers NaN; warm-up refuses it."""
    from service.loading import prepare_version

    folder = tmp_path / "61"
    shutil.copytree(shipped, folder)
    _card_without(folder, "sha256")
    artifact = folder / "assets.extra" / "model.tflite"
    artifact.write_bytes(_damaged(artifact.read_bytes()))
    rt = LiteRTRuntime(folder, cache_dir=tmp_path / "cache")
    rt.load()  # nothing recorded shows the damage
    assert np.isnan(rt.predict(_images(1))).all()
    rt.unload()
    with pytest.raises(ModelLoadError, match="non-finite scores"):
        prepare_version(
            folder,
            runtime_factory=create_runtime,
            runtime_name="litert",
            cache_dir=tmp_path / "cache",
            threads=1,
        )


def test_a_damaged_data_shard_misses_the_conversion_cache(plain: Path, tmp_path: Path) -> None:
    """A version converted into the cache, whose shard is then overwritten, must not
    find its intact self's conversion there: the cache key covers the shards, and the
    conversion (TensorFlow restores every weight) refuses the damaged one."""
    folder = tmp_path / "1"
    shutil.copytree(plain, folder)
    key = conversion.cache_key(folder)
    LiteRTRuntime(folder, cache_dir=tmp_path / "cache").load()
    (shard,) = (folder / "variables").glob("variables.data-*")
    shard.write_bytes(_damaged(shard.read_bytes()))
    assert conversion.cache_key(folder) != key
    with pytest.raises(ModelLoadError, match=str(folder)):
        LiteRTRuntime(folder, cache_dir=tmp_path / "cache").load()


def test_files_changed_during_the_conversion_are_neither_cached_nor_served(
    plain: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder copied in while it was converted: the conversion was filed under the key
    of the files first read, and a later folder of those files (a truncated shard) was
    served what another state of the folder converted to (an outside review)."""
    folder = tmp_path / "1"
    shutil.copytree(plain, folder)
    (shard,) = (folder / "variables").glob("variables.data-*")
    intact = shard.read_bytes()
    shard.write_bytes(intact[: len(intact) // 2])  # the copy is still going on
    key = conversion.cache_key(folder)
    load = TensorFlowRuntime.load

    def copy_finishes_meanwhile(self: TensorFlowRuntime) -> Any:
        shard.write_bytes(intact)  # as the conversion starts reading
        return load(self)

    monkeypatch.setattr(TensorFlowRuntime, "load", copy_finishes_meanwhile)
    # Through the factory: no stand-in runtime reads the folder as it now is either.
    with pytest.raises(conversion.FilesChanged, match="changed while they were converted"):
        create_runtime("auto", folder, cache_dir=tmp_path / "cache", threads=1)
    assert not (tmp_path / "cache" / key).exists()
    monkeypatch.setattr(TensorFlowRuntime, "load", load)
    # Once the files stay put, the folder converts and serves as usual.
    runtime = create_runtime("auto", folder, cache_dir=tmp_path / "cache", threads=1)
    assert isinstance(runtime, LiteRTRuntime)

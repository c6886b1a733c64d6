"""TFRecord framing and CRC32C without TensorFlow, against files TensorFlow writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from service.tfrecord import TFRecordError, crc32c, masked_crc32c, read_records
from service.warmup import WarmupFormatError, warmup_inputs

RECORDS = [b"", b"x", b"hello warmup", bytes(range(256)) * 300]


def test_crc32c_check_values() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # RFC 3720's check value
    assert crc32c(b"") == 0
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros
    assert crc32c(b"\xff" * 32) == 0x62A8AB43  # ... and of ones


@pytest.fixture
def written(tmp_path: Path) -> Path:
    path = tmp_path / "records"
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in RECORDS:
            writer.write(record)
    return path


def test_reads_what_tensorflow_writes(written: Path) -> None:
    assert list(read_records(written)) == RECORDS
    # The masked CRC of the first header is TensorFlow's, byte for byte.
    data = written.read_bytes()
    assert int.from_bytes(data[8:12], "little") == masked_crc32c(data[:8])


def test_an_empty_file_has_no_records(tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    assert list(read_records(tmp_path / "empty")) == []


@pytest.mark.parametrize(
    ("where", "message"),
    [
        (3, "corrupted record length"),  # in the length
        (9, "corrupted record length"),  # in the length's CRC
        (16 + 17 + 12 + 3, "corrupted record at"),  # in the third record's data
        (16 + 17 + 12 + 12, "corrupted record at"),  # in its data's CRC
    ],
)
def test_a_flipped_byte_fails_its_crc(written: Path, where: int, message: str) -> None:
    data = bytearray(written.read_bytes())
    data[where] ^= 0x01
    written.write_bytes(bytes(data))
    with pytest.raises(TFRecordError, match=message):
        list(read_records(written))


@pytest.mark.parametrize("cut", [1, 5, 13])
def test_a_truncated_file_fails(written: Path, cut: int) -> None:
    written.write_bytes(written.read_bytes()[:-cut])
    with pytest.raises(TFRecordError, match="truncated"):
        list(read_records(written))


def test_warmup_records_decode_as_tensorflow_does() -> None:
    """The committed model's warmup file: same records and tensors as TensorFlow reads."""
    from tensorflow_serving.apis import prediction_log_pb2

    path = Path(__file__).parents[2] / "model_repository/fashion_mnist/1/assets.extra"
    path = path / "tf_serving_warmup_requests"
    expected = []
    for raw in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
        request = prediction_log_pb2.PredictionLog.FromString(raw).predict_log.request
        if request.model_spec.signature_name in ("", "serving_default"):
            expected.append({k: tf.make_ndarray(v) for k, v in request.inputs.items()})
    got = warmup_inputs(path)
    assert len(got) == len(expected) > 0
    for ours, theirs in zip(got, expected, strict=True):
        assert ours.keys() == theirs.keys()
        for name in ours:
            assert ours[name].dtype == theirs[name].dtype
            np.testing.assert_array_equal(ours[name], theirs[name])


def test_a_record_that_is_not_a_prediction_log_is_a_format_error(tmp_path: Path) -> None:
    path = tmp_path / "tf_serving_warmup_requests"
    with tf.io.TFRecordWriter(str(path)) as writer:
        writer.write(b"\xff\xff\xff")  # not a protobuf message
    with pytest.raises(WarmupFormatError):
        warmup_inputs(path)

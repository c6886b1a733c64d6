"""TF Serving warmup records (``assets.extra/tf_serving_warmup_requests``).

The file is a TFRecord of ``tensorflow.serving.PredictionLog`` messages, read with
TensorFlow's own record reader (which checks the CRCs) and TF Serving's protos, so a
file TF Serving refuses is refused here too. TensorFlow is already imported by every
worker (signature metadata and the serving protos need it), so there is nothing to
save by decoding the wire format by hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy.typing as npt
import tensorflow as tf
from google.protobuf.message import DecodeError
from tensorflow_serving.apis import prediction_log_pb2

from service.contract import SERVING_SIGNATURE


class WarmupFormatError(ValueError):
    """A warmup file that is not a TFRecord of PredictionLog (TF Serving refuses it too)."""


def warmup_inputs(path: Path) -> list[dict[str, npt.NDArray[Any]]]:
    """The named inputs of each serving_default predict request in a warmup file.

    Other signatures (the bytes one) and log types are skipped: the runtime replays only
    serving_default. A missing file means no records.
    """
    if not path.is_file():
        return []
    requests: list[dict[str, npt.NDArray[Any]]] = []
    try:
        for record in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
            log = prediction_log_pb2.PredictionLog.FromString(record)
            if log.WhichOneof("log_type") != "predict_log":
                continue
            request = log.predict_log.request
            if (request.model_spec.signature_name or SERVING_SIGNATURE) != SERVING_SIGNATURE:
                continue
            requests.append({name: tf.make_ndarray(t) for name, t in request.inputs.items()})
    except (tf.errors.OpError, DecodeError, TypeError, ValueError) as exc:
        raise WarmupFormatError(f"{path}: {exc}") from None
    return requests

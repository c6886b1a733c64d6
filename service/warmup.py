"""TF Serving warmup records (``assets.extra/tf_serving_warmup_requests``).

The file is a TFRecord of ``tensorflow.serving.PredictionLog`` messages, read with
:mod:`service.tfrecord` (which checks the CRCs as TensorFlow's reader does) and TF
Serving's protos, so a file TF Serving refuses is refused here too. No TensorFlow: a
worker serving a LiteRT artifact never imports it (the protos are service.proto_gen's
TF-free copies, the tensors are decoded by :mod:`service.tfserving_proto`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy.typing as npt
from google.protobuf.message import DecodeError

from service.contract import SERVING_SIGNATURE
from service.errors import InvalidRequest
from service.proto_gen.tensorflow_serving.apis import prediction_log_pb2
from service.tfrecord import TFRecordError, read_records
from service.tfserving_proto import to_ndarray


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
        for record in read_records(path):
            log = prediction_log_pb2.PredictionLog.FromString(record)
            if log.WhichOneof("log_type") != "predict_log":
                continue
            request = log.predict_log.request
            if (request.model_spec.signature_name or SERVING_SIGNATURE) != SERVING_SIGNATURE:
                continue
            requests.append({name: to_ndarray(t, name) for name, t in request.inputs.items()})
    except (TFRecordError, DecodeError, InvalidRequest) as exc:
        raise WarmupFormatError(f"{path}: {exc}") from None
    return requests

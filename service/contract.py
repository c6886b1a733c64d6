"""The model contract every published version follows, named once.

A version's SavedModel has the ``serving_default`` signature (input ``image``, uint8
[N, H, W, 3]; output ``probabilities``, float32 [N, classes]) and, when cnnserve exported
it, ``predict_image_bytes`` (input ``image_bytes``: encoded files, so TF Serving's REST
``{"b64": ...}`` works). Training writes these names, every runtime and API reads them.
"""

from __future__ import annotations

from typing import Final

SERVING_SIGNATURE: Final = "serving_default"
BYTES_SIGNATURE: Final = "predict_image_bytes"
INPUT_NAME: Final = "image"
BYTES_INPUT_NAME: Final = "image_bytes"  # TF Serving REST decodes {"b64": ...} for *_bytes
OUTPUT_NAME: Final = "probabilities"
# The version labels the default route and the traffic split know (TF Serving's
# conventional names): unlabelled requests go to `stable`, a canary share to `canary`.
STABLE_LABEL: Final = "stable"
CANARY_LABEL: Final = "canary"

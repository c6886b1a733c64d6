"""Coverage-guided fuzzing of image decoding with atheris (libFuzzer), for `make fuzz`.

Run: .venv/bin/python tests/reliability/fuzz_decode.py -max_total_time=120
Any exception other than our 400/413 errors, or a crash, is a finding (libFuzzer writes
the input as crash-*). Not collected by pytest; the hypothesis tests beside it run in CI.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from service.errors import CnnserveError
    from service.preprocessing import PreprocessSpec, preprocess_bytes

SPEC = PreprocessSpec()


def one_input(data: bytes) -> None:
    try:
        image = preprocess_bytes(data, SPEC, max_pixels=4_000_000)
    except CnnserveError as exc:
        if exc.http_status not in (400, 413):
            raise
        return
    assert image.shape == (224, 224, 3), image.shape


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()

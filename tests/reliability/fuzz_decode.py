"""Coverage-guided fuzzing of image decoding with atheris (libFuzzer), for `make fuzz`.

Run: .venv/bin/python tests/reliability/fuzz_decode.py CORPUS_DIR -max_total_time=120
Any exception other than our 400/413 errors, or a crash, is a finding (libFuzzer writes
the input as crash-*). Not collected by pytest; the hypothesis tests beside it run in CI.

An empty CORPUS_DIR is first seeded with small valid images in every format the gateway
accepts (and their awkward variants): from random bytes alone libFuzzer never got past
the format sniffing (coverage flat for 500,000 runs). Pillow's Python plugins are
instrumented with our modules, so its parsers' branches guide the mutations too.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from PIL import (
        BmpImagePlugin,  # noqa: F401  (instrumented: Image.open imports them lazily)
        GifImagePlugin,  # noqa: F401
        Image,
        ImageFile,  # noqa: F401
        ImageOps,  # noqa: F401
        JpegImagePlugin,  # noqa: F401
        PngImagePlugin,  # noqa: F401
        TiffImagePlugin,  # noqa: F401
        WebPImagePlugin,  # noqa: F401
    )

    from service.errors import CnnserveError
    from service.preprocessing import PreprocessSpec, preprocess_bytes

SPEC = PreprocessSpec()


def seeds() -> dict[str, bytes]:
    """Small valid images: each accepted format, plus the variants decoding treats apart
    (progressive and CMYK JPEG, EXIF rotation, palette/alpha/16-bit PNG, animated GIF,
    multi-page TIFF)."""
    import numpy as np

    y, x = np.mgrid[0:24, 0:32]
    rgb = Image.fromarray(np.stack([x * 8, y * 10, (x + y) * 4], axis=-1).astype(np.uint8))

    def saved(img: Image.Image, fmt: str, **options: object) -> bytes:
        out = io.BytesIO()
        img.save(out, fmt, **options)
        return out.getvalue()

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate
    frames = [rgb.rotate(angle) for angle in (0, 90, 180)]
    return {
        "plain.jpg": saved(rgb, "JPEG", quality=90),
        "progressive.jpg": saved(rgb, "JPEG", progressive=True),
        "cmyk.jpg": saved(rgb.convert("CMYK"), "JPEG"),
        "gray.jpg": saved(rgb.convert("L"), "JPEG"),
        "rotated.jpg": saved(rgb, "JPEG", exif=exif.tobytes()),
        "rgb.png": saved(rgb, "PNG"),
        "rgba.png": saved(rgb.convert("RGBA"), "PNG"),
        "palette.png": saved(rgb.convert("P"), "PNG"),
        "16bit.png": saved(rgb.convert("I;16"), "PNG"),
        "animated.gif": saved(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "rgb.bmp": saved(rgb, "BMP"),
        "pages.tiff": saved(frames[0], "TIFF", save_all=True, append_images=frames[1:]),
        "lossy.webp": saved(rgb, "WEBP"),
        "lossless.webp": saved(rgb.convert("RGBA"), "WEBP", lossless=True),
    }


def one_input(data: bytes) -> None:
    try:
        image = preprocess_bytes(data, SPEC, max_pixels=4_000_000)
    except CnnserveError as exc:
        if exc.http_status not in (400, 413):
            raise
        return
    assert image.shape == (224, 224, 3), image.shape


def seed_corpus(argv: list[str]) -> None:
    folders = [Path(arg) for arg in argv[1:] if not arg.startswith("-")]
    if folders and not any(folders[0].glob("*")):
        folders[0].mkdir(parents=True, exist_ok=True)
        for name, data in seeds().items():
            one_input(data)  # every seed must decode: a broken seed fuzzes nothing
            (folders[0] / name).write_bytes(data)


if __name__ == "__main__":
    seed_corpus(sys.argv)
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()

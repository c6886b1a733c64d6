from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from service.errors import ImageTooLarge, InvalidImage
from service.preprocessing import PreprocessSpec, preprocess_array, preprocess_bytes
from tests.helpers.images import encode, gradient

SPEC = PreprocessSpec()
BIG = 10**9


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"])
def test_every_supported_format_becomes_rgb_224(fmt: str) -> None:
    out = preprocess_bytes(encode(gradient(), fmt), SPEC, max_pixels=BIG)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    # The gradient survives: red grows left to right, green top to bottom.
    assert out[112, 200, 0] > out[112, 20, 0] + 100
    assert out[200, 112, 1] > out[20, 112, 1] + 100


def test_lossless_input_equals_the_array_path() -> None:
    img = gradient()
    from_bytes = preprocess_bytes(encode(img, "PNG"), SPEC, max_pixels=BIG)
    from_array = preprocess_array(np.asarray(img), SPEC)
    np.testing.assert_array_equal(from_bytes, from_array)


def test_greyscale_shortcut_equals_resizing_rgb() -> None:
    grey = Image.fromarray(np.random.default_rng(1).integers(0, 256, (28, 28), np.uint8), "L")
    via_grey = preprocess_bytes(encode(grey, "PNG"), SPEC, max_pixels=BIG)
    via_rgb = preprocess_bytes(encode(grey.convert("RGB"), "PNG"), SPEC, max_pixels=BIG)
    np.testing.assert_array_equal(via_grey, via_rgb)


def test_sixteen_bit_png_keeps_its_range() -> None:
    arr = np.full((20, 20), 65535, np.uint16)
    arr[:, :10] = 0
    out = preprocess_bytes(encode(Image.fromarray(arr), "PNG"), SPEC, max_pixels=BIG)
    assert out[:, -20:].min() == 255 and out[:, :20].max() == 0


def test_alpha_is_composited_on_white() -> None:
    transparent = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    out = preprocess_bytes(encode(transparent, "PNG"), SPEC, max_pixels=BIG)
    assert (out == 255).all()


def test_palette_with_transparency() -> None:
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0] * 256)
    out = preprocess_bytes(encode(img, "GIF", transparency=0), SPEC, max_pixels=BIG)
    assert (out == 255).all()


def test_cmyk_jpeg() -> None:
    out = preprocess_bytes(
        encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"), SPEC, max_pixels=BIG
    )
    red = out.reshape(-1, 3).mean(axis=0)
    assert red[0] > 200 and red[1] < 60 and red[2] < 60


def test_exif_orientation_is_applied() -> None:
    img = gradient(64, 32)  # landscape; orientation 6 = rotate 90° clockwise on display
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = preprocess_bytes(encode(img, "JPEG", exif=exif, quality=95), SPEC, max_pixels=BIG)
    plain = preprocess_bytes(encode(img, "JPEG", quality=95), SPEC, max_pixels=BIG)
    # After a clockwise turn the original left edge (low red) is at the top.
    assert rotated[10, 112, 0] < rotated[214, 112, 0] - 100
    assert abs(int(plain[10, 112, 0]) - int(plain[214, 112, 0])) < 30


def test_large_jpeg_decodes_at_reduced_scale_with_same_result_shape() -> None:
    big = gradient(1920, 1080)
    out = preprocess_bytes(encode(big, "JPEG"), SPEC, max_pixels=BIG)
    assert out.shape == (224, 224, 3)


def test_pixel_limit_is_checked_before_decoding() -> None:
    data = encode(Image.new("L", (3000, 3000)), "PNG")
    with pytest.raises(ImageTooLarge, match="9000000 pixels"):
        preprocess_bytes(data, SPEC, max_pixels=1_000_000)


@pytest.mark.parametrize("data", [b"", b"not an image at all", encode(gradient(), "PNG")[:60]])
def test_garbage_is_a_clear_invalid_image(data: bytes) -> None:
    with pytest.raises(InvalidImage) as info:
        preprocess_bytes(data, SPEC, max_pixels=BIG)
    assert info.value.http_status == 400
    assert "JPEG" in info.value.message or "decode" in info.value.message


def test_unsupported_format_is_refused() -> None:
    with pytest.raises(InvalidImage):
        preprocess_bytes(encode(gradient(), "PPM"), SPEC, max_pixels=BIG)


def test_resize_method_comes_from_the_spec() -> None:
    arr = np.random.default_rng(2).integers(0, 256, (28, 28), np.uint8)
    nearest = preprocess_array(arr, PreprocessSpec(resize_method="nearest"))
    bilinear = preprocess_array(arr, PreprocessSpec(resize_method="bilinear"))
    # Nearest replicates each source pixel into an 8x8 block exactly.
    np.testing.assert_array_equal(nearest[::8, ::8, 0], arr)
    assert not np.array_equal(nearest, bilinear)


def test_spec_round_trips_through_the_card() -> None:
    spec = PreprocessSpec(height=96, width=128, resize_method="bicubic")
    assert PreprocessSpec.from_card(spec.to_card()) == spec
    with pytest.raises(ValueError, match="resize_method"):
        PreprocessSpec.from_card({"resize_method": "magic"})


@pytest.mark.parametrize("shape", [(28, 28, 2), (2, 2, 2, 2)])
def test_bad_arrays_are_refused(shape: tuple[int, ...]) -> None:
    with pytest.raises(InvalidImage):
        preprocess_array(np.zeros(shape, np.uint8), SPEC)

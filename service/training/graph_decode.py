"""The in-graph decoder of the SavedModel's ``predict_image_bytes`` signature: what a TF
Serving runs for clients that send it encoded files (the gateway decodes with
:mod:`service.preprocessing` instead).

It follows the gateway's preprocessing where TF's ops can: EXIF orientation applied (a
JPEG's, PNG's or WebP's, read from the bytes in the graph), transparency (a PNG's alpha
channel or tRNS colour, a WebP's alpha) composited on white, and the resize method the
model card records. Without them a phone photo (EXIF orientation 6) or a cut-out on a
transparent background reached the model turned or on the colour its transparent pixels
happen to hold, and TF Serving answered another class than the gateway for the same
bytes. What it cannot follow is in docs/serving.md.
"""

from __future__ import annotations

import tensorflow as tf

from service.preprocessing import PNG_SIGNATURE, PreprocessSpec

# tf.image.resize's method for each of the card's (Pillow's) resize methods.
_TF_RESIZE = {
    "nearest": "nearest",
    "bilinear": "bilinear",
    "bicubic": "bicubic",
    "lanczos": "lanczos3",
    "box": "area",
}
# The blocks (JPEG segments, PNG or WebP chunks) walked to find the EXIF: writers put it
# among the first few.
_MAX_BLOCKS = 64
_MAX_IFD_ENTRIES = 256
_ORIENTATION_TAG = 0x0112


def decode_for_model(data: tf.Tensor, spec: PreprocessSpec) -> tf.Tensor:
    """One encoded image (a scalar string) → uint8 ``[height, width, 3]``."""
    rgba = _decode_rgba(data)
    alpha = tf.cast(rgba[:, :, 3:], tf.float32) / 255.0
    rgb = tf.cast(rgba[:, :, :3], tf.float32) * alpha + 255.0 * (1.0 - alpha)
    rgb = _oriented(rgb, exif_orientation(data))
    method = _TF_RESIZE[spec.resize_method]
    resized = tf.image.resize(
        rgb, (spec.height, spec.width), method=method, antialias=method != "nearest"
    )
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def _decode_rgba(data: tf.Tensor) -> tf.Tensor:
    """uint8 [H, W, 4]: alpha where the file has transparency, else 255."""
    head = tf.strings.substr(data, 0, 16)
    is_png = tf.equal(tf.strings.substr(head, 0, 8), PNG_SIGNATURE)
    is_webp = tf.logical_and(
        tf.equal(tf.strings.substr(head, 0, 4), b"RIFF"),
        tf.equal(tf.strings.substr(head, 8, 4), b"WEBP"),
    )

    def opaque(rgb: tf.Tensor) -> tf.Tensor:
        alpha = tf.fill(tf.concat([tf.shape(rgb)[:2], [1]], 0), tf.constant(255, tf.uint8))
        return tf.concat([rgb, alpha], 2)

    def png() -> tf.Tensor:
        # Asking libpng for 4 channels turns a tRNS colour into alpha too.
        return tf.io.decode_png(data, channels=4)

    def as_rgb() -> tf.Tensor:
        # JPEG has no alpha; a BMP's 4th byte is mostly padding (Pillow ignores it too);
        # TF's GIF decoder gives no transparency.
        return opaque(tf.io.decode_image(data, channels=3, expand_animations=False))

    def webp() -> tf.Tensor:
        img = tf.io.decode_image(data, channels=0, expand_animations=False)
        return tf.cond(
            tf.equal(tf.shape(img)[2], 4),
            lambda: tf.ensure_shape(img, [None, None, None]),
            lambda: opaque(img[:, :, :3]),
        )

    # TF 2.21 corrupts its heap decoding an animated WebP with channels=0 (the process
    # dies: a TF Serving with it); with 3 it refuses the file ("must be 4 channel").
    flags = tf.io.decode_raw(tf.strings.substr(data, 20, 1), tf.uint8)
    animated = tf.logical_and(
        tf.equal(tf.strings.substr(head, 12, 4), b"VP8X"),
        tf.not_equal(tf.bitwise.bitwise_and(tf.reduce_sum(tf.cast(flags, tf.int32)), 0x02), 0),
    )
    still_webp = tf.logical_and(is_webp, tf.logical_not(animated))
    rgba = tf.case([(is_png, png), (still_webp, webp)], default=as_rgb)
    return tf.ensure_shape(rgba, [None, None, 4])


def exif_orientation(data: tf.Tensor) -> tf.Tensor:
    """The EXIF orientation (int32 1-8) of a JPEG (APP1), PNG (eXIf before the image data)
    or WebP (EXIF chunk); 1 when it has none or it is out of range."""
    raw = tf.io.decode_raw(data, tf.uint8)
    size = tf.size(raw)
    padded = tf.concat([raw, [0]], 0)  # gathered from even when empty

    def byte(i: tf.Tensor) -> tf.Tensor:
        value = tf.cast(tf.gather(padded, tf.clip_by_value(i, 0, size)), tf.int32)
        return tf.where(tf.logical_and(i >= 0, i < size), value, -1)

    def matches(i: tf.Tensor, text: bytes) -> tf.Tensor:
        return tf.reduce_all(
            tf.equal(tf.stack([byte(i + k) for k in range(len(text))]), list(text))
        )

    def big_endian(i: tf.Tensor, count: int) -> tf.Tensor:
        value = tf.constant(0)
        for k in range(count):
            value = value * 256 + byte(i + k)
        return value

    # Each container's walk: from a block at i, (the next block, where the TIFF header of
    # its EXIF starts or -1, whether to stop).
    def jpeg_step(i: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        marker, kind, length = byte(i), byte(i + 1), big_endian(i + 2, 2)
        is_exif = tf.logical_and(tf.equal(kind, 0xE1), matches(i + 4, b"Exif\0\0"))
        ends = tf.reduce_any([tf.not_equal(marker, 0xFF), tf.equal(kind, 0xDA), length < 2])
        return i + 2 + length, tf.where(is_exif, i + 10, -1), tf.logical_or(ends, is_exif)

    def png_step(i: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        length, is_exif = big_endian(i, 4), matches(i + 4, b"eXIf")
        ends = tf.reduce_any([matches(i + 4, b"IDAT"), matches(i + 4, b"IEND"), length < 0])
        return i + 12 + length, tf.where(is_exif, i + 8, -1), tf.logical_or(ends, is_exif)

    def webp_step(i: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        length = byte(i + 4) + byte(i + 5) * 256 + byte(i + 6) * 65536 + byte(i + 7) * 16777216
        is_exif = matches(i, b"EXIF")
        # Some writers start the chunk with JPEG's "Exif\0\0" too.
        tiff = tf.where(matches(i + 8, b"Exif\0\0"), i + 14, i + 8)
        ends = tf.logical_or(length < 0, byte(i) < 0)
        return (
            i + 8 + length + length % 2,
            tf.where(is_exif, tiff, -1),
            tf.logical_or(ends, is_exif),
        )

    container = tf.case(
        [
            (matches(0, b"\xff\xd8"), lambda: tf.constant(0)),
            (matches(0, PNG_SIGNATURE), lambda: tf.constant(1)),
            (tf.logical_and(matches(0, b"RIFF"), matches(8, b"WEBP")), lambda: tf.constant(2)),
        ],
        default=lambda: tf.constant(-1),
    )
    start = tf.gather([2, 8, 12], tf.maximum(container, 0))

    def step(
        i: tf.Tensor, found: tf.Tensor, done: tf.Tensor, n: tf.Tensor
    ) -> tuple[tf.Tensor, ...]:
        following, tiff, stop = tf.switch_case(
            container, [lambda: jpeg_step(i), lambda: png_step(i), lambda: webp_step(i)]
        )
        return following, tiff, stop, n + 1

    _, tiff, _, _ = tf.while_loop(
        lambda i, found, done, n: tf.logical_and(tf.logical_not(done), n < _MAX_BLOCKS),
        step,
        (start, tf.constant(-1), container < 0, tf.constant(0)),
    )
    little = tf.logical_and(tf.equal(byte(tiff), 0x49), tf.equal(byte(tiff + 1), 0x49))

    def u16(p: tf.Tensor) -> tf.Tensor:
        return tf.where(little, byte(p) + byte(p + 1) * 256, byte(p) * 256 + byte(p + 1))

    def u32(p: tf.Tensor) -> tf.Tensor:
        return tf.where(little, u16(p) + u16(p + 2) * 65536, u16(p) * 65536 + u16(p + 2))

    ifd = tiff + u32(tiff + 4)
    entries = tf.minimum(u16(ifd), _MAX_IFD_ENTRIES)

    def entry_step(k: tf.Tensor, value: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        entry = ifd + 2 + 12 * k
        value = tf.where(tf.equal(u16(entry), _ORIENTATION_TAG), u16(entry + 8), value)
        return k + 1, value

    _, value = tf.while_loop(
        lambda k, value: tf.logical_and(tiff >= 0, k < entries),
        entry_step,
        (tf.constant(0), tf.constant(1)),
    )
    return tf.where(tf.logical_and(value >= 1, value <= 8), value, 1)


def _oriented(img: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
    """``img`` turned as EXIF ``orientation`` says (Pillow's ImageOps.exif_transpose)."""

    def transpose() -> tf.Tensor:
        return tf.transpose(img, [1, 0, 2])

    branches = [
        lambda: img,  # 1
        lambda: tf.reverse(img, [1]),  # 2: mirrored
        lambda: tf.reverse(img, [0, 1]),  # 3: upside down
        lambda: tf.reverse(img, [0]),  # 4: mirrored upside down
        transpose,  # 5
        lambda: tf.reverse(transpose(), [1]),  # 6: turned 90° clockwise to show
        lambda: tf.reverse(transpose(), [0, 1]),  # 7
        lambda: tf.reverse(transpose(), [0]),  # 8: turned 90° counter-clockwise
    ]
    return tf.switch_case(orientation - 1, branches)

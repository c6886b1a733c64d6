"""Images in, model input out: the one place images are decoded and resized.

Training and serving both call :func:`preprocess_bytes` / :func:`preprocess_array`, so a
model sees at serving time exactly the pixels it was trained on. The output is always
RGB uint8 ``[height, width, 3]``; normalization lives inside the model graph.
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, TiffImagePlugin, UnidentifiedImageError

from service import libtiff
from service.errors import ImageTooLarge, InvalidImage
from service.image_walks import check_gif, check_tiff
from service.jpeg import (
    MAX_LAYOUT_SEGMENTS,
    MAX_PHOTOSHOP_BLOCKS,
    MAX_QUANT_TABLES,
    MAX_SCANS,
    SMALL_SEGMENT,
    Layout,
    PlainJpeg,
    is_jpeg,
    open_plain,
    read_layout,
)

ResizeMethod = Literal["nearest", "bilinear", "bicubic", "lanczos", "box"]

_RESAMPLE: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}

# Pillow warns, on stderr, about what a client's file holds: corrupt EXIF, truncated
# reads, images over its own decompression-bomb threshold (ours is checked once the
# header is read; Pillow's refusal is only a backstop, at twice Image.MAX_IMAGE_PIXELS).
# A client could fill the log with them. Filtered once for the process, not around
# each decode: catch_warnings changes the filters of every thread, and decoding runs on
# several.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL(\.|$)")
# libtiff writes its own complaints about a file (a strip without an end code, a bad
# fax code word: dozens a file) straight to stderr, past Python's warnings; and Pillow's
# TIFF reader logs an absurd samples-per-pixel value at ERROR before refusing the file
# (its other plugins log only at DEBUG, what each chunk of a file holds).
libtiff.silence()
logging.getLogger("PIL").setLevel(logging.CRITICAL)

# Pillow's own exceptions for a bad file say what is wrong with it in words a client can
# act on. Its plugins raise any other kind too on a hostile one (TypeError for a tag of
# the wrong type, OverflowError, IndexError, KeyError, struct.error, ZeroDivisionError):
# Python's words for a reader that tripped over the file, still the file's fault.
# What Pillow raises when a codec returns a status and nothing else (ImageFile's
# _get_oserror: its ERRORS table, or the bare number).
_CODEC_STATUS = re.compile(
    r"(?:de|en)coder error -?[0-9]+|decoding error|unknown error|"
    r"image buffer overrun error|bad configuration"
)
_WORDED = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)

# Pillow format names we accept, and the words a person reads in an error.
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
SUPPORTED_MEDIA_TYPES = frozenset(
    {
        "image/jpeg",
        "image/jpg",
        "image/pjpeg",
        "image/png",
        "image/webp",
        "image/bmp",
        "image/x-ms-bmp",
        "image/gif",
        "image/tiff",
    }
)
SUPPORTED_HUMAN = "JPEG, PNG, WebP, BMP, GIF or TIFF"
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF
_GIF_SIGNATURES = (b"GIF87a", b"GIF89a")  # what Pillow's GIF plugin takes

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Pillow reads a PNG's chunks one by one in Python (~2.5 µs each): those before the
# image data when its header is read (on the event loop), the rest when it is decoded
# (up to IEND, or an APNG's next frame). A 10 MB file of 874,000 empty chunks held the
# loop for 2.5 s. Encoders write a handful of chunks before IDAT and split the data into
# IDATs of 4-64 KiB (FFmpeg 4 KiB, libpng 8 KiB): only chunks under SMALL_PNG_CHUNK
# bytes count towards MAX_PNG_CHUNKS, so a large PNG (35 MB over gRPC: 4,328 IDATs) is
# never refused for its size, and neither is a long APNG (whose later frames Pillow
# never reads), while a file of tiny chunks is.
MAX_PNG_HEADER_CHUNKS = 256
MAX_PNG_CHUNKS = 4096
SMALL_PNG_CHUNK = 1024
# Decoding cost of a progressive JPEG: each scan passes over the full-resolution
# coefficients, and an encoder's ~10 scans cost about one full-resolution decode.
_TYPICAL_SCANS = 10
_MOST_REDUCTION = 64  # JPEG's 1/8 scale: the most pixels one decoded pixel stands for
# An uncompressed TIFF's strip or tile, decoded by Pillow in Python (~2.5 µs), as pixels
# of a decode (~8 ns each: 150,000 pixels of PNG take ~1.2 ms), rounded up.
_PIXELS_PER_TILE = 1024

UInt8Image = npt.NDArray[np.uint8]
# What :func:`open_image` returns: a header read, pixels not yet decoded.
Opened = Image.Image | PlainJpeg


@dataclass(frozen=True)
class PreprocessSpec:
    """How an image becomes model input; recorded verbatim in model_card.json."""

    height: int = 224
    width: int = 224
    resize_method: ResizeMethod = "bilinear"
    # The whole image is resized to height×width (no crop, aspect ratio not kept), so
    # nothing at the borders is lost; Fashion-MNIST and most product photos are square.
    aspect: Literal["stretch"] = "stretch"
    color: Literal["RGB"] = "RGB"
    library: str = "Pillow"

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), Pillow's order."""
        return self.width, self.height

    def to_card(self) -> dict[str, Any]:
        card = asdict(self)
        card["alpha"] = "composited on white"
        card["exif_orientation"] = "applied"
        card["output"] = f"uint8 [{self.height},{self.width},3]"
        return card

    @classmethod
    def from_card(cls, card: dict[str, Any]) -> PreprocessSpec:
        method = card.get("resize_method", "bilinear")
        if method not in _RESAMPLE:
            raise ValueError(f"unknown resize_method {method!r}; one of {sorted(_RESAMPLE)}")
        # What the gateway does not do, a card may not ask for: served anyway, a model
        # trained on CMYK or cropped images would get stretched RGB ones.
        for key, done in (("aspect", "stretch"), ("color", "RGB")):
            if card.get(key, done) != done:
                raise ValueError(f"{key} {card[key]!r}: images are preprocessed with {done!r}")
        return cls(
            height=int(card.get("height", 224)),
            width=int(card.get("width", 224)),
            resize_method=method,
        )


def open_image(
    data: bytes,
    *,
    max_pixels: int,
    target: tuple[int, int] | None = None,
    limit_name: str = "",
) -> Opened:
    """Read an image's header, refusing bombs before any pixel is decoded;
    :func:`preprocess_opened` decodes it. Cheap (no pixels), so it can run where the
    request arrives; the result's ``size`` is then what decoding will produce, i.e. its
    cost.

    ``target`` (width, height) lets JPEG decode at a reduced DCT scale that is still
    at least the target size, which makes large photos several times cheaper. A plain
    JPEG comes back as a :class:`~service.jpeg.PlainJpeg` (decoded without Pillow, to
    the same pixels), anything else as a Pillow image.
    """
    plain = None
    if is_jpeg(data):
        plain = open_plain(data, target, _jpeg_layout(data))
    elif data.startswith(PNG_SIGNATURE):
        _check_png_chunks(data)
    elif data[:4] in _TIFF_MAGIC:
        check_tiff(data)
    elif data.startswith(b"BM"):
        _check_bmp_width(data)
    elif data.startswith(_GIF_SIGNATURES):
        check_gif(data)
    if plain is not None and plain.full_size[0] * plain.full_size[1] <= max_pixels:
        return plain
    return _open_with_pillow(data, max_pixels=max_pixels, target=target, limit_name=limit_name)


def _jpeg_layout(data: bytes) -> Layout:
    """The JPEG's layout, refused when no encoder would have written it."""
    layout = read_layout(data)
    if layout.scans > MAX_SCANS:
        raise InvalidImage(
            f"the JPEG has more than {MAX_SCANS} scans (an encoder writes 1 to ~20), which "
            "would take seconds to decode; re-save it as a baseline or ordinary progressive JPEG"
        )
    if layout.segments > MAX_LAYOUT_SEGMENTS:
        raise InvalidImage(
            f"the JPEG has more than {MAX_LAYOUT_SEGMENTS} marker segments of under "
            f"{SMALL_SEGMENT} bytes (an encoder writes under 50); re-save it with an "
            "ordinary encoder"
        )
    if layout.photoshop_blocks > MAX_PHOTOSHOP_BLOCKS:
        raise InvalidImage(
            f"the JPEG has more than {MAX_PHOTOSHOP_BLOCKS} Photoshop resource blocks before "
            "its image data (Photoshop writes tens); re-save it with an ordinary encoder"
        )
    if layout.tables > MAX_QUANT_TABLES:
        raise InvalidImage(
            f"the JPEG defines more than {MAX_QUANT_TABLES} quantization tables before its "
            "image data (an encoder writes 1 to 4); re-save it with an ordinary encoder"
        )
    return layout


def _check_bmp_width(data: bytes) -> None:
    """A BMP whose info header (40 bytes or more) declares a width of 0 or less: the
    field is signed, and Pillow reads it unsigned, so -5 was refused 413 as an image of
    4,294,967,291 columns, where the file is malformed. (A negative height is a
    top-down image, valid.)"""
    if len(data) >= 22 and int.from_bytes(data[14:18], "little") >= 40:
        width = int.from_bytes(data[18:22], "little", signed=True)
        if width <= 0:
            raise InvalidImage(f"the BMP declares a width of {width}; re-save it")


def _check_png_chunks(data: bytes) -> None:
    """Refuse a PNG of more chunks than MAX_PNG_HEADER_CHUNKS before its image data, or
    of more than MAX_PNG_CHUNKS small ones among those Pillow reads (a walk of chunk
    headers); anything else wrong with it is Pillow's to find."""
    i, end, chunks, small, in_header = len(PNG_SIGNATURE), len(data), 0, 0, True
    while i + 8 <= end:
        chunks += 1
        length = int.from_bytes(data[i : i + 4], "big")
        kind = data[i + 4 : i + 8]
        if kind == b"IEND" or (kind == b"fcTL" and not in_header):
            return  # the end, or an APNG's next frame: Pillow reads no further
        in_header = in_header and kind != b"IDAT"
        small += length < SMALL_PNG_CHUNK
        if in_header and chunks > MAX_PNG_HEADER_CHUNKS:
            raise InvalidImage(
                f"the PNG has more than {MAX_PNG_HEADER_CHUNKS} chunks before its image "
                "data (an encoder writes a handful); re-save it with an ordinary encoder"
            )
        if small > MAX_PNG_CHUNKS:
            raise InvalidImage(
                f"the PNG has more than {MAX_PNG_CHUNKS} chunks of under {SMALL_PNG_CHUNK} "
                "bytes (encoders write image data in chunks of 4 KiB or more); re-save it "
                "with an ordinary encoder"
            )
        i += 12 + length  # length, type, data, CRC


def decode_cost(opened: Opened) -> int:
    """What decoding ``opened`` costs, in pixels of a baseline decode: the pixels it
    decodes to, except for a progressive JPEG, whose every scan passes over the
    full-resolution image whatever its reduced scale. Decides where it is decoded
    (service.dataplane), not whether."""
    width, height = opened.size
    if isinstance(opened, PlainJpeg):
        if not opened.layout.progressive:
            return width * height
        full_width, full_height = opened.full_size
        scans = opened.layout.scans
        return max(width * height, full_width * full_height * scans // _TYPICAL_SCANS)
    if opened.format == "JPEG" and opened.info.get("progressive"):
        # Pillow's draft hides the full size and the scans were not kept: the most they
        # can be (a 1/8 scale, MAX_SCANS), i.e. decoded on the threads unless tiny.
        return width * height * _MOST_REDUCTION * MAX_SCANS // _TYPICAL_SCANS
    return max(width * height, _tiled_pixels(opened), _strips_cost(opened))


def request_cost(data: bytes, opened: Opened) -> int:
    """What an image counts against a request's pixel limit: the pixels it decodes to (a
    tiled TIFF's whole tiles), and for a progressive JPEG every scan past an encoder's
    usual ten over its full size, which each scan passes whatever the reduced scale.
    Ordinary photos count as before (a 10-scan one, its reduced size); 62 crafted ones of
    64 scans over 6300x6300 in 10 MB, ~230 s of CPU, were counted at their 1/8 scale."""
    width, height = opened.size
    cost = width * height
    if isinstance(opened, Image.Image):
        cost = max(cost, _tiled_pixels(opened))
    if not is_jpeg(data):
        return cost
    # A plain JPEG keeps the layout open_image read; Pillow's does not (read again).
    layout = opened.layout if isinstance(opened, PlainJpeg) else read_layout(data)
    if not layout.progressive or layout.scans <= _TYPICAL_SCANS:
        return cost
    if isinstance(opened, PlainJpeg):
        full_width, full_height = opened.full_size
    else:  # Pillow's draft decodes at 1/scale: its size is the full one over that
        config = getattr(opened, "decoderconfig", None)
        scale = config[0] if config else 1
        full_width, full_height = width * scale, height * scale
    extra = layout.scans - _TYPICAL_SCANS
    return cost + full_width * full_height * extra // _TYPICAL_SCANS


def _open_with_pillow(
    data: bytes, *, max_pixels: int, target: tuple[int, int] | None, limit_name: str = ""
) -> Image.Image:
    # The limit as the client is told it: with the setting that sets it, when one does.
    limit = f"{max_pixels} ({limit_name})" if limit_name else str(max_pixels)
    if not data:
        raise InvalidImage("the image is empty (0 bytes); send a JPEG, PNG, WebP, BMP, GIF or TIFF")
    try:
        img = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except Image.DecompressionBombError:
        # Pillow's own threshold (twice Image.MAX_IMAGE_PIXELS) means nothing to a client.
        raise ImageTooLarge(
            f"image has far more pixels than the limit of {limit}; send it smaller"
        ) from None
    except UnidentifiedImageError:
        if data[:4] in _TIFF_MAGIC:  # a TIFF all right: its layout is what Pillow lacks
            raise InvalidImage(
                "could not decode the TIFF: it is corrupt, or its layout (samples per "
                "pixel, bits, sample format) is not one the decoder reads, e.g. 16-bit grey "
                "with alpha; re-save it as 8-bit RGB(A) or grey, or as PNG"
            ) from None
        raise InvalidImage(
            f"could not decode the image: not a {SUPPORTED_HUMAN} file (or it is corrupt)"
        ) from None
    except MemoryError:
        raise  # the server's trouble, not the file's
    except Exception as exc:
        raise _unreadable(exc, "could not decode the image") from None
    width, height = img.size
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"image is {width}x{height} = {width * height} pixels; the limit is {limit}"
        )
    if width == 0 or height == 0:
        raise InvalidImage("the image has no pixels")
    tiled = _tiled_pixels(img)
    if tiled > max_pixels:
        raise ImageTooLarge(
            f"the TIFF's tiles hold {tiled} pixels to decode for its {width}x{height}; the "
            f"limit is {limit}: re-save it untiled or with ordinary tiles (256x256)"
        )
    if target is not None and img.format == "JPEG":
        img.draft("RGB", target)
    _scale_grey_key(img)
    return img


# Pillow scales a 2- or 4-bit greyscale PNG's samples to 0..255 (x85, x17) but keeps its
# tRNS key at the file's depth: a 2-bit file's key 1 named no pixel instead of grey 85.
_LOW_BIT_GREY_SCALE = {"L;2": 85, "L;4": 17}


def _scale_grey_key(img: Image.Image) -> None:
    key, tiles = img.info.get("transparency"), getattr(img, "tile", None)  # before load
    if img.format != "PNG" or not isinstance(key, int) or not tiles:
        return
    scale = _LOW_BIT_GREY_SCALE.get(str(tiles[0].args))  # the samples' raw mode
    if scale is not None:
        img.info["transparency"] = key * scale


def _strips_cost(img: Image.Image) -> int:
    """What decoding an uncompressed TIFF's strips or tiles costs beyond its pixels: Pillow
    decodes each in Python (2.3-2.7 µs: a 33 KB file of 8,192 one-row strips, 8,192
    pixels, took 22 ms to decode after its 8 ms open), counted as _PIXELS_PER_TILE each,
    so that a file of more than ~150 is decoded on the decode threads. A compressed TIFF
    is one tile, given to libtiff whole."""
    tiles = getattr(img, "tile", None) or ()  # an ImageFile's, before it is decoded
    return len(tiles) * _PIXELS_PER_TILE if img.format == "TIFF" else 0


def _tiled_pixels(img: Image.Image) -> int:
    """The pixels a tiled TIFF's tiles hold (libtiff decodes whole tiles, and allocates
    one whole: a 158-byte file of 64x64 pixels in a 16384x16384 tile took 1 GB and a
    second on the event loop, its header counted 4,096 pixels); 0 for other images."""
    tags = getattr(img, "tag_v2", None)  # a TIFF's tags
    if tags is None:
        return 0
    tile_width = _first(tags.get(TiffImagePlugin.TILEWIDTH))
    tile_length = _first(tags.get(TiffImagePlugin.TILELENGTH))
    if not tile_width or not tile_length or tile_width < 0 or tile_length < 0:
        return 0
    width, height = img.size
    tiles = -(-width // tile_width) * -(-height // tile_length)
    return tiles * tile_width * tile_length


def load(img: Image.Image) -> Image.Image:
    """Decode the pixels of an image from :func:`open_image`."""
    try:
        img.load()
    except MemoryError:
        raise
    except Exception as exc:  # Image.DecompressionBombError (a frame past the header's) too
        error = _unreadable(exc, "could not decode the image")
    else:
        return img
    # Raised out here, the client's error does not carry Pillow's: its traceback holds
    # the decoder, which holds the half-decoded pixels for as long as the error lives.
    raise error


def _unreadable(exc: Exception, failed: str) -> InvalidImage:
    """The client's error for what Pillow raised on its file, ``failed`` saying at what.

    Used only around Pillow's calls on a client's bytes, where whatever it raises is the
    file's doing; a blanket ``except`` higher up would answer the server's own bugs with
    a 400. MemoryError is not the file's: callers re-raise it before calling this."""
    if isinstance(exc, OSError) and _CODEC_STATUS.fullmatch(str(exc)):
        # Pillow's codec status alone ("decoder error -2") says neither what is wrong
        # nor what to do: libtiff's garbage LZW or deflate data, an unknown compression.
        return InvalidImage(
            f"{failed}: its pixel data is corrupt or compressed in a way the decoder does "
            f"not read ({exc}); re-save it as PNG or JPEG"
        )
    if isinstance(exc, _WORDED):
        # Pillow's words say what broke ("Truncated File Read"), not what to do.
        return InvalidImage(
            f"{failed}: {exc}; the file is cut off or corrupt: send it whole, or re-save it"
        )
    return InvalidImage(
        f"{failed}: the file is malformed ({type(exc).__name__}: {exc}); "
        "re-save it with an ordinary encoder"
    )


def decode(data: bytes, *, max_pixels: int, target: tuple[int, int] | None = None) -> Image.Image:
    """Encoded bytes → a decoded Pillow image (header, then pixels)."""
    return load(_open_with_pillow(data, max_pixels=max_pixels, target=target))


def to_rgb(img: Image.Image, fit: tuple[int, int] | None = None) -> Image.Image:
    """Any Pillow mode to RGB (or L, which :func:`resize` turns into RGB for a third of
    the cost): EXIF orientation applied, alpha composited on white. With ``fit`` (the
    size it will be resized to), an image with alpha may come out smaller, but still
    :data:`SHRINK_GAP` times that size or more (see :func:`_shrunk`)."""
    # Some files decode but cannot be converted (a palette PNG whose tRNS has more
    # entries than its PLTE: "palette index out of range"; EXIF that exif_transpose
    # trips over): still the client's file.
    try:
        return _to_rgb(img, fit)
    except (MemoryError, InvalidImage):
        raise
    except Exception as exc:
        error = _unreadable(exc, "could not convert the image to RGB")
    raise error  # out here: not carrying Pillow's traceback and its images (see load)


def _to_rgb(img: Image.Image, fit: tuple[int, int] | None) -> Image.Image:
    # In place: without an orientation tag there is nothing to do, and the default
    # (a copy of every image) cost ~3% of a worker's CPU under load.
    ImageOps.exif_transpose(img, in_place=True)
    mode = img.mode
    if mode in _WIDE_GREY:
        img = _wide_grey(img)
        mode = img.mode
    elif mode == "L" and _sample_type(img) == (8, True):
        # A TIFF of int8 samples: Pillow reads their bytes as unsigned, so -5 was 251,
        # near white, where an int16's -5 is black.
        img = Image.fromarray(_top_byte(np.asarray(img).view(np.int8), 8, True), "L")
    elif mode in ("1", "L", "RGB") and "transparency" in img.info:
        # A PNG's tRNS chunk keys one colour transparent: the same picture as one with an
        # alpha channel, so composited on white like it (Pillow's conversion honours it).
        img = img.convert("RGBA" if mode == "RGB" else "LA")
        mode = img.mode
    if mode in ("RGB", "L"):
        return img
    if mode == "F":
        # 32-bit float greyscale (TIFF): 0..1, as float images mostly are, or 0..255
        # (convert() clips to 0..255, and made a 0..1 image black); NaN is black. -inf
        # too: left at float32's lowest, the x255 below overflowed (a numpy warning on
        # the server's stderr for a client's file).
        values = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        if values.size and values.max() <= 1.0:
            values = values * 255.0
        return Image.fromarray(np.clip(values + 0.5, 0, 255).astype(np.uint8), "L")
    if mode == "P":
        if img.palette is None:  # a PNG of palette indices without its PLTE chunk
            raise InvalidImage(
                "the image is a palette image without its palette (a PNG needs a PLTE "
                "chunk before its data); re-save it with an ordinary encoder"
            )
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode == "La":
        img = img.convert("LA")  # Pillow converts grey with associated alpha to LA only
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        if mode not in ("RGBA", "LA"):
            img = img.convert("RGBA")
        rgba = _shrunk(img, fit).convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


# Compositing on white took four full-size copies of an image with alpha (RGBA, the
# background, the composite, its RGB): a 34-byte lossless WebP of 6000x6000 cost a
# worker +964 MB, two of them in one request ~2 GB (an outside audit; the gateway's pod
# may take 2 GiB). Shrunk first along each side by a whole factor while it stays this
# many times the size it is resized to on that side (Pillow's reduce: a box filter on
# premultiplied alpha, so the composite is the same picture), the copies are small:
# +554 MB for that WebP, nearly all of it Pillow's WebP decoder (decoding alone peaks
# there); +305 MB for a 16-bit RGBA PNG of 6300x6300 (+757 before). Pillow calls a gap
# of 3 or more "indistinguishable" from resizing the full image (Image.resize's
# reducing_gap).
SHRINK_GAP = 3


def _shrunk(img: Image.Image, fit: tuple[int, int] | None) -> Image.Image:
    """``img`` ("RGBA" or "LA", its orientation applied) reduced along each side by the
    largest whole factor that keeps it at least SHRINK_GAP times ``fit`` (width,
    height) on that side: it is stretched to ``fit`` whatever its shape (one factor for
    both sides left a 36000x1000 image whole: +549 MB)."""
    if fit is None:
        return img
    across = max(1, img.width // (SHRINK_GAP * fit[0]))
    down = max(1, img.height // (SHRINK_GAP * fit[1]))
    return img.reduce((across, down)) if across > 1 or down > 1 else img


# Pillow's modes for greyscale wider than 8 bits: "I" (signed 32-bit) holds every TIFF
# of 32-bit or signed 16-bit samples, "I;16*" unsigned 16-bit (or 12-bit) ones.
_WIDE_GREY = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
_SIGNED_INTEGER = 2  # TIFF SampleFormat: 1 unsigned integer, 2 signed, 3 float
_PHOTOMETRIC, _MIN_IS_WHITE = 262, 0  # TIFF PhotometricInterpretation: 0 WhiteIsZero


def _wide_grey(img: Image.Image) -> Image.Image:
    """A 16/32-bit greyscale image → "RGB" of its samples' top 8 bits, or "LA" when a
    PNG's tRNS chunk keys one 16-bit value transparent."""
    samples = np.asarray(img)
    top = _top_byte(samples, *_sample_type(img))
    if _min_is_white(img):
        top = 255 - top  # Pillow inverts an 8-bit "white is zero" TIFF, not a wider one
    grey = Image.fromarray(top, "L")
    key = img.info.get("transparency")
    if not isinstance(key, int):
        return grey.convert("RGB")
    # Compared at 16 bits: Pillow's own conversion to "LA" would clip the grey at 255.
    alpha = Image.fromarray(np.where(samples == key, 0, 255).astype(np.uint8), "L")
    return Image.merge("LA", (grey, alpha))


def _sample_type(img: Image.Image) -> tuple[int, bool]:
    """(bits, signed) of a greyscale image's samples as its file stores them, which
    Pillow's mode does not say: "I" is a TIFF's int16, int32 or uint32 alike, "L" its
    uint8 and int8."""
    tags = getattr(img, "tag_v2", None)  # a TIFF's tags
    if tags is not None:
        bits = _first(tags.get(TiffImagePlugin.BITSPERSAMPLE))
        sample_format = _first(tags.get(TiffImagePlugin.SAMPLEFORMAT))
        if bits is not None:
            return bits, sample_format == _SIGNED_INTEGER
    if img.mode == "L":
        return 8, False
    if img.mode.startswith("I;16"):
        return 16, False  # a PNG's 16-bit greyscale: unsigned, always
    return 32, True  # what Pillow's "I" is


def _min_is_white(img: Image.Image) -> bool:
    """A TIFF whose PhotometricInterpretation says 0 is white (a scanner's, a fax's)."""
    tags = getattr(img, "tag_v2", None)
    return tags is not None and _first(tags.get(_PHOTOMETRIC)) == _MIN_IS_WHITE


def _first(value: Any) -> int | None:
    """A TIFF tag's first value: Pillow gives a tuple for one value per sample."""
    if isinstance(value, tuple):
        value = value[0] if value else None
    return value if isinstance(value, int) else None


def _top_byte(samples: npt.NDArray[Any], bits: int, signed: bool) -> UInt8Image:
    """The top 8 bits of ``bits``-bit samples, decided by their type, not their values: a
    32-bit image whose brightest pixel is 255 is near black, as a viewer shows it."""
    if signed:
        samples = np.maximum(samples, 0)  # below zero is below black
    elif samples.dtype == np.int32:
        samples = samples.view(np.uint32)  # Pillow's "I" holds uint32's top half as negative
    shift = bits - 8 - int(signed)  # a signed sample's top bit is its sign
    if shift < 0:  # int8: 7 bits of magnitude, widened to 8
        samples = samples.astype(np.int16) << -shift
        shift = 0
    top: UInt8Image = np.minimum(samples >> shift, 255).astype(np.uint8)
    return top


def resize(img: Image.Image, spec: PreprocessSpec) -> UInt8Image:
    """Any decoded image → RGB uint8 [H, W, 3] of the spec's size."""
    size = (spec.width, spec.height)
    # Not before a nearest-neighbour resize, which picks pixels and averages none (as
    # Pillow's own reducing_gap leaves it alone): shrinking by averaging first changed
    # the picture by up to 245 levels.
    img = to_rgb(img, fit=None if spec.resize_method == "nearest" else size)
    if img.mode == "L":
        # Resizing one channel then replicating equals resizing the replicated RGB image
        # (Pillow filters channels independently) and costs a third.
        grey = img if img.size == size else img.resize(size, _RESAMPLE[spec.resize_method])
        # Pillow's merge, not numpy's repeat (a byte at a time on the last axis): 224x224,
        # 41 against 85 µs an image (the default model's Fashion-MNIST input is grey).
        return np.asarray(Image.merge("RGB", (grey, grey, grey)), dtype=np.uint8)
    if img.size != size:
        img = img.resize(size, _RESAMPLE[spec.resize_method])
    return np.asarray(img, dtype=np.uint8)


def preprocess_bytes(data: bytes, spec: PreprocessSpec, *, max_pixels: int) -> UInt8Image:
    """Encoded image bytes → RGB uint8 [H, W, 3] as the model expects."""
    return preprocess_opened(open_image(data, max_pixels=max_pixels, target=spec.size), spec)


def preprocess_opened(opened: Opened, spec: PreprocessSpec) -> UInt8Image:
    """An image from :func:`open_image` (opened with ``target=spec.size``) → model input.
    A Pillow image is closed after, whatever happened: its decoded pixels go at once. A
    failed decode's traceback keeps the image's frame, and on a decode thread that
    traceback sits in a reference cycle (future, exception, the awaiting frame), which
    only the cycle collector frees: four truncated 5000x5000 PNGs in one request kept
    344 MB after their 400, a few small TIFFs declaring huge tiles a gigabyte each."""
    if isinstance(opened, PlainJpeg):
        pixels = opened.decode()
        if pixels is None:  # libjpeg-turbo objected: Pillow's leniency or its error
            return preprocess_opened(_pillow_fallback(opened, spec), spec)
        if pixels.ndim == 3 and pixels.shape[:2] == (spec.height, spec.width):
            return pixels  # already the model's input: no round trip through Pillow
        return resize(Image.fromarray(pixels), spec)  # grey → "L", [H, W, 3] → "RGB"
    try:
        return resize(load(opened), spec)
    finally:
        opened.close()


def _pillow_fallback(opened: PlainJpeg, spec: PreprocessSpec) -> Image.Image:
    width, height = opened.full_size
    return _open_with_pillow(opened.data, max_pixels=width * height, target=spec.size)


def preprocess_array(array: npt.NDArray[Any], spec: PreprocessSpec) -> UInt8Image:
    """A decoded uint8 array (H×W grey, H×W×1, H×W×3 or H×W×4) → model input."""
    arr = np.asarray(array)
    if arr.dtype != np.uint8:
        raise InvalidImage(f"pixel arrays must be uint8, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        return resize(Image.fromarray(arr, "L"), spec)
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        return resize(Image.fromarray(arr, "RGB" if arr.shape[2] == 3 else "RGBA"), spec)
    raise InvalidImage(f"pixel arrays must be HxW, HxWx1, HxWx3 or HxWx4, got {arr.shape}")

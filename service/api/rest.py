"""REST adapter: parse HTTP, call the data plane, serialise. No inference logic here."""

from __future__ import annotations

import asyncio
import codecs
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import BeforeValidator
from python_multipart.multipart import parse_options_header
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from service import metrics
from service.api.http import (
    JSON,
    LARGE_JSON_BYTES,
    base64_hint,
    check_room,
    client_key,
    dataplane,
    decode_base64,
    encoded_response,
    read_json,
    request_deadline,
)
from service.api.json_turns import json_turn
from service.api.schemas import ClassifyResponse, Health, Readiness
from service.dataplane import ClassifyResult
from service.errors import InvalidRequest, TooManyImages, UnsupportedMediaType, bounded
from service.preprocessing import SUPPORTED_HUMAN, SUPPORTED_MEDIA_TYPES
from service.repository import version_number

log = logging.getLogger(__name__)
router = APIRouter()
CLASSIFY_PATH = "/v1/classify"

CLASSIFY_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "One image as multipart field `image` (repeat the field for several), "
        "a raw body with an image/* content type, or JSON with base64 `image` / `images`.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "image": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                    "required": ["image"],
                }
            },
            **{
                f"image/{kind}": {"schema": {"type": "string", "format": "binary"}}
                for kind in ("jpeg", "png", "webp", "bmp", "gif", "tiff")
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "image": {"type": "string", "format": "byte"},
                        "images": {"type": "array", "items": {"type": "string", "format": "byte"}},
                    },
                }
            },
        },
    }
}


CLASSIFY_PARAMS = frozenset({"top_k", "model", "version", "label"})


def digits_only(value: Any) -> Any:
    """A query integer as written: digits, nothing else. Python's int() and pydantic took
    "1_0" as 10 and "1.0" as 1, so a typo still ran against some version."""
    text = str(value)
    if not (text.isascii() and text.isdigit()):
        shown = bounded(repr(text), 40)
        raise ValueError(f"must be a whole number written with digits 0-9, no sign, got {shown}")
    if version_number(text) is None:  # past int64, as a path's version (path_version)
        raise ValueError(f"must be a whole number within int64, got {bounded(text, 40)}")
    return value


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise InvalidRequest(f"{what} must be a base64 string")
    try:
        return decode_base64(value)
    except ValueError:  # binascii.Error is one
        raise InvalidRequest(f"{what} is not valid base64: {base64_hint(value)}") from None


def parses_body(content_type: str | bytes | None) -> bool:
    """Whether :func:`read_images` parses a body of ``content_type`` before it knows the
    images: JSON, or multipart with a boundary (without one it is a 400 before the body
    is read). A type the route refuses (415) is refused before its body is read; a raw
    image is not parsed."""
    kind, params = parse_options_header(content_type)
    return kind == b"application/json" or (
        kind == b"multipart/form-data" and bool(params.get(b"boundary"))
    )


async def read_images(request: Request) -> tuple[list[bytes], bool, list[str | None]]:
    """The images of a /v1/classify request, whatever the encoding, whether the client
    sent a list (answered with `results`) rather than one image, and multipart file names
    (for error messages that say which image was bad)."""
    sent = request.headers.getlist("content-type")
    if len(sent) > 1:
        # Which one counted would depend on the parser (the direct path and Starlette
        # took the first): two lines of image/png and image/jpeg were answered 200.
        raise InvalidRequest(
            f"the request has {len(sent)} Content-Type headers; send one, the body's type"
        )
    content_type = (sent[0] if sent else "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        plane = dataplane(request)
        limit = plane.settings.max_images_per_request
        try:
            # An image sent without a filename is a field, held in memory whole, and
            # Starlette refuses fields over 1 MiB: held to the body's own limit instead.
            form = await request.form(
                max_files=limit,
                max_fields=limit,
                max_part_size=plane.settings.max_body_bytes,
            )
            # The whole body, read for the room check (service.api.http.check_room), is
            # not held while the request waits for its answer: its parts are.
            vars(request).pop("_body", None)
        except HTTPException as exc:  # Starlette's words for python-multipart's refusal
            if str(exc.detail).startswith("Too many"):
                raise TooManyImages(
                    f"more than {limit} files or fields in one request; the limit is {limit} "
                    "images (CNNSERVE_MAX_IMAGES_PER_REQUEST)"
                ) from None
            raise InvalidRequest(
                f"the multipart body cannot be read ({exc.detail}); send multipart/form-data "
                "with the boundary its Content-Type names, the file in field 'image'"
            ) from None
        except UnicodeError as exc:  # a charset Python knows but cannot decode with
            # ("undefined"): Starlette falls back to latin-1 from two errors, not this one
            raise InvalidRequest(
                f"the multipart body's charset cannot decode its fields ({exc}); send "
                "charset=utf-8, or none"
            ) from None
        if extra := sorted(set(form.keys()) - {"image"}):
            # -F model=other was answered by the default model, ignored in silence, where
            # the same word in the JSON body or as an unknown query parameter is a 400
            await form.close()
            raise InvalidRequest(
                f"unknown field {extra[0]!r} in the multipart body, which takes 'image' "
                "(repeated for several); give model, version, label and top_k as query "
                "parameters"
            )
        files = form.getlist("image")
        if not files:
            raise InvalidRequest(
                "multipart request has no complete 'image' field; send the file as field "
                "'image', and end the body with the closing boundary (--BOUNDARY--)"
            )
        plane.check_image_count(len(files))
        charset = _form_charset(request)
        images = [
            await item.read() if isinstance(item, UploadFile) else _field_bytes(item, charset)
            for item in files
        ]
        names = [item.filename if isinstance(item, UploadFile) else None for item in files]
        return images, len(images) > 1, names
    if content_type == "application/json":
        _few_containers(await request.body())
        async with json_turn(request):  # a large body parses in its turn (json_turns)
            return _json_images(request, await read_json(request))
    if content_type in SUPPORTED_MEDIA_TYPES or content_type == "application/octet-stream":
        return [await request.body()], False, []
    if content_type:
        shown = f"unsupported content type '{content_type}'"
    elif sent and sent[0].strip():  # ";;;===": a header that names no media type
        shown = f"the Content-Type header {bounded(repr(sent[0].strip()), 100)} names no media type"
    else:
        shown = "the request has no Content-Type header"
    raise UnsupportedMediaType(
        f"{shown}; send an image ({SUPPORTED_HUMAN}) as the raw "
        "body with its image/* type, as multipart field 'image', or base64 in JSON"
    )


# A classify body is one object and at most one list ({"images": [...]}); base64 has no
# brackets. More than this many is no classify body, whatever it holds.
MAX_JSON_CONTAINERS = 16


def _few_containers(body: bytes) -> None:
    """Refuse, before parsing, a JSON body of more arrays and objects than a classify body
    has: json's parser holds the GIL, and a 6 MB body of two million empty lists stopped
    the worker's event loop (probes too) for ~1 s to parse what is refused anyway. Two
    byte counts (~1 ms for 10 MB) over the whole body, strings included: a bound, not a
    parse."""
    if len(body) <= LARGE_JSON_BYTES:
        return  # parsed in microseconds: its own errors say more
    containers = body.count(b"[") + body.count(b"{")
    if containers > MAX_JSON_CONTAINERS:
        raise InvalidRequest(
            f"the JSON body holds {containers} arrays and objects (brackets); /v1/classify "
            'takes {"image": "<base64>"} or {"images": ["<base64>", ...]}: send the '
            "images as encoded files in base64, or pixel arrays to :predict"
        )


def _json_images(request: Request, body: Any) -> tuple[list[bytes], bool, list[str | None]]:
    """A JSON body's images: {"image": "<base64>"} or {"images": ["<base64>", ...]}."""
    fields = set(body) if isinstance(body, dict) else set()
    if fields & {"image", "images"} and (extra := sorted(fields - {"image", "images"})):
        # {"image": ..., "model": "other"} was answered by the default model
        raise InvalidRequest(
            f"unknown field {extra[0]!r} in the JSON body, which takes 'image' or "
            "'images'; give model, version, label and top_k as query parameters"
        )
    if isinstance(body, dict) and "image" in body and "images" in body:
        raise InvalidRequest("send either 'image' (one) or 'images' (a list), not both")
    if isinstance(body, dict) and "image" in body:
        return [_b64(body["image"], "'image'")], False, []
    if isinstance(body, dict) and isinstance(body.get("images"), list):
        dataplane(request).check_image_count(len(body["images"]))  # before base64
        return [_b64(v, f"'images[{i}]'") for i, v in enumerate(body["images"])], True, []
    raise InvalidRequest('JSON body needs "image": "<base64>" or "images": ["<base64>", ...]')


def _form_charset(request: Request) -> str:
    """The codec Starlette decodes multipart fields with (MultiPartParser.parse): the
    Content-Type's charset, UTF-8 when it names none, latin-1 when Python knows no such
    codec."""
    _, params = parse_options_header(request.headers.get("content-type"))
    try:
        return codecs.lookup(params.get(b"charset", b"utf-8").decode("latin-1")).name
    except LookupError:
        return "latin-1"


def _field_bytes(text: str, charset: str) -> bytes:
    """The bytes of an 'image' part sent without a filename (curl's ``-F image=<f.png``),
    which Starlette hands over as text: decoded in ``charset`` when they are valid in it,
    else as latin-1, whose characters 0-255 are the bytes themselves. The inverse, so an
    image is classified as it would be with a filename."""
    try:
        raw = text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode(charset)  # a character over 255: only the charset made it
    try:
        from_charset = raw.decode(charset)
    except (UnicodeError, LookupError):  # LookupError: a codec not for text
        # Not valid in the charset, so what Starlette decoded as latin-1: every image
        # (a PNG starts with 0x89, a JPEG with 0xFF, neither valid UTF-8). A UTF-8 text
        # of characters 128-255 alone reads the same; it is no image either way.
        return raw
    # Valid in the charset: had these been the bytes, Starlette would have decoded them
    # so; if that is not the text it gave, the charset made the text.
    return raw if from_charset == text else text.encode(charset)


def classify_response(result: ClassifyResult, *, several: bool) -> Response:
    """The answer to /v1/classify (the route's and the fast path's): ``results`` when the
    client sent a list, else ``predictions``."""
    return encoded_response(result.model, result.timings, lambda: _classify_body(result, several))


def _classify_body(result: ClassifyResult, several: bool) -> ClassifyResponse:
    # Validated from plain data in one call into pydantic-core: cheaper than a model
    # instance per prediction.
    rows = [[p._asdict() for p in preds] for preds in result.results]
    body: dict[str, Any] = {"model": result.model, "version": result.version}
    if several:
        body["results"] = [{"predictions": r} for r in rows]
    else:
        body["predictions"] = rows[0]
    return ClassifyResponse.model_validate(body)


@router.post(
    CLASSIFY_PATH,
    tags=["classify"],
    openapi_extra=CLASSIFY_BODY,
    response_model=ClassifyResponse,
    response_model_exclude_none=True,
)
async def classify(
    request: Request,
    top_k: Annotated[
        int | None,
        BeforeValidator(digits_only),
        Query(description="classes to return, 1..classes (default 5 or fewer)"),
    ] = None,
    model: Annotated[
        str | None, Query(description="model name; default: first in models.config")
    ] = None,
    version: Annotated[
        int | None, BeforeValidator(digits_only), Query(description="a served version number")
    ] = None,
    label: Annotated[
        str | None, Query(description="a version label such as stable or canary")
    ] = None,
) -> Response:
    """Classify one image (answer `predictions`) or several (answer `results`).

    A raw image body with plain query values is answered by service.api.direct_classify
    (or, when that leaves it, service.api.fastpath), the same way."""
    unknown = sorted(set(request.query_params) - CLASSIFY_PARAMS)
    if unknown:  # "?versoin=2" answered by the default version, silently
        raise InvalidRequest(
            f"unknown query parameter {unknown[0]!r}; /v1/classify takes "
            f"{', '.join(sorted(CLASSIFY_PARAMS))}"
        )
    _once_each(request.query_params.multi_items())
    plane = dataplane(request)
    deadline = request_deadline(plane, request)
    await check_room(
        request,
        model,
        version,
        label,
        deadline,
        parses=parses_body(request.headers.get("content-type")),
    )
    images, several, names = await read_images(request)
    result = await plane.classify(
        images,
        model=model,
        version=version,
        label=label,
        k=top_k,
        deadline=deadline,
        names=names,
        client_key=client_key(request),
    )
    return classify_response(result, several=several)


def _once_each(items: list[tuple[str, str]]) -> None:
    """Each parameter with one value: "?top_k=1&top_k=3" was answered with the last,
    where a proxy or a cache in front may read the first (a repeated header is a 400
    too). The same value twice is no ambiguity."""
    values: dict[str, set[str]] = {}
    for key, value in items:
        values.setdefault(key, set()).add(value)
    for key, given in values.items():
        if len(given) > 1:
            raise InvalidRequest(
                f"query parameter {key!r} is given {len(given)} different values; give one"
            )


@router.get("/healthz", tags=["health"], response_model=Health)
async def healthz() -> Health:
    """The process is alive (it may still be loading models)."""
    return Health(status="alive")


@router.get(
    "/readyz",
    tags=["health"],
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "not ready yet: still loading"}},
)
async def readyz(request: Request) -> Response:
    """200 only when every configured model has an AVAILABLE, warmed version."""
    ready = dataplane(request).ready()
    body = Readiness(ready=ready).model_dump_json()
    return Response(body, status_code=200 if ready else 503, media_type=JSON)


async def prometheus_metrics() -> Response:
    """Prometheus exposition of every worker process's metrics (path: CNNSERVE_METRICS_PATH)."""
    metrics.TURN.flush()  # this worker's latest refusals
    body, content_type = await asyncio.to_thread(metrics.render)
    return Response(body, media_type=content_type)

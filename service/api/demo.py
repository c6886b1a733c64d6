"""The demo page: try a served model in a browser before writing a client.

``GET /`` serves one small page (HTML, CSS and JavaScript from ``service/api/static/``;
no build step, nothing from another origin, so it works offline). The page classifies
through the public ``POST /v1/classify`` and reads the stage latencies from its
``Server-Timing`` header; what else it shows comes from the read-only routes below,
views of what the registry serves:

    GET /demo/models                                      models, versions, labels, links
    GET /demo/models/{m}/versions/{v}/card                model_card.json + its PNGs' names
    GET /demo/models/{m}/versions/{v}/assets/{name}.png   a PNG of the version's assets.extra
    GET /demo/models/{m}/versions/{v}/samples             sample images (service.samples)
    GET /demo/models/{m}/versions/{v}/samples/{i}.png

Assets are served by name from a listing of the version's ``assets.extra`` folder (plain
PNG files only, links skipped), never by joining a client's path, so nothing outside
it can be reached. The page sends ``Authorization: Bearer <key>`` on every request
once a key is entered, so it keeps working when API keys guard these routes.
``CNNSERVE_DEMO_PAGE=false`` leaves the router out: ``GET /`` answers 404.

The page's own files and ``GET /demo/models`` are answered outside the concurrency limit
(service.api.http.is_limited), so the page opens on a loaded worker; its other routes
count against it.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.api.http import dataplane, path_version
from service.errors import BackendUnavailable, ModelNotReady, NotFound
from service.repository import ASSETS_EXTRA
from service.routing import LoadedVersion, VersionState, listing
from service.runtimes.card import FLOAT_PRECISION
from service.samples import Sample, samples_for

log = logging.getLogger(__name__)
router = APIRouter(tags=["demo"])

STATIC = Path(__file__).parent / "static"
PAGE_FILES = {"demo.css": "text/css", "demo.js": "text/javascript"}
# Everything from this origin; blob: for previews and fetched images; no inline script.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}


@functools.cache
def _page_file(name: str) -> tuple[bytes, str]:
    """A file of the page and its ETag, read once: these routes are answered outside the
    concurrency limit (service.api.http.is_limited), so from memory, on the event loop,
    as a model's status is (read on a thread each time, each load took a thread's turn)."""
    content = (STATIC / name).read_bytes()
    return content, f'"{hashlib.blake2b(content, digest_size=8).hexdigest()}"'


def _revalidated(request: Request, name: str, media_type: str, **headers: str) -> Response:
    """The page's file ``name`` with an ETag, or 304 when the client already has it:
    no-cache makes the browser ask each time, and without a validator it downloaded the
    file each time."""
    content, etag = _page_file(name)
    headers = {**PAGE_HEADERS, **headers, "ETag": etag}
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(content, media_type=media_type, headers=headers)


@router.get("/", include_in_schema=False)
async def page(request: Request) -> Response:
    """The demo page (HTML); its script and style sheet are under /demo/static/."""
    return _revalidated(
        request,
        "index.html",
        "text/html",
        **{"Content-Security-Policy": CONTENT_SECURITY_POLICY},
    )


@router.get("/demo/static/{name}", include_in_schema=False)
async def static_file(request: Request, name: str) -> Response:
    if name not in PAGE_FILES:
        raise NotFound(f"no demo page file {name!r}; the page is at /")
    return _revalidated(request, name, PAGE_FILES[name])


@router.get("/demo/models")
async def models(request: Request) -> dict[str, Any]:
    """Every configured model with its AVAILABLE versions and the labels that point at
    them; the page's links (API docs, metrics)."""
    plane = dataplane(request)
    registry = plane.registry
    names = registry.model_names()
    if not names:
        raise ModelNotReady("the model repository has not been read yet; retry shortly")
    listed = []
    for name in names:
        try:
            statuses = registry.statuses(name)
        except BackendUnavailable:  # its TF Serving cannot be reached: nothing to serve
            statuses = []
        versions = sorted(s.version for s in statuses if s.state == VersionState.AVAILABLE)
        labels = {k: v for k, v in sorted(registry.labels_of(name).items()) if v in versions}
        listed.append({"name": name, "versions": versions, "labels": labels})
    return {
        "default_model": registry.default_model,
        "models": listed,
        "links": {
            "docs": request.app.state.docs_url,
            "metrics": plane.settings.metrics_path or None,
        },
    }


@router.get("/demo/models/{model}/versions/{version}/card")
async def model_card(request: Request, model: str, version: str) -> dict[str, Any]:
    """The version's model_card.json ({} when it has none) and the names of the PNGs
    in its assets.extra (confusion matrix, training curves)."""
    target = _served(request, model, version)
    images = await asyncio.to_thread(asset_images, target.path)
    # Which artifact answers, so nobody has to guess whether int8 or a fallback serves.
    serving = {
        "runtime": target.runtime.name,
        "precision": target.runtime.info.extra.get("precision", FLOAT_PRECISION),
    }
    return {
        "model": target.model,
        "version": target.version,
        "card": target.card,
        "images": images,
        "serving": serving,
    }


@router.get("/demo/models/{model}/versions/{version}/assets/{name}")
async def asset(request: Request, model: str, version: str, name: str) -> Response:
    """One PNG of the version's assets.extra, by its name in the folder's listing."""
    target = _served(request, model, version)
    images = await asyncio.to_thread(asset_images, target.path)
    if name not in images:
        raise NotFound(
            f"version {target.version} of model {target.model!r} has no image {name!r} in "
            f"{ASSETS_EXTRA}; images: {listing(images)}"
        )
    path = target.path / ASSETS_EXTRA / name
    try:
        # Read before answering: FileResponse sent its 200 and length, then met the
        # unreadable file (a traceback, and a connection closed on an empty body).
        data = await asyncio.to_thread(path.read_bytes)
    except OSError as exc:
        log.warning("cannot read %s: %s", path, exc.strerror or exc)
        raise NotFound(
            f"version {target.version} of model {target.model!r}: its image {name!r} cannot "
            "be read on the server (its log says why)"
        ) from None
    return Response(data, media_type="image/png")


@router.get("/demo/models/{model}/versions/{version}/samples")
async def samples(request: Request, model: str, version: str) -> dict[str, Any]:
    """Sample images to try: Fashion-MNIST test images for a model trained on them, else
    the version's warmup images; each with its true class when known."""
    found = await _samples(request, model, version)
    base = f"/demo/models/{model}/versions/{version}/samples"
    return {
        "about": found[0].about if found else "",
        "samples": [
            {"url": f"{base}/{i}.png", "label": s.label, "source": s.source}
            for i, s in enumerate(found)
        ],
    }


@router.get("/demo/models/{model}/versions/{version}/samples/{name}.png")
async def sample(request: Request, model: str, version: str, name: str) -> Response:
    found = await _samples(request, model, version)
    # Digits, not Starlette's int convertor: int() of a 4,301-digit name raised (a 500).
    index = int(name) if name.isascii() and name.isdigit() and len(name) < 6 else -1
    if not 0 <= index < len(found):
        raise NotFound(f"no sample {name!r}; this version has {len(found)} (0 to {len(found) - 1})")
    return Response(found[index].png, media_type="image/png")


def _served(request: Request, model: str, version: str) -> LoadedVersion:
    """The version a demo route names in its path, read as the TF Serving routes read
    one (digits only: "1.0" answered version 1, and 0 or -1 were 404s)."""
    return dataplane(request).registry.resolve(model, path_version(version))


async def _samples(request: Request, model: str, version: str) -> tuple[Sample, ...]:
    target = _served(request, model, version)
    directory = dataplane(request).settings.fashion_mnist_dir
    return await asyncio.to_thread(samples_for, target.path, target.card, directory)


def asset_images(version_dir: Path) -> list[str]:
    """Names of the plain PNG files in the version's assets.extra (links left out)."""
    folder = version_dir / ASSETS_EXTRA
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    return sorted(
        p.name for p in entries if p.suffix.lower() == ".png" and not p.is_symlink() and p.is_file()
    )

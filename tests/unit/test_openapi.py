"""/openapi.json is generated from the types that serialize the answers; its examples,
and the JSON answers shown in the docs, validate against those types; /docs works
offline."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel, ValidationError

from service import errors
from service.api import schemas
from service.api.app import create_app
from service.config import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.fixture(scope="module")
def client() -> TestClient:
    # Not entered as a context manager: no lifespan, so no model is loaded.
    return TestClient(create_app(Settings(model_repository=ROOT / "model_repository")))


@pytest.fixture(scope="module")
def document(client: TestClient) -> dict[str, Any]:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    doc: dict[str, Any] = response.json()
    return doc


def test_no_route_documents_a_status_the_server_never_sends(document: dict[str, Any]) -> None:
    assert "422" not in json.dumps(document["paths"])
    assert "HTTPValidationError" not in document["components"]["schemas"]


def test_every_error_status_of_the_table_is_documented_with_the_error_body(
    document: dict[str, Any],
) -> None:
    classify = document["paths"]["/v1/classify"]["post"]["responses"]
    served = {c for c in schemas._served_errors()}
    assert {str(c.http_status) for c in served} <= set(classify)
    for cls in served:
        answer = classify[str(cls.http_status)]
        assert f"`{cls.code}`" in answer["description"]
        ref = answer["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ErrorBody")
    ok = classify["200"]["content"]["application/json"]["schema"]["$ref"]
    assert ok.endswith("/ClassifyResponse")
    # TF Serving's routes document its own body, {"error": "<message>"}.
    predict = document["paths"]["/v1/models/{model}:predict"]["post"]["responses"]
    for cls in served:
        answer = predict[str(cls.http_status)]
        assert f"`{cls.code}`" in answer["description"] and "X-Error-Code" in answer["headers"]
        ref = answer["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/TFServingErrorBody")


MODELS: list[type[BaseModel]] = [
    schemas.ClassifyResponse,
    schemas.ErrorBody,
    schemas.TFServingErrorBody,
    schemas.Health,
    schemas.Readiness,
    schemas.ModelStatusResponse,
    schemas.PredictResponse,
]


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_schema_examples_validate_against_their_model(
    model: type[BaseModel], document: dict[str, Any]
) -> None:
    examples = document["components"]["schemas"][model.__name__]["examples"]
    assert examples
    for example in examples:
        model.model_validate(example)


def _documented_answers() -> list[tuple[str, dict[str, Any]]]:
    """Every JSON object shown as an answer in the docs (``# {...}`` after a command)."""
    found = []
    for path in DOCS:
        for match in re.finditer(r"^# (\{.*\})\s*$", path.read_text(), re.MULTILINE):
            try:
                found.append((f"{path.name}: {match[1][:60]}", json.loads(match[1])))
            except json.JSONDecodeError:
                continue  # abbreviated with "..." for reading
    return found


@pytest.mark.parametrize(("where", "answer"), _documented_answers(), ids=lambda x: str(x)[:50])
def test_documented_answers_match_the_schema(where: str, answer: dict[str, Any]) -> None:
    answers = (
        schemas.ErrorBody,
        schemas.TFServingErrorBody,
        schemas.ClassifyResponse,
        schemas.ModelStatusResponse,
    )
    for model in answers:
        try:
            model.model_validate(answer, strict=False)
        except ValidationError:
            continue
        if model is schemas.ErrorBody:
            codes = {c.code for c in schemas._served_errors()} | {errors.ConfigError.code}
            assert answer["error"]["code"] in codes, where
        return
    raise AssertionError(f"{where} matches no answer schema")


def test_docs_page_needs_no_external_host(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    urls = re.findall(r"""(?:src|href)=["']([^"']+)["']|url: ?["']([^"']+)["']""", page.text)
    referenced = [u for pair in urls for u in pair if u]
    assert referenced, page.text
    assert not [u for u in referenced if re.match(r"(https?:)?//", u)], referenced
    for url in referenced:
        if url.endswith((".js", ".css")):
            assert client.get(url).status_code == 200, url
    redoc = client.get("/redoc")
    assert redoc.status_code == 200 and "cdn." not in redoc.text
    script = re.search(r'src="([^"]+redoc[^"]*\.js)"', redoc.text)
    assert script and client.get(script.group(1)).status_code == 200, redoc.text
    # The bundle's one outside request, Redocly's logo, is never sent: images from the
    # gateway only (a reader's browser on an air-gapped host tried cdn.redoc.ly).
    assert "cdn.redoc.ly" in client.get(script.group(1)).text
    assert redoc.headers["content-security-policy"] == "img-src 'self' data: blob:"


def test_a_keyed_gateways_operations_name_the_key_schemes(document: dict[str, Any]) -> None:
    """Swagger UI's Authorize button sends the key on "Try it out" (a keyed gateway
    answered every call from its docs page 401); probes and the docs stay open."""
    schemes = document["components"]["securitySchemes"]
    assert schemes["bearer"] == {**schemes["bearer"], "type": "http", "scheme": "bearer"}
    assert schemes["apiKey"] == {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    either = [{"bearer": []}, {"apiKey": []}, {}]  # {}: a gateway without keys
    assert document["paths"]["/v1/classify"]["post"]["security"] == either
    assert document["paths"]["/v1/models/{model}:predict"]["post"]["security"] == either
    for open_path in ("/healthz", "/readyz", "/metrics"):  # the scrape: open by default
        for operation in document["paths"][open_path].values():
            assert "security" not in operation
    # The gateway's own check decides: with CNNSERVE_METRICS_REQUIRE_KEY the scrape needs it.
    guarded = create_app(
        Settings(model_repository=ROOT / "model_repository", metrics_require_key=True)
    )
    scrape = TestClient(guarded).get("/openapi.json").json()["paths"]["/metrics"]["get"]
    assert scrape["security"] == either


def test_each_error_code_is_listed_once_and_every_image_type_is_a_raw_body(
    document: dict[str, Any],
) -> None:
    classify = document["paths"]["/v1/classify"]["post"]
    for status, answer in classify["responses"].items():
        codes = re.findall(r"`([a-z_]+)`", answer["description"])
        assert len(codes) == len(set(codes)), (status, codes)
    raw = {kind for kind in classify["requestBody"]["content"] if kind.startswith("image/")}
    assert raw == {f"image/{k}" for k in ("jpeg", "png", "webp", "bmp", "gif", "tiff")}

"""The REST answers as pydantic models: the same types serialize each answer and
generate /openapi.json, so the documented shape is the served shape.

Error answers come from the one error table (service.errors): every status it can give
is documented with the one error body, and FastAPI's unused 422 is not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field, JsonValue

from service import errors


class Prediction(BaseModel):
    label: str = Field(description="class name from the model's labels.txt")
    class_id: int = Field(description="index of the class in the model's output")
    score: float = Field(description="probability, 0..1")


class ImageResult(BaseModel):
    predictions: list[Prediction]


_PREDICTIONS: list[JsonValue] = [
    {"label": "Ankle boot", "class_id": 9, "score": 0.9997},
    {"label": "Sandal", "class_id": 5, "score": 0.0002},
]


class ClassifyResponse(BaseModel):
    """One image: `predictions`; several: `results`, one per image in request order."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"model": "fashion_mnist", "version": 1, "predictions": _PREDICTIONS},
                {
                    "model": "fashion_mnist",
                    "version": 1,
                    "results": [{"predictions": _PREDICTIONS}, {"predictions": _PREDICTIONS}],
                },
            ]
        }
    )

    model: str
    version: int
    predictions: list[Prediction] | None = Field(None, description="top-k of the one image")
    results: list[ImageResult] | None = Field(None, description="top-k of each image")


class Health(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "alive"}]})
    status: str


class Readiness(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"ready": True}]})
    ready: bool


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable code (the table in docs/serving.md)")
    message: str = Field(description="what went wrong and what to do")


class ErrorBody(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": {
                        "code": "model_not_found",
                        "message": "no model named 'nope'; models: fashion_mnist",
                    }
                }
            ]
        }
    )
    error: ErrorDetail


# TF Serving's REST shapes (https://www.tensorflow.org/tfx/serving/api_rest).


class TFServingErrorBody(BaseModel):
    """TF Serving's error body, kept on its routes; the stable code is X-Error-Code."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"error": "no model named 'nope'; models: fashion_mnist"}]}
    )
    error: str = Field(description="what went wrong and what to do")


class VersionStatusError(BaseModel):
    error_code: str
    error_message: str


class ModelVersionStatus(BaseModel):
    version: str
    state: str = Field(description="START, LOADING, AVAILABLE, UNLOADING or END")
    status: VersionStatusError


class ModelStatusResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model_version_status": [
                        {
                            "version": "1",
                            "state": "AVAILABLE",
                            "status": {"error_code": "OK", "error_message": ""},
                        }
                    ]
                }
            ]
        }
    )
    model_version_status: list[ModelVersionStatus]


class ModelSpec(BaseModel):
    name: str
    signature_name: str
    version: str


class ModelMetadataResponse(BaseModel):
    model_spec: ModelSpec
    metadata: dict[str, Any] = Field(description="signature_def as TF Serving writes it")


class PredictResponse(BaseModel):
    """Row requests (`instances`) get `predictions`; columnar ones (`inputs`) `outputs`."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"predictions": [[0.01, 0.97, 0.02]]}]}
    )
    predictions: Any = None
    outputs: Any = None


def _served_errors() -> list[type[errors.CnnserveError]]:
    def walk(cls: type[errors.CnnserveError]) -> list[type[errors.CnnserveError]]:
        return [cls, *(c for sub in cls.__subclasses__() for c in walk(sub))]

    offline = (errors.DatasetError, errors.ExportError, errors.ConfigError, errors.PromotionError)
    # Logged and counted only: the client that left reads no answer.
    unanswered = (errors.ClientClosedRequest,)
    return [
        c
        for c in walk(errors.CnnserveError)
        if c is not errors.CnnserveError
        and c.__module__ == errors.__name__
        and not issubclass(c, offline + unanswered)
    ]


def error_responses(*, tf_serving: bool = False) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for every status the error table gives, listing its codes;
    with ``tf_serving``, in TF Serving's error body (service.api.http.error_response)."""
    by_status: dict[int, list[str]] = {}
    for cls in _served_errors():
        by_status.setdefault(cls.http_status, []).append(cls.code)
    where = "the X-Error-Code header" if tf_serving else "`error.code`"
    return {
        status: {
            "model": TFServingErrorBody if tf_serving else ErrorBody,
            # A code several errors share (their messages differ) once.
            "description": f"{where}: " + ", ".join(f"`{c}`" for c in sorted(set(codes))),
            "headers": {
                "X-Error-Code": {
                    "description": "the stable error code",
                    "schema": {"type": "string"},
                }
            },
        }
        for status, codes in sorted(by_status.items())
    }


# How a key is sent when the gateway has API keys (service.api.auth); Swagger UI's
# Authorize button sends it on "Try it out" (without the schemes it had none, and every
# call from the docs page of a keyed gateway was answered 401).
SECURITY_SCHEMES = {
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "an API key, when the gateway has them (CNNSERVE_API_KEYS)",
    },
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
}


def openapi_without_validation_errors(
    app: FastAPI, is_open: Callable[[str], bool]
) -> dict[str, Any]:
    """The app's OpenAPI document without FastAPI's automatic 422 answers: request
    validation errors are answered 400 `bad_request` (service.api.http), as documented.
    Operations a keyed gateway guards (not ``is_open``: the gateway's own check,
    service.api.auth.ApiKeys.is_open) name the key schemes (either one, or none when the
    gateway has no keys)."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        for route, path in schema.get("paths", {}).items():
            guarded = not is_open(route)
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
                if guarded:
                    operation["security"] = [{"bearer": []}, {"apiKey": []}, {}]
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        schema.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
        app.openapi_schema = schema
    return app.openapi_schema

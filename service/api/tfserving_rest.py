"""TF Serving's REST API (status, metadata, predict), answered from the same data plane.

Formats follow https://www.tensorflow.org/tfx/serving/api_rest: `instances` (row) or
`inputs` (columnar) requests, `predictions` / `outputs` answers, `{"b64": ...}` for
binary values, and TF Serving's state names in model_version_status.
"""

from __future__ import annotations

import asyncio
from contextlib import nullcontext
from typing import Any

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import Response
from google.protobuf import json_format
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.http import (
    LARGE_JSON_BYTES,
    base64_hint,
    check_room,
    client_key,
    dataplane,
    decode_base64,
    encoded_response,
    path_version,
    read_json,
    request_deadline,
)
from service.api.json_pieces import collector_paused
from service.api.json_turns import json_turn
from service.api.schemas import (
    ModelMetadataResponse,
    ModelSpec,
    ModelStatusResponse,
    ModelVersionStatus,
    PredictResponse,
    VersionStatusError,
    error_responses,
)
from service.contract import BYTES_INPUT_NAME, BYTES_SIGNATURE, INPUT_NAME
from service.dataplane import DataPlane, PredictResult, pixel_array
from service.errors import InvalidRequest, MethodNotAllowed
from service.registry import VersionStatus

router = APIRouter(tags=["tensorflow-serving"], responses=error_responses(tf_serving=True))

_GRPC_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def _status_body(statuses: list[VersionStatus]) -> ModelStatusResponse:
    return ModelStatusResponse(
        model_version_status=[
            ModelVersionStatus(
                version=str(s.version),
                state=s.state.name,
                status=VersionStatusError(
                    error_code=_GRPC_CODE_NAMES.get(s.error_code, "UNKNOWN"),
                    error_message=s.error_message,
                ),
            )
            for s in statuses
        ]
    )


STATUS = {"response_model": ModelStatusResponse}
METADATA = {"response_model": ModelMetadataResponse}
PREDICT = {"response_model": PredictResponse, "response_model_exclude_none": True}


# TF Serving's REST API has :classify and :regress beside :predict. They take
# tf.Example input, which an image model has no signature for: as TF Serving, a model it
# does not serve is 404, one it serves 400 (DataPlane.refuse_tf_example_api). These
# routes also make a wrong verb or method say so; without them the status routes below
# took the path ("m:classify" as a model name) and answered 405 Allow: GET or 404.
_VERBS = ("predict", "classify", "regress")


def _wrong_verb(request: Request, verb: str) -> Exception:
    """Another method on a verb (all take POST), or a verb there is no route for (the
    router's own 404, mapped where its answers are: service.api.http)."""
    if verb in _VERBS:
        message = f"{request.method} is not allowed on {request.scope['path']}; use POST"
        return MethodNotAllowed(message, allow="POST")
    return StarletteHTTPException(404)


# Every method but POST on a verb path is answered here with its own Allow: the router's
# 405 would name the methods of every route the path matches (GET too, for these).
_NOT_POST = ["GET", "OPTIONS", "PUT", "PATCH", "DELETE"]


@router.api_route("/v1/models/{model}:{verb}", methods=_NOT_POST, include_in_schema=False)
async def model_verb_other(request: Request, model: str, verb: str) -> ModelStatusResponse:
    if verb not in _VERBS:  # a model name with a colon, as before these routes
        if request.method != "GET":
            where = request.scope["path"]
            raise MethodNotAllowed(f"{request.method} is not allowed on {where}", allow="GET, HEAD")
        return _status_body(dataplane(request).model_status(f"{model}:{verb}"))
    raise _wrong_verb(request, verb)


@router.api_route(
    "/v1/models/{model}/versions/{version}:{verb}", methods=_NOT_POST, include_in_schema=False
)
@router.api_route(
    "/v1/models/{model}/labels/{label}:{verb}", methods=_NOT_POST, include_in_schema=False
)
async def target_verb_other(request: Request, verb: str) -> Response:
    raise _wrong_verb(request, verb)


# An empty model, version or label ("/v1/models/:predict"): the routes above take none,
# and the status routes did, reading ":predict" as a name: 405 Allow: GET, HEAD to a
# POST. Said as gRPC says an empty model_spec.name: a bad request.
def _empty(request: Request, verb: str, part: str) -> Exception:
    if verb not in _VERBS:
        return _wrong_verb(request, verb)
    return InvalidRequest(
        f"the {part} in {request.scope['path']} is empty; POST to /v1/models/<model>:{verb}, "
        f"/v1/models/<model>/versions/<version>:{verb} or "
        f"/v1/models/<model>/labels/<label>:{verb}"
    )


@router.post("/v1/models/:{verb}", include_in_schema=False)
async def empty_model_verb(request: Request, verb: str) -> Response:
    raise _empty(request, verb, "model name")


@router.post("/v1/models/{model}/versions/:{verb}", include_in_schema=False)
async def empty_version_verb(request: Request, verb: str) -> Response:
    raise _empty(request, verb, "version")


@router.post("/v1/models/{model}/labels/:{verb}", include_in_schema=False)
async def empty_label_verb(request: Request, verb: str) -> Response:
    raise _empty(request, verb, "version label")


@router.get("/v1/models", include_in_schema=False)
@router.get("/v1/models/", include_in_schema=False)
async def no_model_status(request: Request) -> Response:
    """TF Serving's 400 "Missing model name in request." (its status route takes an
    optional name); there is no listing of models."""
    raise InvalidRequest(
        f"missing model name in request: GET /v1/models/<model> for its versions' status, "
        f"/v1/models/<model>/metadata for its signatures (asked: {request.scope['path']})"
    )


@router.get("/v1/models/{model}", **STATUS)  # type: ignore[arg-type]
async def model_status(request: Request, model: str) -> ModelStatusResponse:
    """Every served version of a model with its state (TF Serving GetModelStatus)."""
    return _status_body(dataplane(request).model_status(model))


@router.get("/v1/models/{model}/versions/{version}", **STATUS)  # type: ignore[arg-type]
async def version_status(request: Request, model: str, version: str) -> ModelStatusResponse:
    return _status_body(dataplane(request).model_status(model, path_version(version)))


@router.get("/v1/models/{model}/labels/{label}", **STATUS)  # type: ignore[arg-type]
async def label_status(request: Request, model: str, label: str) -> ModelStatusResponse:
    """Every version, as TF Serving answers it: its status ignores a label (a label's
    version is in `.../labels/<label>/metadata`)."""
    return _status_body(dataplane(request).model_status(model))


def _metadata(
    request: Request, model: str, version: int | None, label: str | None
) -> ModelMetadataResponse:
    target, signatures = dataplane(request).metadata(model, version, label)
    return ModelMetadataResponse(
        model_spec=ModelSpec(name=target.model, signature_name="", version=str(target.version)),
        metadata={
            # As TF Serving prints it (always_print_primitive_fields): clients read
            # "unknown_rank": false and each dim's "name": "" without checking for them.
            "signature_def": json_format.MessageToDict(
                signatures,
                preserving_proto_field_name=True,
                always_print_fields_with_no_presence=True,
            )
        },
    )


@router.get("/v1/models/{model}/metadata", **METADATA)  # type: ignore[arg-type]
async def model_metadata(request: Request, model: str) -> ModelMetadataResponse:
    """Signature definitions of the version an unversioned request goes to: the one
    labelled `stable`, else the newest (TF Serving GetModelMetadata)."""
    return _metadata(request, model, None, None)


@router.get("/v1/models/{model}/versions/{version}/metadata", **METADATA)  # type: ignore[arg-type]
async def version_metadata(request: Request, model: str, version: str) -> ModelMetadataResponse:
    return _metadata(request, model, path_version(version), None)


@router.get("/v1/models/{model}/labels/{label}/metadata", **METADATA)  # type: ignore[arg-type]
async def label_metadata(request: Request, model: str, label: str) -> ModelMetadataResponse:
    return _metadata(request, model, None, label)


def _b64_value(value: dict[str, Any]) -> Any:
    """A JSON object as the predict body is parsed: {"b64": "..."} becomes its bytes
    (json.loads' object_hook; a walk over the parsed body afterwards took a second per
    10 MB of pixel lists, on the event loop)."""
    if len(value) != 1 or "b64" not in value:
        return value
    try:
        return decode_base64(value["b64"])
    except (ValueError, TypeError):  # TypeError: not a string
        raise InvalidRequest(
            f'a {{"b64": ...}} value is not valid base64: {base64_hint(value["b64"])}'
        ) from None


def _other_signature_hint(names: set[str]) -> str:
    """Inputs of the other signature, named to this one: say how to reach it."""
    if names != {BYTES_INPUT_NAME}:
        return ""
    return (
        f"; {BYTES_INPUT_NAME!r} is the input of signature {BYTES_SIGNATURE!r}: add "
        f'"signature_name": "{BYTES_SIGNATURE}", or name it {INPUT_NAME!r}'
    )


def _parse_predict(body: Any, input_names: list[str]) -> tuple[dict[str, Any], bool]:
    """(named inputs, row format?) from a TF Serving REST predict body."""
    if not isinstance(body, dict) or ("instances" in body) == ("inputs" in body):
        raise InvalidRequest(
            'predict body needs exactly one of "instances" (row) or "inputs" (columnar)'
        )
    if "instances" in body:
        instances = body["instances"]
        if not isinstance(instances, list) or not instances:
            raise InvalidRequest('"instances" must be a non-empty list')
        if all(isinstance(i, dict) and not isinstance(i, bytes) for i in instances):
            names = set().union(*(i.keys() for i in instances))
            if names != set(input_names) or any(set(i) != names for i in instances):
                raise InvalidRequest(
                    f"every instance needs exactly the inputs {input_names}"
                    + _other_signature_hint(names)
                )
            return {n: [i[n] for i in instances] for n in input_names}, True
        if len(input_names) != 1:
            raise InvalidRequest(
                f"this signature has inputs {input_names}; name them in each instance"
            )
        return {input_names[0]: instances}, True
    inputs = body["inputs"]
    if isinstance(inputs, dict):
        if set(input_names) <= set(inputs):
            # TF Serving reads the signature's inputs from the object and ignores other
            # keys (json_tensor.cc, FillTensorMapFromInputsMap): a 200 there, not a 400
            return {n: inputs[n] for n in input_names}, False
        return inputs, False
    if len(input_names) != 1:
        raise InvalidRequest(f'this signature has inputs {input_names}; give "inputs" as an object')
    return {input_names[0]: inputs}, False


BOOLEANS = (
    "predict inputs hold a JSON boolean (true or false), not numbers: send image values "
    'as numbers 0-255 (uint8 RGB), files as {"b64": ...}'
)


def _refuse_booleans(body: bytes, inputs: dict[str, Any]) -> None:
    """JSON's true and false are no pixel values, yet numpy reads them beside numbers as
    1 and 0 ([0, true] becomes an int64 array): only an all-boolean tensor kept a dtype
    that showed them. Only a body holding the words at all is walked: the two byte
    searches cost ~15 ms per 10 MB of pixels (parsing it ~0.4 s), a walk over every
    value as much as parsing."""
    if b"true" not in body and b"false" not in body:
        return
    pending: list[Any] = list(inputs.values())
    while pending:
        value = pending.pop()
        if isinstance(value, bool):
            raise InvalidRequest(BOOLEANS)
        if isinstance(value, list):
            pending.extend(value)
        elif isinstance(value, dict):
            pending.extend(value.values())


def _as_arrays(raw: bytes, inputs: dict[str, Any], signature_name: str) -> None:
    """A large body's inputs checked for booleans, then its pixel lists replaced in
    ``inputs`` by arrays (:func:`service.dataplane.pixel_array`), off the event loop:
    the lists are freed here, not on it. Files, and anything not all numbers, stay as
    they are, for the refusals that name them."""
    _refuse_booleans(raw, inputs)
    if signature_name == BYTES_SIGNATURE:
        return
    for name, value in inputs.items():
        try:
            array = pixel_array(value)
        except ValueError:  # ragged: refused where its message is made
            continue
        if array is not None:
            inputs[name] = array


async def _predict(
    request: Request, model: str, version: int | None, label: str | None
) -> Response:
    plane = dataplane(request)
    deadline = request_deadline(plane, request)
    await check_room(request, model, version, label, deadline, parses=True)
    # A large body parses in its turn, and what it parses into lives until the answer:
    # the turn lasts that long (service.api.json_turns).
    async with json_turn(request):
        result, row = await _predicted(request, plane, model, version, label, deadline)
    return encoded_response(result.model, result.timings, lambda: _predict_body(result, row))


async def _predicted(
    request: Request,
    plane: DataPlane,
    model: str,
    version: int | None,
    label: str | None,
    deadline: float,
) -> tuple[PredictResult, bool]:
    """The body parsed and predicted; whether its instances were rows. What it parsed
    goes when this returns."""
    raw = await request.body()  # read once: read_json reads what this keeps
    large = len(raw) > LARGE_JSON_BYTES
    # A large body's lists, from its parse until they are arrays, with the cycle
    # collector held off: it walked them every few hundred lists (json_pieces).
    with collector_paused() if large else nullcontext():
        body = await read_json(request, object_hook=_b64_value)
        signature_name = body.get("signature_name", "") if isinstance(body, dict) else ""
        if not isinstance(signature_name, str):
            raise InvalidRequest("signature_name must be a string")
        target = plane.route(model, version, label, client_key(request))
        inputs, row = _parse_predict(body, plane.signature_inputs(target, signature_name))
        del body  # the lists are the inputs' alone now: arrays replace them below
        if large:
            await asyncio.to_thread(_as_arrays, raw, inputs, signature_name)
        else:
            _refuse_booleans(raw, inputs)
    result = await plane.predict(
        inputs,
        model=target.model,
        version=target.version,
        signature_name=signature_name,
        deadline=deadline,
    )
    return result, row


def _predict_body(result: PredictResult, row: bool) -> PredictResponse:
    outputs = {name: value.tolist() for name, value in result.outputs.items()}
    if row:
        only = next(iter(outputs.values())) if len(outputs) == 1 else None
        predictions = (
            only
            if only is not None
            else [
                dict(zip(outputs, values, strict=True))
                for values in zip(*outputs.values(), strict=True)
            ]
        )
        return PredictResponse(predictions=predictions)
    return PredictResponse(outputs=next(iter(outputs.values())) if len(outputs) == 1 else outputs)


@router.post("/v1/models/{model}:predict", **PREDICT)  # type: ignore[arg-type]
async def predict(request: Request, model: str) -> Response:
    """TF Serving Predict: `{"instances": [...]}` or `{"inputs": ...}`; the default signature
    takes uint8 [224,224,3] images, `predict_image_bytes` takes `{"b64": ...}` files."""
    return await _predict(request, model, None, None)


@router.post("/v1/models/{model}/versions/{version}:predict", **PREDICT)  # type: ignore[arg-type]
async def version_predict(request: Request, model: str, version: str) -> Response:
    return await _predict(request, model, path_version(version), None)


@router.post("/v1/models/{model}/labels/{label}:predict", **PREDICT)  # type: ignore[arg-type]
async def label_predict(request: Request, model: str, label: str) -> Response:
    return await _predict(request, model, None, label)


@router.post("/v1/models/{model}:{verb}", include_in_schema=False)
@router.post("/v1/models/{model}/versions/{version}:{verb}", include_in_schema=False)
@router.post("/v1/models/{model}/labels/{label}:{verb}", include_in_schema=False)
async def other_verb(request: Request, verb: str) -> Response:
    if verb not in ("classify", "regress"):
        raise _wrong_verb(request, verb)
    params = request.path_params
    version = params.get("version")
    raise dataplane(request).refuse_tf_example_api(
        verb.capitalize(),
        params["model"],
        None if version is None else path_version(version),
        params.get("label"),
    )

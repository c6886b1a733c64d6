"""Reading an error answer in either of the gateway's two bodies."""

from __future__ import annotations

import httpx


def error_of(response: httpx.Response) -> tuple[str, str]:
    """The stable code and the message of an error answer: TF Serving's body,
    ``{"error": "<message>"}``, under /v1/models (the code in X-Error-Code), else
    ``{"error": {"code": ..., "message": ...}}``; the header is on both."""
    body = response.json()
    assert set(body) == {"error"}, body
    code = response.headers.get("x-error-code", "")
    if isinstance(body["error"], str):
        assert response.request.url.path.startswith("/v1/models"), body
        assert code and body["error"], (code, body)
        return code, body["error"]
    assert body["error"]["code"] == code, (body, code)
    assert body["error"]["message"], body
    return code, body["error"]["message"]

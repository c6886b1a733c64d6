"""The room check a route makes first (service.api.http.check_room), made as the request's
headers are parsed, for the requests whose bodies the route parses: ``/v1/classify``
multipart or JSON, and TF Serving's ``:predict``.

The route refuses such a request (503 ``overloaded``) before reading its body when the
version that would answer, or the decode threads, would refuse even one more image. Made
there, the refusal costs what the whole ASGI way costs, the app's task, its messages and
the route, and the body arrives while it waits for its turn: with 32-image multipart
bodies (~580 KB) refused by every request, ~0.5 ms of a worker's CPU each through the
app, ~0.24 ms answered by the HTTP protocol as the headers are parsed (1 worker, wrk at
8 connections, unpaced; most of what is left is reading the body to drop it). Under 4x
the load of such requests the refusals run at the pace (service.concurrency), 500 a
second per worker: a quarter of a core each through the app.

Only what the route would decide the same way is decided here: a request whose target
and deadline can be read at face value (query values as the direct path takes them, a
``:predict`` path without percent-escapes), that RequestGuard lets on (its API key,
body size and coding checked as it checks them: a client without a valid key is told
401, not whether the server is loaded). Anything else goes the ASGI way and meets the
same check in the route.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from typing import NamedTuple

from service.api.fastpath import face_value_query, query_int
from service.api.http import (
    CLIENT_KEY_HEADER,
    Admission,
    header_timeout,
    header_value,
    joined_headers,
    parse_client_key,
)
from service.api.rest import CLASSIFY_PATH, parses_body
from service.dataplane import DataPlane
from service.errors import CnnserveError

Headers = Sequence[tuple[bytes, bytes]]
# TF Serving's REST Predict, as its routes (service.api.tfserving_rest) take it; names
# with a percent-escape or a colon are left to them.
_PREDICT = re.compile(r"/v1/models/([^/:%]+)(?:/versions/([0-9]{1,18})|/labels/([^/:%]+))?:predict")
_CLIENT_KEY = CLIENT_KEY_HEADER.encode()


class Target(NamedTuple):
    model: str | None
    version: int | None
    label: str | None


def target(method: str, path: str, query_string: bytes, headers: Headers) -> Target | None:
    """The model, version and label a request's route checks for room before it reads
    the body, when the route parses its body and they can be read at face value."""
    if method != "POST":
        return None
    if path == CLASSIFY_PATH:
        if not parses_body(header_value(headers, b"content-type")):
            return None
        query = face_value_query(query_string)
        if query is None:
            return None
        return Target(query.get("model"), query_int(query.get("version")), query.get("label"))
    matched = _PREDICT.fullmatch(path)
    if matched is None:
        return None
    model, version, label = matched.groups()
    return Target(model, None if version is None else int(version), label)


class HeaderRoomCheck:
    """For service.api.http.EarlyRefusal: for a request the route would check the same
    way, the check to make (the error the route's first room check would raise, or
    None); None for any other request."""

    def __init__(self, admission: Admission, plane: DataPlane) -> None:
        self.admission = admission
        self.plane = plane

    def __call__(
        self, method: str, path: str, query_string: bytes, headers: Headers
    ) -> Callable[[], CnnserveError | None] | None:
        room = target(method, path, query_string, headers)
        if room is None or self.admission.refusal(path, joined_headers(headers)) is not None:
            return None
        key = parse_client_key((header_value(headers, _CLIENT_KEY) or b"").decode("latin-1"))
        if self._split and room.version is None and not room.label and key is None:
            # The canary split draws such a request's version once, on the record the
            # route makes (requestlog.request_draw): one drawn here, on the refusal's
            # record, could refuse the request where the route's draw would not.
            return None
        try:
            deadline = self.plane.deadline(header_timeout(headers))
        except CnnserveError:
            return None  # the route's 400 says what is wrong with it
        return functools.partial(self._check, room, deadline, key)

    @property
    def _split(self) -> bool:
        return self.plane.settings.canary_percent > 0

    def _check(self, room: Target, deadline: float, key: str | None) -> CnnserveError | None:
        try:
            self.plane.check_room(room.model, room.version, room.label, deadline, key)
        except CnnserveError as exc:
            return exc.with_traceback(None)  # it held this frame, which holds it: a cycle
        return None

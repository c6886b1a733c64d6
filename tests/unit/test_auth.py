"""API keys: parsing from settings, constant-time check of every key, open paths, the
key file followed as it changes."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.api.auth import ApiKeys, presented_key
from service.cli import main
from service.config import Settings
from service.errors import Unauthenticated


def test_keys_come_from_the_variable_and_the_file(tmp_path: Path) -> None:
    assert Settings().keys() == frozenset()
    secret = tmp_path / "keys"
    secret.write_text("from-file-1\nfrom-file-2, from-file-3\n\n")
    settings = Settings(api_keys=" key-a ,key-b,,", api_keys_file=secret)
    assert settings.keys() == {"key-a", "key-b", "from-file-1", "from-file-2", "from-file-3"}
    assert "key-a" not in repr(settings)  # keys stay out of reprs (and so of tracebacks)
    with pytest.raises(ValueError, match=r"^CNNSERVE_API_KEYS_FILE .*missing: No such file"):
        Settings(api_keys_file=tmp_path / "missing").keys()


def test_a_key_setting_that_holds_no_key_stops_start_up(tmp_path: Path) -> None:
    """An unpopulated secret or a stray comma must not serve without keys, silently.
    An empty file is refused beside keys of the variable too: a worker started later
    reads it as a reload does, and a reload takes an empty file for a half-written one
    (the workers would disagree otherwise)."""
    empty = tmp_path / "empty"
    empty.write_text("\n \n# only a comment\n")
    for settings in (
        Settings(api_keys=","),
        Settings(api_keys=" "),
        Settings(api_keys_file=empty),
        Settings(api_keys="a", api_keys_file=empty),
    ):
        with pytest.raises(ValueError, match="holds no key; authentication would be off"):
            settings.keys()


def test_a_byte_order_mark_is_not_part_of_the_first_key(tmp_path: Path) -> None:
    secret = tmp_path / "keys"
    secret.write_bytes(b"\xef\xbb\xbfalpha\r\nbeta\r\n")  # as Windows editors save it
    assert Settings(api_keys_file=secret).keys() == {"alpha", "beta"}


def test_tls_needs_both_files(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="tls_certfile and tls_keyfile"):
        Settings(tls_certfile=tmp_path / "cert.pem")


def test_check_accepts_any_known_key_and_refuses_the_rest() -> None:
    keys = ApiKeys(["k1", "k2"])
    assert keys.enabled
    keys.check("k1")
    keys.check("k2")
    for wrong in (None, "", "k", "k1 ", "K1", "k3"):
        with pytest.raises(Unauthenticated) as refused:
            keys.check(wrong)
        assert refused.value.http_status == 401
        assert "k1" not in refused.value.message and "k2" not in refused.value.message
    ApiKeys([]).check(None)  # off: everything passes


def test_presented_key_from_either_header() -> None:
    assert presented_key("Bearer abc", None) == "abc"
    assert presented_key("bearer  abc ", None) == "abc"
    assert presented_key("Basic abc", "xyz") == "xyz"
    assert presented_key(None, None) is None
    assert presented_key("Bearer abc", " abc") == "abc"  # both, the same key
    assert presented_key("Bearer abc", "") == "abc"
    for bearer, header in (("Bearer abc", "xyz"), ("Bearer xyz", "abc")):
        with pytest.raises(Unauthenticated, match="two different API keys"):
            presented_key(bearer, header)


def test_open_paths() -> None:
    keys = ApiKeys(["k"], metrics_path="/metrics")
    for path in ("/healthz", "/readyz", "/docs", "/openapi.json", "/", "/demo/static/demo.js"):
        assert keys.is_open(path)
    assert keys.is_open("/metrics")
    for path in ("/v1/classify", "/demo/models", "/v1/models/m"):
        assert not keys.is_open(path)
    assert not ApiKeys(["k"], metrics_path="/metrics", protect_metrics=True).is_open("/metrics")


def test_comment_lines_are_not_keys(tmp_path: Path) -> None:
    """A comment with a comma in it became two keys, words and spaces included."""
    secret = tmp_path / "keys"
    secret.write_text("# production keys, rotate quarterly\n  # another, indented\nk-1, k-2\n")
    assert Settings(api_keys_file=secret).keys() == {"k-1", "k-2"}


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("good\nproduction keys, rotate quarterly\n", 2),  # a comment without its #
        ("clé\n", 1),  # accepted, and then no UTF-8 header could present it
        ("good\nhalf\tkey\n", 2),
        ("good\n\nkey\x7f\n", 3),
    ],
)
def test_a_key_no_client_could_send_stops_start_up_without_showing_it(
    tmp_path: Path, text: str, line: int
) -> None:
    secret = tmp_path / "keys"
    secret.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError) as refused:
        Settings(api_keys_file=secret).keys()
    message = str(refused.value)
    assert message.startswith(f"CNNSERVE_API_KEYS_FILE {secret} line {line}: ")
    assert "visible ASCII" in message and "\n" not in message
    for word in ("quarterly", "clé", "half", "key\x7f"):
        assert word not in message


@pytest.mark.parametrize("separator", ["\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\u2029"])
def test_a_key_with_a_line_separator_inside_is_refused_not_split(
    tmp_path: Path, separator: str
) -> None:
    """splitlines() ended lines at these too: "Secret-Part-One<VT>pw" gave two keys,
    "pw" one of them, and the server started."""
    secret = tmp_path / "keys"
    secret.write_text(f"good\nSecret-Part-One{separator}pw\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"^CNNSERVE_API_KEYS_FILE {secret} line 2: "):
        Settings(api_keys_file=secret).keys()
    secret.write_text(f"good{separator}\n", encoding="utf-8")  # nor cut off at its end
    with pytest.raises(ValueError, match="line 1: a key must be visible ASCII"):
        Settings(api_keys_file=secret).keys()
    secret.write_text("k-1\r\nk-2\r\n")  # CRLF lines are lines
    assert Settings(api_keys_file=secret).keys() == {"k-1", "k-2"}


def test_a_key_file_is_not_read_without_bound(tmp_path: Path) -> None:
    """CNNSERVE_API_KEYS_FILE=/dev/zero was read until memory ran out."""
    secret = tmp_path / "keys"
    secret.write_bytes(b"k" * (2 * 1024 * 1024))
    with pytest.raises(ValueError, match=r"larger than 1024 KiB; a key file holds API keys"):
        Settings(api_keys_file=secret).keys()
    with pytest.raises(ValueError, match=r"^CNNSERVE_API_KEYS_FILE /dev/zero: larger than"):
        Settings(api_keys_file=Path("/dev/zero")).keys()


def test_the_variable_follows_the_same_rule_by_position() -> None:
    for value, position in (("good,clé", 2), ("a b", 1), ("x,,y z", 3)):
        with pytest.raises(ValueError) as refused:
            Settings(api_keys=value).keys()
        message = str(refused.value)
        assert message.startswith(f"CNNSERVE_API_KEYS key {position} (comma-separated): ")
        assert "clé" not in message and "y z" not in message
    assert Settings(api_keys=" a ,b\nc").keys() == {"a", "b", "c"}


def test_a_key_file_that_is_not_utf8_is_named_with_its_line(tmp_path: Path) -> None:
    """The message was Python's "'utf-8' codec can't decode byte 0xff…", naming neither
    the setting nor the file."""
    secret = tmp_path / "keys"
    secret.write_bytes(b"good\nbad\xff\n")
    with pytest.raises(ValueError) as refused:
        Settings(api_keys_file=secret).keys()
    assert str(refused.value) == (
        f"CNNSERVE_API_KEYS_FILE {secret} line 2: not UTF-8 text; keys are visible ASCII characters"
    )


def test_serve_stops_in_one_line_naming_the_variable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before any worker starts (exit 2), one line; "'utf-8' codec can't decode byte
    0xff" named neither the variable nor the file."""
    secret = tmp_path / "keys"
    secret.write_bytes(b"\xffkey\n")
    monkeypatch.setenv("CNNSERVE_API_KEYS_FILE", str(secret))
    assert main(["serve", "--model-repository", str(tmp_path), "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"cnnserve serve: CNNSERVE_API_KEYS_FILE {secret} line 1: not UTF-8 text; keys are "
        "visible ASCII characters\n"
    )


def test_an_empty_variable_is_no_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """Helm templates leave `CNNSERVE_API_KEYS_FILE=`: it was the path "." ("Is a
    directory"); an empty CNNSERVE_METRICS_PATH still means no endpoint."""
    for name in ("API_KEYS_FILE", "TLS_CERTFILE", "TLS_KEYFILE", "API_KEYS", "METRICS_PATH"):
        monkeypatch.setenv(f"CNNSERVE_{name}", "")
    settings = Settings()
    assert settings.api_keys_file is None
    assert settings.tls_certfile is None and settings.tls_keyfile is None
    assert settings.keys() == frozenset()  # keys off, as before
    assert settings.metrics_path == ""


def test_a_grpc_call_refused_while_keys_cannot_be_checked_says_when_to_retry() -> None:
    """A worker whose key file never read answers 503 with Retry-After over REST; over
    gRPC the same refusal (UNAVAILABLE) carried only the request id."""
    import asyncio

    import grpc

    from service.api.auth import GrpcApiKeyInterceptor
    from service.api.grpc_malformed import MalformedRequestInterceptor
    from service.proto_gen.tensorflow_serving.apis import (
        get_model_status_pb2,
        model_service_pb2_grpc,
    )

    async def scenario() -> tuple[grpc.StatusCode, dict[str, str]]:
        keys = ApiKeys(["k1"])
        keys.fail_closed(frozenset())  # the file never read: no key checks out
        interceptors = [GrpcApiKeyInterceptor(keys), MalformedRequestInterceptor(5.0)]
        server = grpc.aio.server(interceptors=interceptors)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(
            model_service_pb2_grpc.ModelServiceServicer(), server
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
                    get_model_status_pb2.GetModelStatusRequest(),
                    metadata=[("x-api-key", "k1")],
                    timeout=10,
                )
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call
                return refused.value.code(), dict(refused.value.trailing_metadata() or ())
        finally:
            await server.stop(None)

    code, trailers = asyncio.run(scenario())
    assert code == grpc.StatusCode.UNAVAILABLE
    assert trailers.get("retry-after", "").isdigit() and "x-request-id" in trailers


def test_a_protected_metrics_path_under_an_open_prefix_needs_a_key() -> None:
    """CNNSERVE_METRICS_PATH=/docs/metrics was open (under /docs/) with
    CNNSERVE_METRICS_REQUIRE_KEY on."""
    from service.api.auth import ApiKeys

    keys = ApiKeys(["k"], metrics_path="/docs/metrics", protect_metrics=True)
    assert not keys.is_open("/docs/metrics") and keys.is_open("/docs/oauth2-redirect")
    assert keys.is_open("/healthz")
    assert ApiKeys(["k"], metrics_path="/docs/metrics").is_open("/docs/metrics")

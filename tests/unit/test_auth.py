"""API keys: parsing from settings, constant-time check of every key, open paths."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.api.auth import ApiKeys, presented_key
from service.config import Settings
from service.errors import Unauthenticated


def test_keys_come_from_the_variable_and_the_file(tmp_path: Path) -> None:
    assert Settings().keys() == frozenset()
    secret = tmp_path / "keys"
    secret.write_text("from-file-1\nfrom-file-2, from-file-3\n\n")
    settings = Settings(api_keys=" key-a ,key-b,,", api_keys_file=secret)
    assert settings.keys() == {"key-a", "key-b", "from-file-1", "from-file-2", "from-file-3"}
    assert "key-a" not in repr(settings)  # keys stay out of reprs (and so of tracebacks)
    with pytest.raises(ValueError, match="api_keys_file"):
        Settings(api_keys_file=tmp_path / "missing").keys()


def test_a_key_setting_that_holds_no_key_stops_start_up(tmp_path: Path) -> None:
    """An unpopulated secret or a stray comma must not serve without keys, silently."""
    empty = tmp_path / "empty"
    empty.write_text("\n \n")
    for settings in (
        Settings(api_keys=","),
        Settings(api_keys=" "),
        Settings(api_keys_file=empty),
    ):
        with pytest.raises(ValueError, match="holds no key; authentication would be off"):
            settings.keys()
    assert Settings(api_keys="a", api_keys_file=empty).keys() == {"a"}


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


def test_open_paths() -> None:
    keys = ApiKeys(["k"], metrics_path="/metrics")
    for path in ("/healthz", "/readyz", "/docs", "/openapi.json", "/", "/demo/static/demo.js"):
        assert keys.is_open(path)
    assert keys.is_open("/metrics")
    for path in ("/v1/classify", "/demo/models", "/v1/models/m"):
        assert not keys.is_open(path)
    assert not ApiKeys(["k"], metrics_path="/metrics", protect_metrics=True).is_open("/metrics")

"""The API key file followed as it changes: a Kubernetes secret's rotation, a reload
that fails, a worker that never read it (fails closed)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
import pytest

from service import metrics
from service.api.auth import ApiKeys, KeyFileWatch
from service.errors import ApiKeysUnavailable, Unauthenticated
from tests.helpers.secrets import MountedSecret

ENV_KEY = "key-from-the-variable"


def gauge() -> float | None:
    return metrics.REGISTRY.get_sample_value("cnnserve_api_keys_file_ok")


def accepts(keys: ApiKeys, key: str) -> bool:
    try:
        keys.check(key)
    except Unauthenticated:
        return False
    return True


def watched(path: Path) -> tuple[ApiKeys, KeyFileWatch]:
    keys = ApiKeys([ENV_KEY])
    keys.fail_closed([ENV_KEY])  # as the app builds them, until the first read
    return keys, KeyFileWatch(path, frozenset({ENV_KEY}), keys)


def test_every_worker_takes_the_rotated_keys(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each worker read the file once, at its start: after a rotation a respawned one
    knew only the new key and its siblings only the old (auth at random), and without a
    restart the old key worked for good."""
    secret = MountedSecret(tmp_path, "old-key\n")
    workers = [watched(secret.path), watched(secret.path)]
    for _, watch in workers:
        watch.load()
    caplog.set_level(logging.INFO, logger="service.api.auth")
    for _, watch in workers:
        watch.load()  # nothing changed: nothing read, nothing said
    assert caplog.records == []

    secret.rotate("# rotated\nnew-key\n")
    for keys, watch in workers:
        watch.load()
        assert accepts(keys, "new-key") and accepts(keys, ENV_KEY)
        assert not accepts(keys, "old-key")
    assert [r.getMessage() for r in caplog.records] == [
        f"API keys reloaded from {secret.path}: 1 key(s)"
    ] * 2
    assert gauge() == 1


def test_a_reload_that_fails_keeps_the_last_keys_and_says_each_problem_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = MountedSecret(tmp_path, "good-key\n")
    keys, watch = watched(secret.path)
    watch.load()
    caplog.set_level(logging.INFO, logger="service.api.auth")
    secret.point_nowhere()
    for _ in range(3):
        watch.load()
        assert accepts(keys, "good-key") and gauge() == 0
    secret.rotate("")  # mounted before it was filled
    watch.load()
    watch.load()
    secret.rotate("my new keys, all of them\n")  # a comment without its #
    watch.load()
    assert accepts(keys, "good-key") and gauge() == 0
    secret.rotate("next-key\n")
    watch.load()
    assert accepts(keys, "next-key") and not accepts(keys, "good-key") and gauge() == 1
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines == [
        (
            "WARNING",
            f"CNNSERVE_API_KEYS_FILE {secret.path}: No such file or directory; the keys "
            "read before stay in use",
        ),
        (
            "WARNING",
            f"CNNSERVE_API_KEYS_FILE {secret.path} is set but holds no key; authentication "
            "would be off. Give at least one key, or unset it to serve without keys; the "
            "keys read before stay in use",
        ),
        (
            "WARNING",
            f"CNNSERVE_API_KEYS_FILE {secret.path} line 1: a key must be visible ASCII "
            "characters without spaces (comments are lines starting with #); the key is not "
            "shown; the keys read before stay in use",
        ),
        ("INFO", f"API keys reloaded from {secret.path}: 1 key(s)"),
    ]
    assert "all of them" not in caplog.text


def test_a_worker_that_never_read_the_file_fails_closed_until_it_does(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker respawned while the file could not be read failed to start, again and
    again, a traceback each time. Now it starts and refuses what needs a key, 503 and
    retryable (a 401 would tell a client its good key was wrong); the variable's keys,
    known for sure, still pass."""
    path = tmp_path / "keys"
    keys, watch = watched(path)
    with pytest.raises(ValueError, match="No such file"):
        watch.load(may_fail=False)  # a first start, or a SIGHUP restart: it stops
    caplog.set_level(logging.INFO, logger="service.api.auth")
    watch.load()
    watch.load()
    assert keys.enabled and gauge() == 0
    for presented in (None, "", "any-key"):
        with pytest.raises(ApiKeysUnavailable) as refused:
            keys.check(presented)
        error = refused.value
        assert (error.code, error.http_status, error.grpc_code) == (
            "api_keys_unavailable",
            503,
            grpc.StatusCode.UNAVAILABLE,
        )
        assert error.retry_after and "CNNSERVE_API_KEYS_FILE" in error.public_message()
        assert str(path) not in error.public_message()  # the server's own paths stay its own
    keys.check(ENV_KEY)
    [line] = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert line == (
        "ERROR",
        f"CNNSERVE_API_KEYS_FILE {path}: No such file or directory; requests that need a "
        "key get 503 api_keys_unavailable until it reads",
    )

    path.write_text("file-key\n")
    watch.load()
    keys.check("file-key")
    with pytest.raises(Unauthenticated) as wrong:
        keys.check("any-key")
    assert wrong.value.http_status == 401 and gauge() == 1


def test_the_follower_checks_every_period(tmp_path: Path) -> None:
    secret = MountedSecret(tmp_path, "old-key\n")
    keys, watch = watched(secret.path)
    watch.load()

    async def scenario() -> None:
        following = asyncio.create_task(watch.follow(0.01))
        secret.rotate("new-key\n")
        while not accepts(keys, "new-key"):
            await asyncio.sleep(0.01)
        following.cancel()

    asyncio.run(asyncio.wait_for(scenario(), 10))
    assert not accepts(keys, "old-key")

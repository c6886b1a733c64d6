"""The demo page's routes on a real server: the page and its files, the model list, a
version's card and PNGs (nothing else of its folder is reachable), samples; and
CNNSERVE_DEMO_PAGE=false. The page itself, in a browser, is tests/e2e/."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.api.app import create_app
from service.config import Settings
from tests.helpers.images import encode, gradient
from tests.helpers.in_process import serving_in_process
from tests.helpers.models import tiny_repository
from tests.helpers.server import Server, running_server

SECRET = b"outside assets.extra"
VERSION = "/demo/models/tiny/versions/1"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny repository, its version with a plot and a link to a file outside."""
    root = tmp_path_factory.mktemp("demo")
    repo = tiny_repository(root)
    extra = repo / "tiny" / "1" / "assets.extra"
    (extra / "curves.png").write_bytes(encode(gradient(), "PNG"))
    (root / "secret.png").write_bytes(SECRET)
    (extra / "link.png").symlink_to(root / "secret.png")
    (repo / "tiny" / "secret.png").write_bytes(SECRET)
    return repo


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[Server]:
    with running_server(repo) as started:
        yield started


def test_the_page_and_its_files(server: Server) -> None:
    with server.client() as client:
        page = client.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert 'src="/demo/static/demo.js"' in page.text
        assert 'href="/demo/static/demo.css"' in page.text
        assert "http" not in page.text.replace("http-equiv", "")  # nothing from elsewhere
        for name, media_type in (("demo.js", "text/javascript"), ("demo.css", "text/css")):
            answer = client.get(f"/demo/static/{name}")
            assert answer.status_code == 200
            assert answer.headers["content-type"].startswith(media_type)
            # Revalidated, not downloaded again (no-cache makes the browser ask each time).
            etag = answer.headers["etag"]
            again = client.get(f"/demo/static/{name}", headers={"if-none-match": etag})
            assert again.status_code == 304 and again.content == b""
            assert client.get(f"/demo/static/{name}", headers={"if-none-match": '"x"'}).content
        for name in ("index.html", "..%2Fdemo.py", "nope.js"):
            assert client.get(f"/demo/static/{name}").status_code == 404, name


def test_models_lists_the_served_versions_and_links(server: Server) -> None:
    with server.client() as client:
        assert client.get("/demo/models").json() == {
            "default_model": "tiny",
            "models": [{"name": "tiny", "versions": [1], "labels": {}}],
            "links": {"docs": "/docs", "metrics": "/metrics"},
        }


def test_the_card_and_its_images(server: Server, repo: Path) -> None:
    with server.client() as client:
        answer = client.get(f"{VERSION}/card").json()
        assert (answer["model"], answer["version"]) == ("tiny", 1)
        assert answer["card"]["labels"] == ["cat", "dog", "bird"]
        assert answer["images"] == ["curves.png"]  # the link is not listed
        # Which artifact answers: a float model, by LiteRT (converted, verified) or TF.
        assert answer["serving"]["precision"] == "float32"
        assert answer["serving"]["runtime"] in {"litert", "tensorflow"}
        image = client.get(f"{VERSION}/assets/curves.png")
        assert image.status_code == 200
        assert image.headers["content-type"] == "image/png"
        assert image.content == (repo / "tiny" / "1" / "assets.extra" / "curves.png").read_bytes()


@pytest.mark.parametrize(
    "name",
    [
        "link.png",  # a link out of the folder
        "labels.txt",
        "model_card.json",
        "tf_serving_warmup_requests",
        "..%2Fsaved_model.pb",
        "%2E%2E%2F..%2Fsecret.png",
        "..%2F..%2F..%2Fsecret.png",
        "..%5C..%5Csecret.png",
        "%2Fetc%2Fpasswd",
        "..",
        ".",
    ],
)
def test_nothing_else_of_the_version_folder_is_reachable(server: Server, name: str) -> None:
    with server.client() as client:
        answer = client.get(f"{VERSION}/assets/{name}")
    assert answer.status_code == 404, answer.text
    assert SECRET not in answer.content
    assert answer.json()["error"]["code"] in {"not_found", "model_not_found"}


def test_unknown_models_and_versions_are_the_api_errors(server: Server) -> None:
    with server.client() as client:
        assert client.get("/demo/models/nope/versions/1/card").json()["error"]["code"] == (
            "model_not_found"
        )
        for path in ("card", "samples", "assets/curves.png"):
            answer = client.get(f"/demo/models/tiny/versions/7/{path}")
            assert answer.json()["error"]["code"] == "version_not_found", path
        assert client.get("/demo/models/tiny/versions/x/card").status_code == 400


def test_a_version_without_dataset_or_varied_warmup_has_no_samples(server: Server) -> None:
    """The tiny model's warmup images are uniform grey; service.samples is unit-tested."""
    with server.client() as client:
        assert client.get(f"{VERSION}/samples").json() == {"about": "", "samples": []}
        assert client.get(f"{VERSION}/samples/0.png").status_code == 404


@pytest.mark.parametrize("enabled", [True, False])
def test_the_setting_turns_the_page_off(tmp_path: Path, enabled: bool) -> None:
    """In-process, without the lifespan: nothing is loaded and nothing needs to be."""
    app = create_app(Settings(model_repository=tmp_path, demo_page=enabled))

    async def status(path: str) -> int:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://demo") as client:
            return (await client.get(path)).status_code

    expected = 200 if enabled else 404
    for path in ("/", "/demo/static/demo.js"):
        assert asyncio.run(status(path)) == expected, path


def test_an_image_the_server_cannot_read_is_a_404_not_a_cut_off_200(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FileResponse sent 200 and the length, then met the unreadable file: a traceback
    in the log and an empty body on a closed connection (an outside review, chmod 000)."""
    read_bytes = Path.read_bytes

    def unreadable(path: Path) -> bytes:
        if path.name == "curves.png":
            raise PermissionError(13, "Permission denied")
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", unreadable)
    settings = Settings(model_repository=repo, grpc_port=0, poll_seconds=0)
    with serving_in_process(settings) as port:
        answer = httpx.get(f"http://127.0.0.1:{port}{VERSION}/assets/curves.png")
    assert answer.status_code == 404, answer.text
    assert "cannot be read on the server" in answer.json()["error"]["message"]

"""The demo page in a real headless browser (Debian's chromium driven by playwright)
against a real server of the committed default model.

Every test fails on a JavaScript error or console error the page did not expect, and on
any request that leaves the server's origin (the page must work offline). Screenshots
are written to reports/e2e/ (git-ignored) for a person to look at.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, Route, expect, sync_playwright

from tests.helpers.browser import chromium_path
from tests.helpers.models import publish_tiny, simple_config, write_models_config
from tests.helpers.server import ROOT, Server, eventually, running_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SCREENSHOTS = ROOT / "reports" / "e2e"
TEST_IMAGE = ROOT / "docs" / "samples" / "ankle_boot.png"  # a Fashion-MNIST test image
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"><rect width="8"/></svg>'


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    # What is tested is the page, not admission. With the default queue-wait budget
    # (80 ms of work ahead) a worker starved by the tests beside it may refuse: in one
    # fresh-clone run (12-07) two of the page's own loads were answered 503 while it
    # opened, and the watch over its console counted them as problems.
    env = {"CNNSERVE_QUEUE_WAIT_BUDGET_SECONDS": "30"}
    with running_server(ROOT / "model_repository", env=env) as started:
        yield started


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium_path(), headless=True)
        yield launched
        launched.close()


@dataclass
class Watched:
    """What the page logged, threw or requested, for the checks after each test."""

    page: Page
    origin: str
    problems: list[str] = field(default_factory=list)
    # "Failed to load resource" lines for statuses a test provokes on purpose.
    expected_statuses: set[int] = field(default_factory=set)

    def on_console(self, kind: str, text: str) -> None:
        failed = re.match(r"Failed to load resource: .* status of (\d+)", text)
        if kind == "error" and not (failed and int(failed.group(1)) in self.expected_statuses):
            self.problems.append(f"console {kind}: {text}")

    def on_request(self, url: str) -> None:
        if not url.startswith((self.origin + "/", "blob:", "data:")):
            self.problems.append(f"request to another origin: {url}")

    def shot(self, name: str) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=SCREENSHOTS / f"{name}.png", full_page=True)


def open_page(
    browser: Browser, server: Server, viewport: dict[str, int], samples: int | None = 6
) -> Iterator[Watched]:
    context = browser.new_context(viewport=viewport)  # type: ignore[arg-type]
    page = context.new_page()
    watched = Watched(page, server.url)
    page.on("console", lambda m: watched.on_console(m.type, m.text))
    page.on("pageerror", lambda e: watched.problems.append(f"uncaught: {e}"))
    page.on("request", lambda r: watched.on_request(r.url))
    page.goto(server.url + "/")
    if samples is not None:
        expect(page.locator("#samples li")).to_have_count(samples)
    yield watched
    context.close()
    assert watched.problems == []


@pytest.fixture
def desktop(browser: Browser, server: Server) -> Iterator[Watched]:
    yield from open_page(browser, server, DESKTOP)


@pytest.fixture
def phone(browser: Browser, server: Server) -> Iterator[Watched]:
    yield from open_page(browser, server, PHONE)


def expect_five_bars(page: Page, top: str) -> None:
    predictions = page.locator("#predictions .prediction")
    expect(predictions).to_have_count(5)
    expect(page.locator("#predictions .bar .fill")).to_have_count(5)
    expect(predictions.first.locator(".name")).to_have_text(top)
    for text in predictions.locator(".pct").all_inner_texts():
        assert re.fullmatch(r"[<>]?\d{1,3}\.\d\d%", text), text


def test_an_uploaded_test_image_gets_its_label_bars_and_latency(desktop: Watched) -> None:
    page = desktop.page
    page.get_by_label("Choose an image").set_input_files(TEST_IMAGE)
    expect_five_bars(page, "Ankle boot")
    fill, bar = page.locator("#predictions .fill").first, page.locator("#predictions .bar").first
    assert fill.evaluate("e => e.offsetWidth") > 0.9 * bar.evaluate("e => e.offsetWidth")
    expect(page.locator("#preview")).to_be_visible()
    timing = page.locator("#timing").inner_text()
    for stage in ("decode", "queue", "inference", "round trip"):
        assert re.search(rf"{stage}\s+\d+\.\d+ ms", timing), timing
    expect(page.locator("#status")).to_have_text("fashion_mnist, version 1")
    expect(page.locator("#domain-note")).to_contain_text("white backgrounds")
    expect(page.get_by_role("link", name="API docs")).to_have_attribute("href", "/docs")
    expect(page.get_by_role("link", name="Metrics")).to_have_attribute("href", "/metrics")
    # Every form control has a label a screen reader can announce.
    unlabelled = page.evaluate(
        "[...document.querySelectorAll('input, select')]"
        ".filter(e => !e.labels.length).map(e => e.id)"
    )
    assert unlabelled == []
    desktop.shot("desktop-classified")


def test_an_svg_upload_shows_the_415_message(desktop: Watched, tmp_path: Path) -> None:
    desktop.expected_statuses.add(415)
    svg = tmp_path / "drawing.svg"
    svg.write_bytes(SVG)
    page = desktop.page
    page.get_by_label("Choose an image").set_input_files(svg)
    error = page.get_by_role("alert")
    # First what a person can do, in the page's words; then the API's, for developers.
    expect(error).to_contain_text("That file is not an image this service reads")
    expect(error).to_contain_text("415 unsupported_media_type")
    expect(error).to_contain_text("unsupported content type 'image/svg+xml'")
    expect(page.locator("#predictions .prediction")).to_have_count(0)
    desktop.shot("desktop-svg-error")


def test_phone_width_keyboard_only_sample_and_model_card(phone: Watched) -> None:
    page = phone.page
    # Tab from the top of the page reaches every control, in reading order.
    reached = []
    for _ in range(16):
        page.keyboard.press("Tab")
        focused = "document.activeElement.id || document.activeElement.ariaLabel"
        reached.append(page.evaluate(focused))
    for control in ("model", "version", "file", "Sample: Ankle boot (Fashion-MNIST test image 0)"):
        assert control in reached, reached
    page.get_by_role("button", name=re.compile("^Sample: Trouser")).focus()
    page.keyboard.press("Enter")
    expect_five_bars(page, "Trouser")
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    phone.shot("phone-classified")

    page.get_by_role("link", name="Model card").focus()
    page.keyboard.press("Enter")
    card = page.locator("#model-card")
    expect(card.locator("h2")).to_have_text("Model card: fashion_mnist, version 1")
    expect(card).to_contain_text("efficient_cnn")
    expect(card).to_contain_text("93.52%")
    expect(card.locator("#per-class tbody tr")).to_have_count(10)
    images = card.locator("#card-images img")
    expect(images).to_have_count(2)
    page.wait_for_function(
        "() => [...document.querySelectorAll('#card-images img')]"
        ".every(i => i.complete && i.naturalWidth > 100)"
    )
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    phone.shot("phone-model-card")


def test_sends_the_api_key_and_shows_401_and_503_as_the_api_states_them(desktop: Watched) -> None:
    """API keys are not enforced by the server yet: the classify route answers as a
    server with keys (or an overloaded one) would."""
    desktop.expected_statuses.update({401, 503})
    page = desktop.page
    seen: list[str | None] = []
    answers = [
        (401, {}, "unauthorized", "missing or invalid API key; send Authorization: Bearer <key>"),
        (503, {"Retry-After": "2"}, "overloaded", "the queue is full; retry shortly"),
    ]

    def answer(route: Route) -> None:
        seen.append(route.request.headers.get("authorization"))
        status, headers, code, message = answers[len(seen) - 1]
        body = json.dumps({"error": {"code": code, "message": message}})
        route.fulfill(status=status, headers=headers, content_type="application/json", body=body)

    page.route("**/v1/classify*", answer)
    upload = page.get_by_label("Choose an image")
    upload.set_input_files(TEST_IMAGE)
    error = page.get_by_role("alert")
    expect(error).to_contain_text("401 unauthorized: missing or invalid API key")
    key = page.get_by_label("API key")
    expect(key).to_be_focused()
    key.fill("secret")
    key.press("Enter")
    expect(page.locator("#model option")).to_have_count(1)
    upload.set_input_files([])
    upload.set_input_files(TEST_IMAGE)
    expect(error).to_contain_text("503 overloaded: the queue is full; retry shortly")
    expect(error).to_contain_text("retry in 2 s")
    assert seen == [None, "Bearer secret"]
    desktop.shot("desktop-503-retry")


# Builds a File from a sample's PNG and hands it to the page as a drop or a paste would.
GIVE_FILE = """async ([kind, url]) => {
  const blob = await (await fetch(url)).blob();
  const data = new DataTransfer();
  data.items.add(new File([blob], `${kind}.png`, { type: "image/png" }));
  const init = { bubbles: true, cancelable: true };
  if (kind === "dropped") {
    const drop = document.getElementById("drop");
    drop.dispatchEvent(new DragEvent("dragover", { ...init, dataTransfer: data }));
    drop.dispatchEvent(new DragEvent("drop", { ...init, dataTransfer: data }));
  } else {
    document.dispatchEvent(new ClipboardEvent("paste", { ...init, clipboardData: data }));
  }
}"""


def test_drop_and_paste_on_a_chosen_version(desktop: Watched) -> None:
    page = desktop.page
    asked: list[str] = []
    page.on("request", lambda r: asked.append(r.url) if "/v1/classify" in r.url else None)
    page.get_by_label("Version or label").select_option(label="version 1")
    samples = "/demo/models/fashion_mnist/versions/1/samples"
    page.evaluate(GIVE_FILE, ["dropped", f"{samples}/2.png"])  # a Trouser
    expect_five_bars(page, "Trouser")
    expect(page.locator("#preview-caption")).to_contain_text("dropped.png")
    page.evaluate(GIVE_FILE, ["pasted", f"{samples}/5.png"])  # a Sandal
    expect_five_bars(page, "Sandal")
    expect(page.locator("#preview-caption")).to_contain_text("pasted.png")
    assert len(asked) == 2
    assert all("model=fashion_mnist&version=1" in url for url in asked), asked


def test_a_version_loaded_while_the_page_is_open_shows_once_it_answers(
    browser: Browser, tmp_path: Path
) -> None:
    """Hot reload under an open page: it read the model's versions when it opened; when
    another version answers than the one its choice ("newest") meant, it reads them
    again, so the version list and everything asked per version (samples, the card)
    follow the new version without reloading the page."""
    repo = tmp_path / "repo"
    publish_tiny(repo, "m", seed=1)
    write_models_config(repo, simple_config("m"))
    with (
        running_server(repo, args=("--poll-seconds", "0.2")) as server,
        contextmanager(open_page)(browser, server, DESKTOP, samples=None) as watched,
        server.client() as client,
    ):
        page = watched.page
        expect(page.locator("#version option")).to_have_text(
            ["default: newest (version 1)", "version 1"]
        )
        page.get_by_label("Choose an image").set_input_files(TEST_IMAGE)
        expect(page.locator("#status")).to_have_text("m, version 1")

        publish_tiny(repo, "m", seed=2)

        def newest_is_2() -> bool:
            answer = client.post(
                "/v1/classify",
                content=TEST_IMAGE.read_bytes(),
                headers={"content-type": "image/png"},
            )
            return bool(answer.status_code == 200 and answer.json()["version"] == 2)

        eventually(newest_is_2)
        page.get_by_label("Choose an image").set_input_files(TEST_IMAGE)
        expect(page.locator("#status")).to_have_text("m, version 2")
        expect(page.locator("#version option", has_text=re.compile("^version 2$"))).to_have_count(1)
        expect(page.locator("#version option").first).to_have_text("default: newest (version 2)")
        expect(page.locator("#version")).to_have_value("")  # still the default


def test_the_default_choice_is_the_version_the_server_answers(
    browser: Browser, tmp_path: Path
) -> None:
    """With a stable label the server answers a request naming no version from stable,
    not the newest: the page's default says so, and an answer from stable is not taken
    for a changed repository (the page reread every list after each classification)."""
    repo = tmp_path / "repo"
    publish_tiny(repo, "m", seed=1)
    publish_tiny(repo, "m", seed=2)
    write_models_config(
        repo,
        simple_config(
            "m",
            policy="specific { versions: 1 versions: 2 }",
            labels={"stable": 1, "canary": 2},
        ),
    )
    with (
        running_server(repo, args=("--poll-seconds", "0")) as server,
        contextmanager(open_page)(browser, server, DESKTOP, samples=None) as watched,
    ):
        page = watched.page
        expect(page.locator("#version option").first).to_have_text("default: stable (version 1)")
        listed: list[str] = []
        page.on("request", lambda r: listed.append(r.url) if "/demo/models" in r.url else None)
        for _ in range(3):
            page.get_by_label("Choose an image").set_input_files(TEST_IMAGE)
            expect(page.locator("#status")).to_have_text("m, version 1")
            page.locator("#status").evaluate("node => node.textContent = ''")
        assert [url for url in listed if url.endswith("/demo/models")] == []


def test_a_classification_error_stays_while_the_page_polls_for_versions(
    browser: Browser, tmp_path: Path
) -> None:
    """No version yet (a TF Serving backend that does not answer): the page polls for
    versions every 2 s, and each poll cleared the classification's 503 and its
    Retry-After within that time."""
    repo = tmp_path / "repo"
    publish_tiny(repo, "m", seed=1)
    write_models_config(repo, simple_config("m"))
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        nowhere = f"127.0.0.1:{free.getsockname()[1]}"
    args = ("--poll-seconds", "0.5", "--backend", "tfserving", "--tfserving-address", nowhere)
    with (
        running_server(repo, args=args, wait_ready=False) as server,
        contextmanager(open_page)(browser, server, DESKTOP, samples=None) as watched,
    ):
        watched.expected_statuses.add(503)
        page = watched.page
        page.get_by_label("Choose an image").set_input_files(TEST_IMAGE)
        expect(page.locator("#error")).to_contain_text("503")
        with page.expect_response(lambda r: r.url.endswith("/demo/models"), timeout=15_000):
            pass  # a poll after the error was shown, answered
        page.wait_for_load_state("networkidle")
        expect(page.locator("#error")).to_contain_text("503")
        # The model card says there is no version yet (it read "Loading…" for good).
        page.evaluate("location.hash = '#model-card'")
        expect(page.locator("#card-body")).to_contain_text("m has no available version yet")


def test_with_api_keys_the_whole_card_opens_with_the_key(browser: Browser) -> None:
    """The card's JSON link was a plain link: no Authorization header, a 401 page."""
    env = {"CNNSERVE_API_KEYS": "secret"}
    with running_server(ROOT / "model_repository", env=env) as keyed:
        opened = open_page(browser, keyed, DESKTOP, samples=None)
        watched = next(opened)
        watched.expected_statuses.add(401)
        page = watched.page
        key = page.get_by_label("API key")
        key.fill("secret")
        key.press("Enter")
        expect(page.locator("#model option")).to_have_count(1)
        page.get_by_role("link", name="Model card").click()
        link = page.get_by_role("link", name="The whole card as JSON")
        expect(link).to_be_visible()
        with page.context.expect_page() as popup:
            link.click()
        shown = popup.value
        shown.wait_for_load_state()
        card = json.loads(shown.locator("body").inner_text())
        assert card["card"]["labels"][9] == "Ankle boot" and card["version"] == 1
        with pytest.raises(StopIteration):
            next(opened)  # closes the page, checking it logged no unexpected problem

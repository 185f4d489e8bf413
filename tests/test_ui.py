"""The web page at /ui in a real browser (Debian's chromium driven by Playwright) against the
real service: upload a song, follow the job to 100 %, play a stem. Also /docs, offline.
Screenshots go to `test-artifacts/` (or $SERVE_GRAPH_TEST_ARTIFACTS)."""
import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

import pytest

from audio_files import encode, tone
from serve_process import tiny_service

pytestmark = pytest.mark.serve
SONG_SECONDS = 4.0
ARTIFACTS = Path(os.environ.get("SERVE_GRAPH_TEST_ARTIFACTS",
                                Path(__file__).resolve().parents[1] / "test-artifacts"))


def chromium_path() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which(
        "chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs it (apt-get install chromium)")
        pytest.skip("no chromium here (apt-get install chromium); CI runs this test")
    return path


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_repo):
    server = tiny_service(tmp_path_factory.mktemp("ui"), tiny_repo)
    yield server.url
    server.kill()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium_path(), headless=True,
            args=["--autoplay-policy=no-user-gesture-required", "--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    """A page that records every host it requests over the network (blob: URLs are the
    page's own stems)."""
    page = browser.new_page(viewport={"width": 1000, "height": 1100})
    page.hosts = set()
    page.on("request", lambda request: page.hosts.add(urlparse(request.url).hostname)
            if request.url.startswith(("http:", "https:", "ws:", "wss:")) else None)
    yield page
    page.close()


def test_upload_follow_progress_and_play_a_stem(service, page, tmp_path):
    ARTIFACTS.mkdir(exist_ok=True)
    song = tmp_path / "my song.mp3"
    song.write_bytes(encode(tone(SONG_SECONDS, 44100, 2, seed=8), 44100, "mp3"))
    page.goto(service + "/ui")
    page.wait_for_selector("#model option", state="attached")
    assert page.locator("#model").input_value() == "htdemucs"
    assert page.locator("#stems input").count() == 4
    page.set_input_files("#file", str(song))
    page.uncheck("#stems input[value=other]")
    page.click("#go")
    page.wait_for_function("document.getElementById('progress').value > 0", timeout=120_000)
    page.screenshot(path=str(ARTIFACTS / "ui_progress.png"))
    page.wait_for_function("document.getElementById('progress').value === 1", timeout=120_000)
    page.wait_for_selector(".stem audio")
    assert page.locator("#error").text_content() == ""
    names = page.locator(".stem strong").all_text_contents()
    assert names == ["drums.mp3", "bass.mp3", "vocals.mp3"]
    duration = page.evaluate("""async () => {
        const audio = document.querySelector('.stem audio');
        await audio.play();
        await new Promise((done) => setTimeout(done, 500));
        return {duration: audio.duration, time: audio.currentTime, paused: audio.paused};
    }""")
    assert abs(duration["duration"] - SONG_SECONDS) < 0.1, duration
    assert duration["time"] > 0 and not duration["paused"], duration  # it plays
    page.wait_for_function("[...document.querySelectorAll('.stem canvas')].every("
                           "(c) => c.width > 0)")
    page.screenshot(path=str(ARTIFACTS / "ui_done.png"), full_page=True)
    assert page.hosts == {"127.0.0.1"}  # nothing from elsewhere


def test_docs_render_offline(service, page):
    page.goto(service + "/docs")
    page.wait_for_selector(".swagger-ui .info .title", timeout=30_000)
    assert "Stem separation" in page.locator(".swagger-ui .info .title").text_content()
    page.wait_for_selector("#operations-default-separate_separate_post, .opblock-tag",
                           timeout=30_000)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "docs.png"))
    assert page.hosts == {"127.0.0.1"}

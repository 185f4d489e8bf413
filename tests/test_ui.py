"""The web page at /ui in a real browser (Debian's chromium driven by Playwright) against the
real service: upload a song, follow the job to 100 %, play the stems together with mute, solo
and gain (checked in the page's Web Audio graph), download the mix as heard (a remix job), find
both jobs again after a reload and open them.
Also /docs, offline.
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
    server = tiny_service(tmp_path_factory.mktemp("ui"), tiny_repo,
                          args={"models": ["tinyroformer"]})
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


def test_upload_follow_progress_and_play_the_stems_together(service, page, tmp_path):
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
    page.wait_for_selector("#transport #play")
    assert page.locator("#error").text_content() == ""
    names = page.locator(".stem strong").all_text_contents()
    assert names == ["drums.mp3", "bass.mp3", "vocals.mp3"]
    play_mix_with_mute_solo_and_gain(page)
    download_the_mix(page)
    page.wait_for_function("[...document.querySelectorAll('.stem canvas')].every("
                           "(c) => c.width > 0)")
    page.screenshot(path=str(ARTIFACTS / "ui_done.png"), full_page=True)
    reopen_the_job_after_a_reload(page)
    assert page.hosts == {"127.0.0.1"}  # nothing from elsewhere


def reopen_the_job_after_a_reload(page) -> None:
    """A page reloaded (or the tab closed and opened again) lists this client's jobs, newest
    first: the mix's job, then the stems'; the stems' one opens in the player again (without
    "Download this mix": the page no longer holds the song), the mix's as its one file."""
    page.reload()
    page.wait_for_selector("#jobs li", timeout=30_000)
    rows = page.locator("#jobs li").all_text_contents()
    assert len(rows) == 2 and all(row.startswith("my song — htdemucs — done") for row in rows)
    page.locator("#jobs li").nth(1).locator(".open").click()
    page.wait_for_selector("#transport #play", timeout=60_000)
    assert page.locator(".stem strong").all_text_contents() == ["drums.mp3", "bass.mp3",
                                                                "vocals.mp3"]
    assert page.locator("#mixdown").is_hidden() and page.locator("#error").text_content() == ""
    page.locator("#jobs li").nth(0).locator(".open").click()
    page.wait_for_selector("#results a[download='my song_remix.mp3']", timeout=60_000)


def test_a_running_job_is_cancelled_and_an_ended_one_deleted(service, page, tmp_path):
    """"Cancel this job" while it runs stops it (the page says so, the list shows it
    cancelled); "Delete" on an ended job forgets it on the service (404 from then on) and
    takes it off the list."""
    song = tmp_path / "long song.mp3"
    song.write_bytes(encode(tone(60.0, 44100, 2, seed=10), 44100, "mp3"))
    page.goto(service + "/ui")
    page.wait_for_selector("#model option", state="attached")
    page.set_input_files("#file", str(song))
    page.fill("#shifts", "6")  # ~490 windows: within the service's budget of 600
    page.click("#go")
    page.wait_for_function("document.getElementById('progress').value > 0 || "
                           "document.getElementById('error').textContent", timeout=120_000)
    assert page.locator("#error").text_content() == ""
    page.click("#cancel")
    page.wait_for_function("document.getElementById('error').textContent !== ''",
                           timeout=60_000)
    assert page.locator("#error").text_content() == "the job cancelled"
    assert page.locator("#cancel").is_hidden() and page.locator("#progress").evaluate(
        "(bar) => bar.value") < 1
    row = page.locator("#jobs li", has_text="long song")
    row.filter(has_text="cancelled").wait_for(timeout=30_000)
    job_url = page.evaluate("""async () => (await (await fetch('/jobs?limit=10')).json())
        .jobs.find((job) => job.song === 'long song').status_url""")
    row.locator(".delete").click()
    row.wait_for(state="detached", timeout=30_000)
    assert page.evaluate("async (url) => (await fetch(url)).status", job_url) == 404
    assert page.locator("#error").text_content() == ""  # the delete answered 200


def test_a_roformer_model_offers_its_own_stems(service, page, tmp_path):
    """Picking a RoFormer shows its stems (the target and the instrumental) and separates
    with it."""
    song = tmp_path / "song.wav"
    song.write_bytes(encode(tone(2.0, 44100, 2, seed=9), 44100, "wav16"))
    page.goto(service + "/ui")
    page.wait_for_selector("#model option[value=tinyroformer]", state="attached")
    page.select_option("#model", "tinyroformer")
    assert [box.get_attribute("value") for box in page.locator("#stems input").all()] == [
        "vocals", "instrumental"]
    page.set_input_files("#file", str(song))
    page.click("#go")
    page.wait_for_selector("#transport #play", timeout=120_000)
    assert page.locator("#error").text_content() == ""
    assert page.locator(".stem strong").all_text_contents() == ["vocals.mp3",
                                                                "instrumental.mp3"]


def mixer_state(page) -> dict:
    return page.evaluate("({gains: mixer.gains(), playing: mixer.playing, "
                         "position: mixer.position(), duration: mixer.duration})")


def set_gain(page, stem: str, db: int) -> None:
    page.evaluate("""([stem, db]) => {
        const row = [...document.querySelectorAll('.stem')].find(
            (r) => r.querySelector('strong').textContent === stem);
        const range = row.querySelector('.gain');
        range.value = db;
        range.dispatchEvent(new Event('input'));
    }""", [stem, db])


def stem_control(page, stem: str, control: str):
    return page.locator(".stem", has=page.locator(f"strong:text-is('{stem}')")).locator(
        f".{control}")


def play_mix_with_mute_solo_and_gain(page) -> None:
    """One transport plays every stem; mute, solo and gain set each stem's GainNode."""
    state = mixer_state(page)
    assert abs(state["duration"] - SONG_SECONDS) < 0.1 and not state["playing"], state
    assert state["gains"] == {"drums.mp3": 1, "bass.mp3": 1, "vocals.mp3": 1}
    page.click("#play")
    page.wait_for_function("mixer.playing && mixer.position() > 0.3", timeout=10_000)
    assert page.locator("#play").text_content() == "Pause"
    stem_control(page, "drums.mp3", "mute").check()
    assert mixer_state(page)["gains"] == {"drums.mp3": 0, "bass.mp3": 1, "vocals.mp3": 1}
    stem_control(page, "vocals.mp3", "solo").check()
    set_gain(page, "vocals.mp3", -6)
    gains = mixer_state(page)["gains"]
    assert gains["drums.mp3"] == gains["bass.mp3"] == 0
    assert abs(gains["vocals.mp3"] - 10 ** (-6 / 20)) < 1e-3, gains
    page.click("#play")
    state = mixer_state(page)
    assert not state["playing"] and 0.3 < state["position"] <= SONG_SECONDS, state


def download_the_mix(page) -> None:
    """"Download this mix" asks the service for the remix of what is audible: the vocals at
    -6 dB, every other source of the model (other was not separated) left out."""
    page.click("#mixdown")
    page.wait_for_selector("#mixfile", timeout=120_000)
    link = page.locator("#mixfile")
    assert link.get_attribute("download") == "my song_remix.mp3"
    assert link.get_attribute("data-remix") == "drums=-inf,bass=-inf,other=-inf,vocals=-6"
    seconds = page.evaluate("""async () => {
        const data = await (await fetch(document.getElementById('mixfile').href)).arrayBuffer();
        return (await new AudioContext().decodeAudioData(data)).duration;
    }""")
    assert abs(seconds - SONG_SECONDS) < 0.1, seconds
    assert page.locator("#error").text_content() == ""


def test_docs_render_offline(service, page):
    page.goto(service + "/docs")
    page.wait_for_selector(".swagger-ui .info .title", timeout=30_000)
    assert "Stem separation" in page.locator(".swagger-ui .info .title").text_content()
    page.wait_for_selector("#operations-default-separate_separate_post, .opblock-tag",
                           timeout=30_000)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "docs.png"))
    assert page.hosts == {"127.0.0.1"}

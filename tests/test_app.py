"""The web page (``muvi demo``): its work apart from Gradio, and the page in a real browser.

The browser test drives Debian's Chromium (``/usr/bin/chromium``, installed by ``.ci/run``)
with Playwright pointed at it, as a user would: upload the sample clip, press Generate, wait
for a playable video and the beat plot. It saves a screenshot beside the test's files.
"""
from __future__ import annotations

import shutil
import socket
from pathlib import Path

import av
import pytest
from PIL import Image

from muvi import bundled_sample_video
from muvi.app import Demo
from muvi.errors import InputError, MuviError

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
#: what a closed network needs (no background connections), as root (no sandbox), no screen
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def demo(tiny_release_dir, tmp_path_factory):
    return Demo(tiny_release_dir, tmp_path_factory.mktemp("demo"), device="cpu")


def test_the_page_work_makes_a_video_with_music_the_music_and_a_beat_plot(demo):
    mp4, wav, png, summary = demo.generate(None, None, 4.0, 2, 0, 2.0)  # no video: the sample clip
    with av.open(mp4) as container:
        assert [s.type for s in container.streams] == ["video", "audio"]
        assert float(container.duration / av.time_base) == pytest.approx(2.0, abs=0.1)
    import soundfile as sf

    assert sf.info(wav).duration == pytest.approx(2.0, abs=1e-3)
    assert Image.open(png).size[0] >= 600
    assert summary == "2.0 s of music for sample.mp4: cfg 4, 2 steps, seed 0"
    again = demo.generate(str(bundled_sample_video()), None, 4.0, 2, 0, 2.0)
    assert Path(again[0]) != Path(mp4) and Path(mp4).is_file()  # every run keeps its own files


def test_the_page_work_refuses_bad_input_in_one_line_naming_it(demo, tmp_path):
    broken = tmp_path / "holiday.mp4"
    broken.write_bytes(b"this is not a video")
    with pytest.raises(MuviError, match="holiday.mp4") as err:
        demo.generate(str(broken))
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="^steps=0: must be between 1 and"):
        demo.generate(None, None, 4.0, 0)
    with pytest.raises(InputError, match="^steps 2.5: must be a whole number"):
        demo.generate(None, None, 4.0, 2.5)
    with pytest.raises(InputError, match="^cfg scale=-1.0: must be >= 0"):
        demo.generate(None, None, -1.0, 2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def page_url(tmp_path_factory):
    """The page served with the bundled demo model, as ``muvi demo`` serves it."""
    if not Path(CHROMIUM).is_file():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run does)")
    from muvi.app import serve

    page, url = serve(Demo(workdir=tmp_path_factory.mktemp("page"), device="cpu"), port=_free_port(), block=False)
    yield url
    page.close()


@pytest.fixture
def browser_page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            yield browser.new_page(viewport={"width": 1400, "height": 1100})
        finally:
            browser.close()


def test_the_page_in_a_real_browser_scores_an_uploaded_clip(page_url, browser_page, tmp_path):
    page = browser_page
    page.goto(page_url)
    page.locator("#muvi-input input[type=file]").set_input_files(str(bundled_sample_video()))
    page.locator("#muvi-input video").wait_for(timeout=60_000)
    page.locator("#muvi-generate").click()
    page.locator(".progress-text").first.wait_for(timeout=30_000)  # Gradio's progress while it works
    page.locator("#muvi-output video").wait_for(timeout=240_000)
    page.locator("#muvi-plot img").wait_for(timeout=60_000)
    # playable: the browser read the muxed file's header and knows how long it lasts
    page.wait_for_function("() => { const v = document.querySelector('#muvi-output video');"
                           " return v && v.readyState >= 1 && v.duration > 0; }", timeout=60_000)
    assert page.evaluate("document.querySelector('#muvi-output video').duration") == pytest.approx(5.28, abs=0.05)
    width = page.evaluate("document.querySelector('#muvi-plot img').naturalWidth")
    assert width >= 600
    assert page.locator("#muvi-audio").count() == 1
    assert "5.3 s of music for sample.mp4: cfg 4, 25 steps, seed 0" in page.locator("#muvi-status").inner_text()
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)


def test_the_page_in_a_real_browser_shows_a_bad_file_as_one_line(page_url, browser_page, tmp_path):
    page = browser_page
    broken = tmp_path / "holiday.mp4"
    broken.write_bytes(b"this is not a video")
    page.goto(page_url)
    page.locator("#muvi-input input[type=file]").set_input_files(str(broken))
    page.locator("#muvi-generate").click()
    # the one line muvi generate prints, with the file named as the user named it
    message = page.get_by_text("holiday.mp4: not a readable video (Invalid data found when processing input)",
                               exact=True)
    message.wait_for(timeout=60_000)
    page.screenshot(path=str(tmp_path / "error.png"), full_page=True)

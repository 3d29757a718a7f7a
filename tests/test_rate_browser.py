"""The rating page in a real headless browser (Debian's chromium + chromium-driver, driven by Selenium).

The page is loaded from a server on 127.0.0.1 with a generated 40 s WAV; the test practises,
rates while the song plays (at twice the speed, to save time: the page times every sample with
the audio clock, so the ratings are the same), moves the pointer along a scripted path of held
positions, pauses, submits, and checks the ratings written (2 Hz, every value the pad position
held during that step, to one pixel, times inside the audio) and the profile. Screenshots of the
page go to ``$PDMER_TEST_ARTIFACTS`` (default ``runs/test-artifacts/``): look at them.

Skips, saying why, without selenium, chromium or chromedriver (``bash .ci/packages.sh`` installs
the last two).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[test]')")

from test_rate import SONG_S, _tiny  # noqa: E402  (the tiny run and songs, made once per session)

from pdmer.personal import load_base_model, load_profile  # noqa: E402
from pdmer.rate import RateServer, RateSession  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = Path(os.environ.get("PDMER_TEST_ARTIFACTS", REPO / "runs" / "test-artifacts"))
SPEED = 2.0  # playback rate during the test

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason=f"needs a headless browser: chromium {'found' if CHROMIUM else 'missing'}, chromedriver "
        f"{'found' if CHROMEDRIVER else 'missing'} (Debian: apt-get install chromium chromium-driver, or bash .ci/packages.sh)",
    ),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _tiny(tmp_path_factory)


@pytest.fixture(scope="module")
def base(tiny):
    return load_base_model(tiny.run)


@pytest.fixture
def driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--mute-audio",
        "--autoplay-policy=no-user-gesture-required",
        "--window-size=1280,1000",
        "--no-first-run",
        "--disable-background-timer-throttling",
        "--disable-renderer-backgrounding",
        "--disable-backgrounding-occluded-windows",
        "--disable-extensions",
        "--disable-sync",
        "--no-proxy-server",
    ):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    d.set_page_load_timeout(60)
    d.set_script_timeout(30)
    try:
        yield d
    finally:
        d.quit()


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def wait_for(d, script: str, timeout: float, what: str):
    """Poll a JS expression until it is truthy; fail naming ``what`` and the page's status line."""
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        v = d.execute_script(f"return ({script});")
        if v:
            return v
        time.sleep(0.05)
    status = d.execute_script("return document.getElementById('status').textContent")
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; page status: {status!r}")


def clock(d) -> float:
    return float(d.execute_script("return document.getElementById('audio').currentTime"))


def phase(d) -> str:
    return d.execute_script("return document.body.dataset.phase")


def click(d, button_id: str) -> None:
    """Press a page button without moving the mouse (the pointer stays where it is on the pad)."""
    d.execute_script(f"document.getElementById('{button_id}').click()")


class Pad:
    """The pad's content box in viewport pixels, and pointer moves to exact pixels."""

    def __init__(self, d):
        self.d = d
        self.left, self.top, self.w, self.h = d.execute_script(
            "const p = document.getElementById('pad'); const r = p.getBoundingClientRect();"
            "return [r.left + p.clientLeft, r.top + p.clientTop, p.clientWidth, p.clientHeight];"
        )
        self.resolution = 2.0 / min(self.w, self.h)  # one pixel, in pad units

    def pixel(self, v: float, a: float) -> tuple[int, int]:
        return int(round(self.left + (v + 1) / 2 * self.w)), int(round(self.top + (1 - a) / 2 * self.h))

    def value(self, x: int, y: int) -> tuple[float, float]:
        """What the page reads at viewport pixel (x, y)."""
        return 2 * (x - self.left) / self.w - 1, 1 - 2 * (y - self.top) / self.h

    def move(self, v: float, a: float) -> tuple[float, float]:
        from selenium.webdriver.common.actions.action_builder import ActionBuilder

        x, y = self.pixel(v, a)
        ab = ActionBuilder(self.d, duration=0)
        ab.pointer_action.move_to_location(x, y)
        ab.perform()
        return self.value(x, y)


def read_ratings(path: Path) -> tuple[np.ndarray, np.ndarray]:
    lines = path.read_text().splitlines()
    assert lines[0] == "song_id,annotator_id,time_s,valence,arousal"
    rows = [r.split(",") for r in lines[1:]]
    assert {(r[0], r[1]) for r in rows} == {("song40", "P017")}
    return np.array([float(r[2]) for r in rows]), np.array([[float(r[3]), float(r[4])] for r in rows])


def no_console_errors(d) -> list[str]:
    return [e["message"] for e in d.get_log("browser") if e["level"] == "SEVERE"]


def full_page_screenshot(d, path: Path) -> None:
    height = d.execute_script("return Math.ceil(document.documentElement.scrollHeight)")
    d.set_window_size(1280, min(max(height + 40, 800), 4000))
    time.sleep(0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    d.save_screenshot(str(path))


# --------------------------------------------------------------------------------------------
# The 2-D pad, end to end
# --------------------------------------------------------------------------------------------

PATH = [(-0.6, 0.5), (0.7, 0.7), (0.2, -0.4), (-0.8, -0.8), (0.9, -0.1), (0.0, 0.9), (-0.3, 0.15), (0.5, 0.3)]


def test_rate_a_song_on_the_pad_and_calibrate(tiny, base, tmp_path, driver):
    d = driver
    ann, pred = tmp_path / "ann", tmp_path / "pred"
    session = RateSession(
        "P017", [tiny.song], predict=[tiny.other], base=base, annotators_dir=ann, out_dir=pred, practice_s=3
    )
    with RateServer(session) as server:
        d.get(server.url)
        wait_for(d, "document.body.dataset.phase === 'idle'", 30, "the page to load its session")
        body = d.find_element("tag name", "body").text
        assert "P017" in body and tiny.run.name in body  # which listener, which model
        warning = d.find_element("id", "warning")
        assert warning.is_displayed() and "synthetic benchmark only" in warning.text
        for words in ("Valence", "Arousal", "happy", "sad", "calm", "tense", "excited · energetic", "calm · sleepy"):
            assert words in body or words in d.execute_script("return document.documentElement.textContent"), words
        pad = Pad(d)
        assert pad.w >= 300 and pad.h >= 300

        # practice: the first 3 s play, the pointer is drawn, nothing is recorded
        pad.move(0.3, 0.3)
        click(d, "practice")
        wait_for(d, "document.body.dataset.phase === 'practice'", 10, "the practice to start")
        for v in (0.1, -0.2, 0.4):
            pad.move(v, -v)
            time.sleep(0.3)
        wait_for(d, "document.body.dataset.phase === 'idle'", 20, "the practice to end")
        assert d.find_element("id", "redo").get_attribute("disabled") is not None  # no recorded sample to redo
        assert clock(d) < 0.05  # back at the start

        # a false start, redone
        d.execute_script(
            f"const a = document.getElementById('audio'); a.defaultPlaybackRate = a.playbackRate = {SPEED};"
        )
        click(d, "start")
        wait_for(d, "document.getElementById('audio').currentTime > 1", 20, "the song to play")
        click(d, "redo")
        wait_for(d, "document.body.dataset.phase === 'idle'", 10, "the redo")

        # the take: hold each position of the path for 1/8 of the song, with a pause in the middle
        held = []  # (audio time after the move, audio time before the next move, value the page reads)
        pad.move(*PATH[0])
        click(d, "start")
        wait_for(d, "document.body.dataset.phase === 'recording'", 10, "the recording to start")
        t_after, value = 0.0, pad.value(*pad.pixel(*PATH[0]))
        for i, target in enumerate(PATH):
            if i:
                t_before = clock(d)
                held.append((t_after, t_before, value))
                value = pad.move(*target)
                t_after = clock(d)
            if i == 4:  # pause: the clock stops, and so does the recording
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                d.save_screenshot(str(ARTIFACTS / "rate_page_recording.png"))  # the live trace, mid-song
                click(d, "pause")
                wait_for(d, "document.body.dataset.phase === 'paused'", 5, "the pause")
                t_paused = clock(d)
                time.sleep(0.6)
                assert abs(clock(d) - t_paused) < 1e-6
                click(d, "pause")  # resume
                wait_for(d, "document.body.dataset.phase === 'recording'", 5, "the resume")
            if i + 1 < len(PATH):
                wait_for(
                    d,
                    f"document.getElementById('audio').currentTime >= {(i + 1) * SONG_S / len(PATH)}"
                    " || document.getElementById('audio').ended",
                    60,
                    f"segment {i}",
                )
        wait_for(d, "document.body.dataset.phase === 'done'", 60, "the end of the song")
        held.append((t_after, SONG_S, value))
        assert d.find_element("id", "submit").is_enabled()

        click(d, "submit")
        wait_for(d, "document.getElementById('results').dataset.ok", 240, "the calibration")
        assert d.execute_script("return document.getElementById('results').dataset.ok") == "true", d.find_element(
            "id", "results"
        ).text
        wait_for(
            d,
            "[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)",
            20,
            "the result images",
        )
        assert len(d.find_elements("css selector", "#results img")) == 2  # fit.png and the --predict song's curves
        results = d.find_element("id", "results").text
        assert "Profile saved" in results and "personal (calibrated)" in results and "other20" in results
        full_page_screenshot(d, ARTIFACTS / "rate_page_result.png")
        assert no_console_errors(d) == []  # nothing blocked by the Content-Security-Policy, nothing missing

    # the ratings: the generic layout, 2 Hz, inside the audio, each held position to one pixel
    times, values = read_ratings(ann / "P017" / "ratings.csv")
    steps = np.round(times / 0.5).astype(int)
    np.testing.assert_allclose(times, steps * 0.5, atol=1e-9)  # on the 2 Hz grid
    assert np.all(np.diff(steps) >= 1) and np.max(np.diff(steps)) <= 4  # increasing, no hole beyond 2 s
    assert times[0] <= 1.0 and times[-1] < SONG_S and len(times) >= 0.9 * SONG_S / 0.5
    checked = 0
    for t0, t1, (v, a) in held:
        inside = (times >= t0 + 0.1) & (times + 0.5 <= t1 - 0.1)  # steps wholly inside the hold
        assert inside.sum() >= 3, (t0, t1)
        np.testing.assert_allclose(values[inside, 0], v, atol=pad.resolution)
        np.testing.assert_allclose(values[inside, 1], a, atol=pad.resolution)
        checked += int(inside.sum())
    assert checked >= 0.6 * len(times)
    assert np.abs(values).max() <= 1.0

    prof = json.loads((ann / "P017" / "profile.json").read_text())
    assert prof["name"] == "P017" and prof["base"]["run"].endswith(tiny.run.name)
    assert prof["songs"][0]["song_id"] == "song40" and prof["songs"][0]["rated_steps"] >= len(times)
    load_profile("P017", ann, base=base)
    assert (pred / "other20.P017.csv").is_file() and (pred / "other20.P017.png").is_file()


# --------------------------------------------------------------------------------------------
# One dimension at a time (DEAM's two passes)
# --------------------------------------------------------------------------------------------


def test_two_passes_one_dimension_each(tiny, base, tmp_path, driver):
    d = driver
    ann = tmp_path / "ann"
    session = RateSession("P017", [tiny.song], base=base, annotators_dir=ann, practice_s=0)
    with RateServer(session) as server:
        d.get(server.url)
        wait_for(d, "document.body.dataset.phase === 'idle'", 30, "the page")
        d.find_element("css selector", 'input[name="mode"][value="passes"]').click()
        assert "valence pass" in d.find_element("id", "start").text
        pad = Pad(d)
        d.execute_script("const a = document.getElementById('audio'); a.defaultPlaybackRate = a.playbackRate = 4;")
        passes = {}
        for dim, (first, second) in (("valence", ((-0.7, 0.9), (0.6, -0.9))), ("arousal", ((0.8, 0.5), (-0.8, -0.6)))):
            vals = [pad.move(*first)]
            click(d, "start")
            wait_for(d, "document.body.dataset.phase === 'recording'", 10, f"the {dim} pass")
            wait_for(d, f"document.getElementById('audio').currentTime >= {SONG_S / 2}", 30, f"half of the {dim} pass")
            t_switch0 = clock(d)
            vals.append(pad.move(*second))
            t_switch1 = clock(d)
            wait_for(
                d,
                "document.body.dataset.phase === 'done' || document.body.dataset.phase === 'idle'",
                30,
                f"the end of the {dim} pass",
            )
            passes[dim] = (vals, t_switch0, t_switch1)
        assert "rated" in d.find_element("id", "songs").text
        click(d, "submit")
        wait_for(d, "document.getElementById('results').dataset.ok", 240, "the calibration")
        assert d.execute_script("return document.getElementById('results').dataset.ok") == "true", d.find_element(
            "id", "results"
        ).text
        full_page_screenshot(d, ARTIFACTS / "rate_page_two_passes.png")
        assert no_console_errors(d) == []

    times, values = read_ratings(ann / "P017" / "ratings.csv")
    for j, dim in enumerate(("valence", "arousal")):
        (v1, a1), (v2, a2) = passes[dim][0]
        want = (v1, v2) if dim == "valence" else (a1, a2)  # only this pass's dimension counts
        early = times + 0.5 <= passes[dim][1] - 0.2
        late = times >= passes[dim][2] + 0.2
        np.testing.assert_allclose(values[early, j], want[0], atol=pad.resolution)
        np.testing.assert_allclose(values[late, j], want[1], atol=pad.resolution)
        assert early.sum() >= 10 and late.sum() >= 10

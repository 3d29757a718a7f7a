"""The rating page's server (pdmer.rate, ``run.py rate``), without a browser.

A tiny run is trained once per session (about 20 s on 2 cores; shared with
tests/test_rate_browser.py through a folder of the session's base temp). The server runs on
127.0.0.1 in a thread, on a free port, and is stopped by each test's fixture. Submissions are
sent over real HTTP, as the page sends them.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from conftest import tiny_overrides  # noqa: E402

from pdmer.personal import ProfileError, check_name, load_base_model, load_profile  # noqa: E402
from pdmer.rate import RateServer, RateSession, SubmissionError, bin_to_grid, parse_submission  # noqa: E402
from pdmer.rate.server import max_body_bytes  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SONG_S = 40.0


# --------------------------------------------------------------------------------------------
# Fixtures: a tiny finished run, songs, a running server
# --------------------------------------------------------------------------------------------


def write_song(path: Path, seconds: float, seed: int = 0, sr: int = 22050) -> Path:
    """A test song: notes that change every 2.5 s, louder and softer over 10 s cycles."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    notes = 220.0 * 2 ** (rng.integers(0, 12, size=int(seconds / 2.5) + 1) / 12)
    f = notes[(t / 2.5).astype(int)]
    x = 0.25 * np.sin(2 * np.pi * f * t) * (0.4 + 0.6 * np.sin(np.pi * t / 10) ** 2)
    sf.write(path, x.astype(np.float32), sr)
    return path


def _tiny(tmp_path_factory) -> SimpleNamespace:
    """A tiny trained run and two songs, made once per pytest session (both rate test files use them)."""
    from pdmer.config import load_config
    from pdmer.personal import find_latest_run

    root = tmp_path_factory.getbasetemp() / "rate-shared"
    runs = root / "runs"
    if not (runs.is_dir() and any((r / "results.json").is_file() for r in runs.iterdir())):
        import torch

        from pdmer.training import train

        root.mkdir(exist_ok=True)
        cfg = load_config("pdmer.synthetic.dsaml", tiny_overrides(root, "rate") + ["runtime.threads=1"])
        threads = torch.get_num_threads()
        try:
            train(cfg)
        finally:
            torch.set_num_threads(threads)
    song = root / "song40.wav"
    other = root / "other20.wav"
    if not song.is_file():
        write_song(song, SONG_S, 0)
        write_song(other, 20.0, 1)
    return SimpleNamespace(root=root, run=find_latest_run(runs), song=song, other=other)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return _tiny(tmp_path_factory)


@pytest.fixture(scope="session")
def base(tiny):
    return load_base_model(tiny.run)


@pytest.fixture
def served(tiny, base, tmp_path):
    """A session for listener ``P017`` with the 40 s song (and a second one to predict), served on 127.0.0.1."""
    session = RateSession(
        "P017",
        [tiny.song],
        predict=[tiny.other],
        base=base,
        annotators_dir=tmp_path / "ann",
        out_dir=tmp_path / "pred",
        practice_s=2,
    )
    server = RateServer(session).start()
    try:
        yield SimpleNamespace(
            session=session, server=server, ann=tmp_path / "ann", pred=tmp_path / "pred", prefix=f"/{server.token}"
        )
    finally:
        server.stop()


def request(
    server, method: str, path: str, body: bytes | None = None, headers: dict | None = None, host: str | None = None
):
    """One HTTP request to the server; (status, headers, body)."""
    conn = http.client.HTTPConnection(getattr(server, "host", "127.0.0.1"), server.port, timeout=120)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host if host is not None else f"127.0.0.1:{server.port}")
        hdrs = {"Content-Type": "application/json"} if body is not None else {}
        hdrs.update(headers or {})
        if body is not None and "Content-Length" not in hdrs:
            hdrs["Content-Length"] = str(len(body))
        for k, v in hdrs.items():
            conn.putheader(k, v)
        conn.endheaders(body)
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def trace(seconds: float, hz: float = 20.0, t0: float = 0.0):
    """A pointer trace against the audio clock: valence a slow sine, arousal a ramp."""
    t = np.round(np.arange(t0, seconds, 1 / hz), 3)
    v = np.round(0.8 * np.sin(2 * np.pi * t / 20), 4)
    a = np.round(np.clip(-0.9 + 1.8 * t / seconds, -1, 1), 4)
    return t, v, a


def submission(t, v, a, song: int = 0, mode: str = "pad") -> dict:
    return {
        "mode": mode,
        "songs": [
            {
                "song": song,
                "valence": [[float(x), float(y)] for x, y in zip(t, v)],
                "arousal": [[float(x), float(y)] for x, y in zip(t, a)],
            }
        ],
    }


def nothing_written(s) -> bool:
    return not s.ann.exists() or not any(s.ann.iterdir())


# --------------------------------------------------------------------------------------------
# Binning onto the 2 Hz grid
# --------------------------------------------------------------------------------------------


def test_bin_to_grid_by_hand():
    # step k = [0.5 k, 0.5 k + 0.5): 0.0, 0.2, 0.4 -> step 0; 0.5 (the boundary), 0.9 -> step 1; 1.7 -> step 3
    s = np.array([[0.0, 0.1], [0.2, 0.2], [0.4, 0.6], [0.5, -1.0], [0.9, 0.0], [1.7, 0.5], [2.1, 0.9]])
    steps, means = bin_to_grid(s, n_steps=4)  # 2.1 s lies in step 4: beyond the 4 whole steps, dropped
    assert steps.tolist() == [0, 1, 3]
    np.testing.assert_allclose(means, [0.3, -0.5, 0.5])


def test_submission_bins_both_dimensions_and_keeps_whole_steps():
    t, v, a = trace(SONG_S, hz=40)  # up to 39.975 s
    body = json.dumps(submission(t, v, a)).encode()
    mode, (r,) = parse_submission(body, [("song40", 39.96)], 10.0)  # 79 whole steps: step 79 is partial, dropped
    assert mode == "pad" and r.song_id == "song40"
    assert r.steps.tolist() == list(range(79))
    for k in (0, 17, 78):
        inside = (t >= 0.5 * k) & (t < 0.5 * k + 0.5)
        assert r.valence[k] == pytest.approx(v[inside].mean()) and r.arousal[k] == pytest.approx(a[inside].mean())
    np.testing.assert_array_equal(r.times, 0.5 * np.arange(79))


def test_two_passes_keep_the_steps_both_reach():
    t1, v, _ = trace(30.0, hz=25)
    t2, _, a = trace(35.0, hz=30, t0=4.0)
    body = {
        "mode": "passes",
        "songs": [
            {
                "song": 0,
                "valence": [[float(x), float(y)] for x, y in zip(t1, v)],
                "arousal": [[float(x), float(y)] for x, y in zip(t2, a)],
            }
        ],
    }
    _, (r,) = parse_submission(json.dumps(body).encode(), [("s", SONG_S)], 10.0)
    assert r.steps[0] == 8 and r.steps[-1] == 59  # [4, 30) s


@pytest.mark.parametrize(
    "mutate, status, words",
    [
        (lambda d: d["songs"][0]["valence"].__setitem__(5, [2.5, float("nan")]), 400, "finite number"),
        (lambda d: d["songs"][0]["valence"].__setitem__(5, [2.5, None]), 400, "two numbers"),
        (lambda d: d["songs"][0]["arousal"].__setitem__(5, [2.5, True]), 400, "two numbers"),
        (lambda d: d["songs"][0]["arousal"].__setitem__(5, [float("inf"), 0.1]), 400, "finite number"),
        (lambda d: d["songs"][0]["valence"].__setitem__(5, [0.1, 0.0]), 400, "not after"),
        (lambda d: d["songs"][0]["valence"].__setitem__(5, d["songs"][0]["valence"][4]), 400, "not after"),
        (lambda d: d["songs"][0]["valence"].append([SONG_S + 3, 0.0]), 400, "outside the song"),
        (lambda d: d["songs"][0]["valence"].__setitem__(0, [-0.5, 0.0]), 400, "outside the song"),
        (
            lambda d: d["songs"][0]["valence"].__setitem__(5, [d["songs"][0]["valence"][5][0], 1.5]),
            400,
            "outside [-1, 1]",
        ),
        (lambda d: d["songs"][0].__setitem__("song", 3), 400, "index of a song"),
        (lambda d: d["songs"][0].__setitem__("song", "../../etc/passwd"), 400, "index of a song"),
        (lambda d: d["songs"].append(dict(d["songs"][0])), 400, "songs submitted"),
        (lambda d: d.__setitem__("path", "/etc/passwd"), 400, "unknown field"),
        (lambda d: d["songs"][0].__setitem__("audio", "/etc/passwd"), 400, "unknown field"),
        (lambda d: d.__setitem__("mode", "eval"), 400, "mode"),
        (lambda d: d.__setitem__("songs", []), 400, "no rated song"),
        (lambda d: d["songs"][0].pop("arousal"), 400, "no arousal"),
        (lambda d: d["songs"][0].__setitem__("valence", [[i * 0.001, 0.0] for i in range(5000)]), 400, "samples for"),
        (
            lambda d: [d["songs"][0].__setitem__(k, d["songs"][0][k][:100]) for k in ("valence", "arousal")],
            422,
            "at least 10 s",
        ),
        (
            lambda d: [
                d["songs"][0].__setitem__(k, [[t, 0.2] for t, _ in d["songs"][0][k]]) for k in ("valence", "arousal")
            ],
            422,
            "never moved",
        ),
        (
            lambda d: [
                d["songs"][0].__setitem__(k, [s for s in d["songs"][0][k] if not 12 <= s[0] < 16])
                for k in ("valence", "arousal")
            ],
            422,
            "nothing rated from 12.0 s to 16.0 s",
        ),
    ],
)
def test_refused_submissions_name_the_problem(mutate, status, words):
    t, v, a = trace(SONG_S)
    d = submission(t, v, a)
    mutate(d)
    with pytest.raises(SubmissionError) as e:
        parse_submission(json.dumps(d).encode(), [("song40", SONG_S)], 10.0)
    assert e.value.status == status and words in str(e.value), str(e.value)


@pytest.mark.parametrize("body", [b"", b"not json", b"[1, 2]", b'{"songs": "x"}', b"\xff\xfe", b'{"songs": [1]}'])
def test_malformed_bodies(body):
    with pytest.raises(SubmissionError) as e:
        parse_submission(body, [("s", SONG_S)], 10.0)
    assert e.value.status == 400


# --------------------------------------------------------------------------------------------
# The session: name, songs, model
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "a b", "", "x" * 65, "example", "é"])
def test_names_are_checked_as_calibrate_checks_them(name, tiny, base, tmp_path):
    with pytest.raises(ProfileError) as e:
        check_name(name)
    with pytest.raises(ProfileError) as e2:
        RateSession(name, [tiny.song], base=base, annotators_dir=tmp_path)
    assert str(e2.value) == str(e.value)
    assert not any(tmp_path.iterdir())


def test_songs_are_checked(tiny, base, tmp_path):
    from pdmer.data.types import DataError

    with pytest.raises(DataError, match="not found"):
        RateSession("P1", [tmp_path / "nope.wav"], base=base, annotators_dir=tmp_path)
    with pytest.raises(DataError, match="the page plays"):
        RateSession("P1", [tiny.root / "runs"], base=base, annotators_dir=tmp_path)
    short = write_song(tmp_path / "short.wav", 6.0)
    with pytest.raises(DataError, match="at least 10 s"):
        RateSession("P1", [short], base=base, annotators_dir=tmp_path)
    (tmp_path / "b").mkdir()
    twin = write_song(tmp_path / "b" / "song40.wav", 12.0)
    with pytest.raises(DataError, match="two songs have the id"):
        RateSession("P1", [tiny.song, twin], base=base, annotators_dir=tmp_path)
    with pytest.raises(DataError, match="not found"):
        RateSession("P1", [tiny.song], predict=[tmp_path / "gone.wav"], base=base, annotators_dir=tmp_path)


def test_page_states_the_model_and_warns_about_synthetic_training(served, tiny):
    st, _, body = request(served.server, "GET", served.prefix + "/api/session")
    info = json.loads(body)
    assert st == 200 and info["name"] == "P017"
    assert info["model"]["run"].endswith(tiny.run.name) and info["model"]["data_source"] == "synthetic"
    assert (
        "synthetic benchmark only" in info["model"]["warning"]
        and "mean little for real music" in info["model"]["warning"]
    )
    assert [s["song_id"] for s in info["songs"]] == ["song40"] and info["songs"][0]["duration_s"] == pytest.approx(
        SONG_S
    )
    assert info["songs"][0]["audio"] == "audio/0" and info["predict"] == ["other20"]
    assert info["sample_hz"] >= 10


def test_no_warning_for_a_model_trained_on_real_data(base):
    from dataclasses import replace

    from pdmer.rate import synthetic_warning

    real = SimpleNamespace(name="x", cfg=replace(base.cfg, data=replace(base.cfg.data, source="generic")))
    assert synthetic_warning(real) is None and synthetic_warning(base)


# --------------------------------------------------------------------------------------------
# The server's security rules
# --------------------------------------------------------------------------------------------


def test_page_and_assets_are_served_with_the_token_only(served):
    s = served.server
    st, h, body = request(s, "GET", served.prefix + "/")
    assert st == 200 and b'src="static/rate.js"' in body
    csp = h["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert h["x-content-type-options"] == "nosniff" and h["referrer-policy"] == "no-referrer"
    for asset, kind in (
        ("static/rate.js", "javascript"),
        ("static/rate.css", "text/css"),
        ("static/favicon.svg", "svg"),
    ):
        st, h, _ = request(s, "GET", f"{served.prefix}/{asset}")
        assert st == 200 and kind in h["content-type"], asset
    st, h, _ = request(s, "GET", served.prefix)
    assert st == 307 and h["location"].endswith(served.prefix + "/")
    st, h, audio = request(
        s, "GET", served.prefix + "/audio/0", headers={"Range": "bytes=0-99"}
    )  # the browser seeks with ranges
    assert st == 206 and audio == served.session.songs[0].path.read_bytes()[:100] and h["content-type"] == "audio/wav"


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/api/session",
        "/static/rate.js",
        "/audio/0",
        "/WRONGTOKEN/",
        "/WRONGTOKEN/api/session",
        "/favicon.ico",
        "/{bad}/",
        "/{tok}x/",
        "/{tok}x/api/session",
        "/{short}/api/session",
    ],
)
def test_wrong_or_missing_token_is_refused(served, path):
    tok = served.server.token
    path = path.format(bad=tok[::-1], tok=tok, short=tok[:-1])
    for method in ("GET", "POST"):
        st, _, body = request(served.server, method, path, b"{}" if method == "POST" else None)
        assert st == 403 and b"token" in body, (method, path)
    assert nothing_written(served)


def test_foreign_host_header_is_refused(served):
    s = served.server
    for host in (
        "evil.example",
        f"evil.example:{s.port}",
        f"127.0.0.1:{s.port + 1}",
        "",
        f"localhost.evil.example:{s.port}",
    ):
        st, _, body = request(s, "GET", served.prefix + "/api/session", host=host)
        assert st == 400 and b"Host" in body, host
    t, v, a = trace(SONG_S)
    st, _, _ = request(
        s, "POST", served.prefix + "/api/submit", json.dumps(submission(t, v, a)).encode(), host="evil.example"
    )
    assert st == 400 and nothing_written(served)  # a DNS-rebinding page posting a good submission
    for host in (f"localhost:{s.port}", f"127.0.0.1:{s.port}"):
        assert request(s, "GET", served.prefix + "/api/session", host=host)[0] == 200


def test_cross_origin_submission_is_refused(served):
    t, v, a = trace(SONG_S)
    body = json.dumps(submission(t, v, a)).encode()
    st, _, msg = request(served.server, "POST", served.prefix + "/api/submit", body, {"Origin": "http://evil.example"})
    assert st == 403 and b"cross-origin" in msg
    assert nothing_written(served)


@pytest.mark.parametrize(
    "path",
    [
        "/static/../server.py",
        "/static/%2e%2e/server.py",
        "/static/..%2fserver.py",
        "/static/../../../../etc/passwd",
        "/audio/../../../../etc/passwd",
        "/audio/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/audio/1",
        "/audio/-1",
        "/audio/0.wav",
        "/result/../../pdmer/rate/server.py",
        "/result/predict/0.png",
        "/result/fit.png",
        "//etc/passwd",
        "/static//etc/passwd",
        "/static/%2fetc%2fpasswd",
    ],
)
def test_path_traversal_reaches_nothing(served, path):
    st, _, body = request(served.server, "GET", served.prefix + path)
    assert st in (400, 403, 404), (path, st)
    assert b"import" not in body and b"root:" not in body
    assert nothing_written(served)


def test_nan_and_out_of_order_samples_are_refused_over_http(served):
    t, v, a = trace(SONG_S)
    good = json.dumps(submission(t, v, a))
    for body, words in (
        (good.replace("[1.0, ", "[NaN, ", 1), "finite number"),
        (good.replace("[1.0, ", "[Infinity, ", 1), "finite number"),
        (good.replace("[1.0, ", "[0.2, ", 1), "not after"),
        (good.replace("[1.0, ", f"[{SONG_S + 5}, ", 1), "outside the song"),
        ('{"songs": [{"song": 0, "valence": [[0, 1e999]], "arousal": []}]}', "not finite"),
    ):
        st, _, msg = request(served.server, "POST", served.prefix + "/api/submit", body.encode())
        assert st == 400 and words in json.loads(msg)["error"], msg
    st, _, _ = request(
        served.server, "POST", served.prefix + "/api/submit", good.encode(), {"Content-Type": "text/plain"}
    )
    assert st == 415
    st, _, _ = request(served.server, "GET", served.prefix + "/api/submit")
    assert st == 405
    assert nothing_written(served)


def test_oversized_body_is_refused(served):
    s = served.server
    limit = max_body_bytes(served.session)
    assert 100_000 < limit < 2_000_000  # 40 s of audio at 100 Hz in both dimensions, and some room
    st, _, _ = request(
        s, "POST", served.prefix + "/api/submit", b"{}", {"Content-Length": str(10**9)}
    )  # a huge body announced
    assert st == 413
    big = b'{"mode": "pad", "songs": [' + b" " * (limit + 10) + b"]}"  # sent in full
    st, _, _ = request(s, "POST", served.prefix + "/api/submit", big)
    assert st == 413
    assert nothing_written(served)


def test_one_calibration_at_a_time(served):
    t, v, a = trace(SONG_S)
    served.session._lock.acquire()
    try:
        st, _, msg = request(
            served.server, "POST", served.prefix + "/api/submit", json.dumps(submission(t, v, a)).encode()
        )
    finally:
        served.session._lock.release()
    assert st == 409 and "already running" in json.loads(msg)["error"]
    assert nothing_written(served)


def test_another_host_is_warned_about_and_loopback_is_not(tiny, base, tmp_path):
    session = RateSession("P1", [tiny.song], base=base, annotators_dir=tmp_path)
    quiet = RateServer(session)
    try:
        assert (
            quiet.warning is None
            and quiet.url.startswith("http://127.0.0.1:")
            and quiet.url.endswith(f"/{quiet.token}/")
        )
    finally:
        quiet.stop()
    other = RateServer(session, host="127.0.0.2").start()  # not 127.0.0.1: warned, still on loopback for the test
    try:
        assert "not only on this machine" in other.warning
        st, _, _ = request(other, "GET", f"/{other.token}/api/session", host=f"127.0.0.2:{other.port}")
        assert st == 200
    except OSError as e:  # pragma: no cover - a system without 127.0.0.0/8 on loopback
        pytest.skip(f"cannot reach 127.0.0.2 ({e})")
    finally:
        other.stop()
    assert RateServer(session).token != RateServer(session).token  # a fresh random token each time


# --------------------------------------------------------------------------------------------
# A good submission: ratings in the generic layout, a profile, predictions
# --------------------------------------------------------------------------------------------


def test_submission_calibrates_and_predicts(served, base, tiny):
    t, v, a = trace(SONG_S)
    st, _, body = request(
        served.server, "POST", served.prefix + "/api/submit", json.dumps(submission(t, v, a)).encode()
    )
    res = json.loads(body)
    assert st == 200 and res["ok"], res
    prof = served.ann / "P017"
    lines = (prof / "ratings.csv").read_text().splitlines()
    assert lines[0] == "song_id,annotator_id,time_s,valence,arousal"
    rows = [r.split(",") for r in lines[1:]]
    assert {r[0] for r in rows} == {"song40"} and {r[1] for r in rows} == {"P017"}
    times = np.array([float(r[2]) for r in rows])
    np.testing.assert_array_equal(times, 0.5 * np.arange(80))  # every whole step of the 40 s song, at 2 Hz
    vals = np.array([[float(r[3]), float(r[4])] for r in rows])
    k = (t / 0.5).astype(int)
    expect = np.array([[v[k == i].mean(), a[k == i].mean()] for i in range(80)])
    np.testing.assert_allclose(vals, expect, atol=6e-5)  # written with 4 decimals
    info = json.loads((prof / "profile.json").read_text())
    assert info["name"] == "P017" and info["base"]["run"].endswith(tiny.run.name)
    assert info["songs"][0]["song_id"] == "song40" and info["songs"][0]["rated_steps"] == 80
    load_profile("P017", served.ann, base=base)
    assert res["profile"].endswith("P017") and set(res["fit"]) == {"generic", "personalized", "maml"}
    assert "synthetic benchmark only" in res["warning"]
    st, h, png = request(served.server, "GET", served.prefix + "/" + res["fit_png"])
    assert st == 200 and h["content-type"] == "image/png" and png[:8] == b"\x89PNG\r\n\x1a\n"
    (pred,) = res["predictions"]
    assert pred["song_id"] == "other20" and (served.pred / "other20.P017.csv").is_file()
    st, _, png = request(served.server, "GET", served.prefix + "/" + pred["png"])
    assert st == 200 and png[:8] == b"\x89PNG\r\n\x1a\n"
    st, _, body = request(served.server, "GET", served.prefix + "/api/session")
    assert json.loads(body)["result"]["profile"] == res["profile"]  # a reloaded page shows the result again

    # a second submission replaces the profile as calibrate does (complete, never half-written)
    t2, v2, a2 = trace(25.0)
    st, _, body = request(
        served.server, "POST", served.prefix + "/api/submit", json.dumps(submission(t2, -v2, a2)).encode()
    )
    assert st == 200, body
    assert len((prof / "ratings.csv").read_text().splitlines()) == 1 + 50
    assert json.loads((prof / "profile.json").read_text())["songs"][0]["rated_steps"] == 50
    assert not [p for p in served.ann.iterdir() if p.name.startswith(".P017.")]  # no leftover of the swap


def test_refused_by_calibrate_writes_nothing(served, monkeypatch):
    from pdmer import personal
    from pdmer.data.types import DataError

    def refuse(*a, **k):
        raise DataError("ratings refused for the test")

    monkeypatch.setattr(personal, "calibrate", refuse)
    t, v, a = trace(SONG_S)
    st, _, body = request(
        served.server, "POST", served.prefix + "/api/submit", json.dumps(submission(t, v, a)).encode()
    )
    assert st == 422 and "refused for the test" in json.loads(body)["error"]
    assert nothing_written(served)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def test_rate_command_serves_and_stops_cleanly_on_ctrl_c(tiny, tmp_path):
    cmd = [
        sys.executable,
        "run.py",
        "rate",
        "--name",
        "P017",
        "--audio",
        str(tiny.song),
        "--model",
        str(tiny.run),
        "--annotators",
        str(tmp_path / "ann"),
        "--no-browser",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stdout:  # bounded by the pipe closing, and by the kill in `finally`
            lines.append(line)
            if "rating page" in line:
                break
        url = lines[-1].split(": ", 1)[1].strip()
        assert url.startswith("http://127.0.0.1:") and "model:" in "".join(lines)
        port = int(url.split(":")[2].split("/")[0])
        token = url.rstrip("/").rsplit("/", 1)[1]
        st, _, body = request(SimpleNamespace(port=port), "GET", f"/{token}/api/session")
        assert st == 200 and json.loads(body)["name"] == "P017"
        assert request(SimpleNamespace(port=port), "GET", "/api/session")[0] == 403
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "stopped; nothing was submitted" in out and "synthetic benchmark only" in err
    assert "Traceback" not in err


def test_rate_command_refuses_a_bad_name(tiny, tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "run.py",
            "rate",
            "--name",
            "../etc",
            "--audio",
            str(tiny.song),
            "--model",
            str(tiny.run),
            "--annotators",
            str(tmp_path),
            "--no-browser",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "invalid listener name" in r.stderr and "rating page" not in r.stdout

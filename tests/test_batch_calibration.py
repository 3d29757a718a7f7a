"""Batch calibration (``pdmer.personal.calibrate_many``): many listeners of one study file at once."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pdmer import store
from pdmer.data.types import DataError
from pdmer.personal import calibrate, calibrate_many, load_profile

HEADER = "song_id,annotator_id,time_s,valence,arousal"
SONGS = ("clip_000", "clip_001")  # 45 s clips of the benchmark


def rows(sid: str, aid: str, shift: float) -> list[str]:
    """30 s of ratings at 2 Hz, a listener-specific curve."""
    out = []
    for k in range(60):
        t = 15.0 + 0.5 * k
        out.append(f"{sid},{aid},{t:g},{0.4 * math.sin(t / 4 + shift):.5f},{0.3 * math.cos(t / 5 - shift):.5f}")
    return out


def study(tmp: Path) -> tuple[Path, dict[str, list[str]]]:
    """A study file: L1 (2 songs) and L2 (1 song) good, bad-nan (a NaN), ../x (unsafe id), L4 (a song without audio).

    Returns:
        the file and each listener's rows, as one-by-one calibration files hold them.
    """
    by = {
        "L1": rows(SONGS[0], "L1", 0.0) + rows(SONGS[1], "L1", 0.3),
        "L2": rows(SONGS[1], "L2", 1.0),
        "bad-nan": rows(SONGS[0], "bad-nan", 2.0),
        "../x": rows(SONGS[0], "../x", 0.5),
        "L4": rows(SONGS[0], "L4", 1.5) + rows("clip_404", "L4", 1.5),
    }
    by["bad-nan"][7] = by["bad-nan"][7].rsplit(",", 2)[0] + ",nan,0.1"
    lines = [HEADER]
    # interleaved: each listener's rows are not one block, line numbers must still be the study's
    lines += by["L1"][:60] + by["bad-nan"] + by["L2"][:30] + by["../x"] + by["L1"][60:] + by["L4"] + by["L2"][30:]
    path = tmp / "study.csv"
    path.write_text("\n".join(lines) + "\n")
    return path, by


def one_by_one(calibrated_tiny, tmp: Path, aid: str, own: list[str]):
    """``calibrate`` of one listener's own ratings file."""
    f = tmp / f"{aid}.csv"
    f.write_text("\n".join([HEADER, *own]) + "\n")
    songs = list(dict.fromkeys(r.split(",")[0] for r in own))
    return calibrate(
        aid,
        [calibrated_tiny.audio / f"{s}.wav" for s in songs],
        f,
        base=calibrated_tiny.base,
        annotators_dir=tmp / "one",
        plot=False,
    ), f


def same_profile(a, b) -> None:
    assert a.params.keys() == b.params.keys()
    for k in a.params:
        torch.testing.assert_close(a.params[k], b.params[k], atol=1e-6, rtol=1e-5)
    for key in ("adaptation", "songs", "personalization", "fit", "trimmed", "base"):
        assert json.dumps(a.info[key]) == json.dumps(b.info[key]) or _close(a.info[key], b.info[key]), key
    ra, rb = dict(a.info["ratings"]), dict(b.info["ratings"])
    assert ra.pop("source") != rb.pop("source") and ra == rb


def _close(x, y) -> bool:
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(_close(x[k], y[k]) for k in x)
    if isinstance(x, list):
        return len(x) == len(y) and all(_close(a, b) for a, b in zip(x, y, strict=True))
    if isinstance(x, float):
        return y == pytest.approx(x, rel=1e-5, abs=1e-6)
    return x == y


def test_good_listeners_equal_one_by_one_and_bad_ones_are_reported(calibrated_tiny, tmp_path, monkeypatch):
    path, by = study(tmp_path)
    ann = tmp_path / "ann"
    calls = []
    features = calibrated_tiny.base.features
    monkeypatch.setattr(calibrated_tiny.base, "features", lambda p: calls.append(Path(p).stem) or features(p))
    report = calibrate_many(path, calibrated_tiny.audio, annotators_dir=ann, base=calibrated_tiny.base, plot=False)
    monkeypatch.undo()
    assert list(report.written) == ["L1", "L2"]
    assert list(report.skipped) == ["bad-nan", "../x", "L4"]
    assert sorted(calls) == sorted(SONGS)  # each song's features once, shared by its listeners
    # what is wrong and where: the study file, its line, the song
    lines = path.read_text().splitlines()
    nan_line = next(i for i, ln in enumerate(lines, 1) if ln.startswith(f"{SONGS[0]},bad-nan,") and "nan,0.1" in ln)
    assert (
        f"study.csv line {nan_line} (song '{SONGS[0]}', annotator 'bad-nan'): valence='nan' is not finite"
        in (report.skipped["bad-nan"])
    )
    assert str(path) in report.skipped["bad-nan"]
    x = [i for i, ln in enumerate(lines, 1) if ",../x," in ln]
    assert report.skipped["../x"].startswith(
        f"{path} lines {x[0]}-{x[-1]}: annotator_id '../x' cannot name a profile: "
    )
    assert "invalid listener name '../x'" in report.skipped["../x"]
    l4 = [i for i, ln in enumerate(lines, 1) if ln.startswith("clip_404,L4,")]
    assert (
        f"{path} lines {l4[0]}-{l4[-1]}: song 'clip_404' has no audio file {calibrated_tiny.audio}/clip_404.<"
        in (report.skipped["L4"])
    )
    assert "skipped 'bad-nan'" in report.summary() and "wrote" in report.summary()
    # nothing else written: two complete profiles, no leftover, nothing outside the annotators folder
    assert sorted(p.name for p in ann.iterdir()) == ["L1", "L2"]
    assert not (tmp_path / "x").exists()
    for aid in ("L1", "L2"):
        assert store.check_complete(ann / aid) is None
        mine = load_profile(aid, ann, base=calibrated_tiny.base)
        ref, own = one_by_one(calibrated_tiny, tmp_path, aid, by[aid])
        same_profile(mine, ref)
        assert (ann / aid / "ratings.csv").read_bytes() == own.read_bytes()  # the listener's rows only
        assert mine.info["ratings"]["source"] == str(path)


def test_a_crash_during_one_listener_leaves_the_written_profiles(calibrated_tiny, tmp_path, monkeypatch):
    path, by = study(tmp_path)
    ann = tmp_path / "ann"
    first = calibrate_many(
        path, calibrated_tiny.audio, annotators_dir=ann, base=calibrated_tiny.base, plot=False, names=["L2", "nobody"]
    )
    assert list(first.written) == ["L2"] and "no rows of annotator_id 'nobody'" in first.skipped["nobody"]
    old_l2 = {p.name: p.read_bytes() for p in (ann / "L2").iterdir()}
    installs = []

    def fault(stage):  # the second listener's write (L2, after L1) is killed after its first file
        if stage == "wrote weights.safetensors":
            installs.append(stage)
            if len(installs) == 2:
                raise KeyboardInterrupt("killed (simulated)")

    monkeypatch.setattr(store, "_fault", fault)
    with pytest.raises(KeyboardInterrupt, match="simulated"):
        calibrate_many(
            path, calibrated_tiny.audio, annotators_dir=ann, base=calibrated_tiny.base, plot=False, inner_steps=3
        )
    monkeypatch.undo()
    assert store.check_complete(ann / "L1") is None  # written before the crash: complete
    assert load_profile("L1", ann, base=calibrated_tiny.base).info["adaptation"]["inner_steps"] == 3
    assert {p.name: p.read_bytes() for p in (ann / "L2").iterdir()} == old_l2  # its old profile, untouched
    assert sorted(p.name for p in ann.iterdir()) == ["L1", "L2"]  # no temporary folder left
    again = calibrate_many(
        path,
        calibrated_tiny.audio,
        annotators_dir=ann,
        base=calibrated_tiny.base,
        plot=False,
        names=["L2"],
        inner_steps=3,
    )
    assert list(again.written) == ["L2"] and again.ok
    assert load_profile("L2", ann, base=calibrated_tiny.base).info["adaptation"]["inner_steps"] == 3


def test_whole_file_problems_are_errors(calibrated_tiny, tmp_path):
    bad = tmp_path / "s.csv"
    bad.write_text("song_id,time_s,valence,arousal\nclip_000,15,0.1,0.1\n")
    with pytest.raises(DataError, match=r"s\.csv line 1: missing column\(s\) annotator_id"):
        calibrate_many(bad, calibrated_tiny.audio, annotators_dir=tmp_path / "ann", base=calibrated_tiny.base)
    path, _ = study(tmp_path)
    with pytest.raises(DataError, match="audio folder not found"):
        calibrate_many(path, tmp_path / "nowhere", annotators_dir=tmp_path / "ann", base=calibrated_tiny.base)
    assert not (tmp_path / "ann").exists()


def test_rows_without_an_annotator_are_reported(calibrated_tiny, tmp_path):
    path = tmp_path / "study.csv"
    path.write_text("\n".join([HEADER, *rows(SONGS[0], "", 0.0)[:3], *rows(SONGS[0], "L9", 0.0)]) + "\n")
    report = calibrate_many(
        path, calibrated_tiny.audio, annotators_dir=tmp_path / "ann", base=calibrated_tiny.base, plot=False
    )
    assert list(report.written) == ["L9"]
    assert report.skipped[""].startswith(f"{path} lines 2-4: 3 row(s) without an annotator_id")


def test_exported():
    import pdmer
    from pdmer import personal

    assert pdmer.calibrate_many is personal.calibrate_many is calibrate_many


def test_the_command_calibrates_a_study(calibrated_tiny, tmp_path, capsys):
    """run.py calibrate --ratings STUDY --audio-dir DIR (no --name): the summary, exit 1 when some were skipped."""
    from pdmer.cli import main

    path, _ = study(tmp_path)
    ann = tmp_path / "ann"
    common = ["calibrate", "--ratings", str(path), "--model", str(calibrated_tiny.run), "--annotators", str(ann)]
    assert main(common + ["--audio-dir", str(calibrated_tiny.audio)]) == 1  # three listeners skipped, two written
    out = capsys.readouterr().out
    assert "L1" in out and "bad-nan" in out and (ann / "L1" / "profile.json").is_file() and (ann / "L2").is_dir()
    assert main(common + ["--audio-dir", str(calibrated_tiny.audio), "--annotator", "L2"]) == 0
    assert main(common) == 2  # no --audio-dir: one error line
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert "--audio-dir" in line

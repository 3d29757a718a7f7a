"""PMEmo2019 readers on fixtures written in the official layout (from the real samples when present)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from pdmer.data.pmemo import (
    AUDIO_DIR,
    DYNAMIC_FILE,
    STATIC_FILE,
    check_pmemo,
    load_pmemo,
    read_pmemo_dynamic,
    read_pmemo_static,
)
from pdmer.data.types import DataError

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
SAMPLES = SHARED / "pmemo_samples"
DYNAMIC_HEADER = ["musicId", "frameTime", "Arousal(mean)", "Valence(mean)"]
STATIC_HEADER = ["musicId", "Arousal(mean)", "Valence(mean)"]


def write_pmemo(root: Path, songs: dict[str, dict]) -> Path:
    """songs: musicId -> {"t": [...], "a": [...], "v": [...], "static": (a, v)}; writes the official layout."""
    (root / AUDIO_DIR).mkdir(parents=True)
    (root / DYNAMIC_FILE).parent.mkdir(parents=True)
    for sid in songs:
        (root / AUDIO_DIR / f"{sid}.mp3").write_bytes(b"")  # placeholder: nothing here decodes audio
    with open(root / DYNAMIC_FILE, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(DYNAMIC_HEADER)
        for sid, s in songs.items():
            for t, a, v in zip(s["t"], s["a"], s["v"], strict=False):
                w.writerow([sid, t, a, v])
    with open(root / STATIC_FILE, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(STATIC_HEADER)
        for sid, s in songs.items():
            w.writerow([sid, *s["static"]])
    return root


def real_songs() -> dict[str, dict]:
    if not SAMPLES.is_dir():
        pytest.skip(f"real PMEmo samples not available ({SAMPLES.resolve()} absent)")
    out = {}
    for path in sorted(SAMPLES.glob("*.json")):
        if path.stem.isdigit():
            d = json.loads(path.read_text())
            dyn = d["dynamic"]
            out[path.stem] = {
                "t": dyn["t"],
                "a": dyn["a"],
                "v": dyn["v"],
                "static": (d["arousal_mean"], d["valence_mean"]),
            }
    return out


def synthetic_songs() -> dict[str, dict]:
    """Four PMEmo-like songs (2 Hz from 15.5 s, labels in [0, 1]), for the error cases."""
    out = {}
    for i, (sid, n) in enumerate([("1", 60), ("4", 68), ("10", 90), ("25", 60)]):
        t = 15.5 + 0.5 * np.arange(n)
        a = np.round(0.5 + 0.3 * np.sin(0.2 * np.arange(n) + i), 4)
        v = np.round(0.5 + 0.3 * np.cos(0.1 * np.arange(n) + i), 4)
        out[sid] = {"t": [f"{x:g}" for x in t], "a": list(a), "v": list(v), "static": (0.4 + 0.1 * i, 0.6 - 0.1 * i)}
    return out


@pytest.fixture
def real_root(tmp_path: Path) -> Path:
    return write_pmemo(tmp_path / "PMEmo2019", real_songs())


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return write_pmemo(tmp_path / "PMEmo2019", synthetic_songs())


# --------------------------------------------------------------------------------------------- good data


def test_real_samples_native_scale(real_root):
    songs = real_songs()
    ds = load_pmemo(real_root)
    assert ds.scale == "unit" and ds.name.startswith("pmemo:")
    assert set(ds.songs) == set(songs) == {"108", "372", "634", "683"}
    assert ds.songs["108"].path == real_root / AUDIO_DIR / "108.mp3" and ds.songs["108"].duration_s is None
    for sid, s in songs.items():
        c = ds.consensus[sid]
        assert c.annotator_id == "consensus"
        assert c.start_step == 31  # frameTime 15.5 s
        assert c.n_steps == len(s["t"])
        np.testing.assert_allclose(c.times, s["t"])
        np.testing.assert_allclose(c.values[:, 0], s["a"], atol=1e-6)  # arousal first
        np.testing.assert_allclose(c.values[:, 1], s["v"], atol=1e-6)
    assert {ds.consensus[s].n_steps for s in songs} == {60, 68, 90}
    # the averaged curves are also the dataset's curves (no per-listener curves are public)
    assert [c.song_id for c in ds.curves] == ["108", "372", "634", "683"]
    assert all(c is ds.consensus[c.song_id] for c in ds.curves) and ds.annotators == ["consensus"]
    assert ds.info["per_listener"] is False
    np.testing.assert_allclose(ds.info["static"]["634"], songs["634"]["static"])


def test_real_samples_deam_scale(real_root):
    native = load_pmemo(real_root)
    deam = load_pmemo(real_root, scale="deam")
    assert deam.scale == "deam"
    for sid, c in deam.consensus.items():
        np.testing.assert_allclose(c.values, 2 * native.consensus[sid].values - 1, atol=1e-6)
        assert c.start_step == native.consensus[sid].start_step
    np.testing.assert_allclose(deam.info["static"]["108"], 2 * np.array(native.info["static"]["108"]) - 1)
    assert read_pmemo_dynamic(real_root, scale="deam")["372"].values.min() >= -1
    # the real high-arousal song is high on both scales
    assert native.consensus["372"].values[:, 0].mean() > 0.7 and deam.consensus["372"].values[:, 0].mean() > 0.4


def test_unknown_scale(root):
    with pytest.raises(ValueError, match="scale must be one of"):
        load_pmemo(root, scale="percent")


def test_static_reader(root):
    static = read_pmemo_static(root)
    assert set(static) == {"1", "4", "10", "25"} and static["1"].shape == (2,)
    np.testing.assert_allclose(static["4"], [0.5, 0.5])
    np.testing.assert_allclose(read_pmemo_static(root, scale="deam")["1"], [-0.2, 0.2])


def test_missing_static_file_is_reported(root):
    (root / STATIC_FILE).unlink()
    ds = load_pmemo(root)
    assert len(ds.songs) == 4 and ds.info["static"] == {}
    assert any(r["reason"] == "no static label file" for r in ds.info["dropped"])


def test_check_pmemo_summary(root):
    report = check_pmemo(root)
    assert report["ok"] and report["problems"] == []
    s = report["summary"]
    assert s["songs"] == 4 and s["curves"] == 4 and s["listeners"] == 0
    assert s["labelled_time_s"]["consensus"] == (60 + 68 + 90 + 60) * 0.5
    lo, hi = s["label_range"]["consensus"]["arousal"]
    assert 0 <= lo < hi <= 1
    assert s["scale"] == "unit"


# --------------------------------------------------------------------------------------------- bad data


def edit_dynamic(root: Path, line: int, col: int, value: str) -> Path:
    path = root / DYNAMIC_FILE
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    rows[line - 1][col] = value
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


# Song "1" is on lines 2-61, song "4" on lines 62-129.
BAD_CASES = {
    "off grid": (5, 1, "17.25", r"frameTime 17.25 s is not on the 0.5 s grid"),
    "not increasing": (6, 1, "16.5", r"musicId 1: frameTime 16.5 does not increase \(previous 17 at line 5\)"),
    "gap": (70, 1, "20.5", r"musicId 4: frameTime jumps from 19 \(line 69\) to 20.5: missing frames"),
    "NaN": (10, 2, "NaN", r"column Arousal\(mean\): missing value"),
    "empty": (11, 3, "", r"column Valence\(mean\): missing value"),
    "above 1": (12, 2, "1.2", r"column Arousal\(mean\): value 1.2 out of range \[0, 1\]"),
    "below 0": (13, 3, "-0.1", r"column Valence\(mean\): value -0.1 out of range"),
    "non-numeric": (14, 3, "high", r"non-numeric value 'high'"),
    "bad musicId": (15, 0, "abc", r"musicId 'abc' is not an integer"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_dynamic_file_raises_naming_file_and_line(root, case):
    line, col, value, message = BAD_CASES[case]
    path = edit_dynamic(root, line, col, value)
    with pytest.raises(DataError, match=message) as err:
        load_pmemo(root)
    assert f"{path}:{line}:" in str(err.value)
    with pytest.raises(DataError, match=message):
        read_pmemo_dynamic(root)


def test_missing_column(root):
    path = edit_dynamic(root, 1, 2, "Arousal")
    with pytest.raises(DataError, match=r"dynamic_annotations.csv:1: missing column\(s\) Arousal\(mean\)"):
        load_pmemo(root)
    assert f"{path}:1:" in check_pmemo(root)["problems"][0]


def test_missing_audio_names_the_song_and_line(root):
    (root / AUDIO_DIR / "10.mp3").unlink()
    with pytest.raises(DataError, match=r"musicId 10 has no audio file .*chorus/10.mp3") as err:
        load_pmemo(root)
    assert f"{root / DYNAMIC_FILE}:130:" in str(err.value)  # song "10" starts on line 130
    ds = load_pmemo(root, require_audio=False)
    assert "10" in ds.songs and ds.info["missing_audio"] == ["10"]


def test_static_file_errors(root):
    path = root / STATIC_FILE
    rows = list(csv.reader(open(path, newline="")))
    rows[2][1] = "2.0"
    rows[3][0] = "1"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(DataError) as err:
        load_pmemo(root)
    msg = str(err.value)
    assert msg.startswith("2 problem(s)")
    assert f"{path}:3: column Arousal(mean): value 2 out of range" in msg
    assert f"{path}:4: musicId 1 listed twice (also line 2)" in msg


def test_not_strict_skips_bad_songs(root):
    edit_dynamic(root, 5, 1, "17.25")
    (root / AUDIO_DIR / "25.mp3").unlink()
    ds = load_pmemo(root, strict=False)
    assert set(ds.songs) == {"4", "10"} == set(ds.consensus)
    assert len(ds.info["problems"]) == 2
    assert any(r["song_id"] == "1" and r["line"] == 2 for r in ds.info["dropped"])
    report = check_pmemo(root)
    assert not report["ok"] and report["problems"] == ds.info["problems"] and report["summary"]["songs"] == 2


def test_no_dynamic_file(tmp_path):
    with pytest.raises(DataError, match="dynamic_annotations.csv not found"):
        load_pmemo(tmp_path)
    assert not check_pmemo(tmp_path)["ok"]


def test_a_repeated_frame_is_one_problem(root):
    edit_dynamic(root, 6, 1, "17")  # line 5 is frameTime 17 too
    ds = load_pmemo(root, strict=False)
    assert len(ds.info["problems"]) == 1 and "frameTime 17 does not increase" in ds.info["problems"][0]
    assert set(ds.songs) == {"4", "10", "25"}

"""DEAM readers on tiny fixtures written in the official layout, and on the real averaged files."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from pdmer.data.deam import (
    AUDIO_DIR,
    AVERAGED_DIR,
    RATERS_DIR,
    check_deam,
    load_deam,
    parse_sample_columns,
    read_deam_averaged,
    read_deam_raters,
)
from pdmer.data.types import DataError

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def sample_columns(start_ms: int, n: int) -> list[str]:
    return [f"sample_{start_ms + 500 * i}ms" for i in range(n)]


def wave(n: int, seed: int, offset: float = 0.0) -> list[float]:
    """A smooth, moving curve in about [-0.7, 0.7]."""
    t = np.arange(n)
    return list(np.round(offset + 0.4 * np.sin(0.15 * t + seed) + 0.2 * np.cos(0.05 * t * (seed + 1)), 6))


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            w.writerow(["" if isinstance(x, float) and math.isnan(x) else x for x in r])
    return path


def rater_path(root: Path, label: str, song: str) -> Path:
    return root / RATERS_DIR / label / f"{song}.csv"


# Who rated what in the fixture: (worker, song) -> n values from 15 s; labels given.
CLIP_N, TEST_N = 61, 150  # clips as 15-45 s (61 values, cropped to 60); test song 2001 is long


def curve_of(worker: str, song: str, label: str) -> list[float]:
    n = TEST_N if song == "2001" else CLIP_N
    if (worker, song, label) == ("A3", "1001", "arousal"):
        return [0.25] * n  # slider not moved: flat
    seed = int(song) % 7 + 3 * int(worker[1:]) + (0 if label == "arousal" else 11)
    return wave(n, seed, offset=0.1 if label == "arousal" else -0.1)


RATINGS = {  # song -> {worker: labels given}
    "1001": {"A1": "av", "A2": "av", "A3": "av", "A4": "av"},
    "1002": {"A1": "av", "A2": "a", "A3": "av"},  # A2: arousal only (reported)
    "1003": {"A1": "av", "A2": "av", "A3": "av"},
    "2001": {"A1": "av", "A2": "av", "A3": "av"},
}


def write_song(root: Path, song: str, label: str, workers: list[str]) -> Path:
    n = TEST_N if song == "2001" else CLIP_N
    rows = [[w] + curve_of(w, song, label) for w in workers]
    return write_csv(rater_path(root, label, song), ["WorkerId"] + sample_columns(15000, n), rows)


@pytest.fixture
def deam_root(tmp_path: Path) -> Path:
    root = tmp_path / "DEAM"
    for song, raters in RATINGS.items():
        for label in ("arousal", "valence"):
            write_song(root, song, label, [w for w, given in raters.items() if label[0] in given])
    # 1004: an older-format file pair without a WorkerId column (skipped and reported)
    for label in ("arousal", "valence"):
        write_csv(rater_path(root, label, "1004"), sample_columns(15000, CLIP_N), [wave(CLIP_N, 1), wave(CLIP_N, 2)])
    # averaged labels: clips with 60 values, the test song long; rows end in empty cells as in DEAM
    n_cols = TEST_N
    for label in ("arousal", "valence"):
        rows = []
        for song in ("1001", "1002", "1003", "2001"):
            vals = wave(TEST_N if song == "2001" else 60, int(song) % 5, 0.05 if label == "arousal" else -0.05)
            rows.append([song] + vals + [""] * (n_cols - len(vals)))
        write_csv(root / AVERAGED_DIR / f"{label}.csv", ["song_id"] + sample_columns(15000, n_cols), rows)
    return root


def load_small(root: Path, **kw):
    return load_deam(root, **{"min_songs_per_listener": 3, **kw})


# --------------------------------------------------------------------------------------------- time


def test_sample_column_time_maps_to_step():
    problems = []
    assert parse_sample_columns(["sample_15000ms", "sample_15500ms"], Path("x.csv"), problems) == 30
    assert parse_sample_columns(["sample_16000ms"], Path("x.csv"), problems) == 32
    assert parse_sample_columns(["sample_0ms", "sample_500ms"], Path("x.csv"), problems) == 0
    assert problems == []


def test_curves_start_at_step_30_and_keep_label_order(deam_root):
    ds = load_small(deam_root)
    (c,) = [c for c in ds.curves if (c.song_id, c.annotator_id) == ("1001", "A1")]
    assert c.start_step == 30 and c.n_steps == 60  # 61 values (15-45 s) cropped to 15-44.5 s
    assert c.times[0] == 15.0 and c.times[-1] == 44.5
    np.testing.assert_allclose(c.values[:, 0], curve_of("A1", "1001", "arousal")[:60], atol=1e-6)
    np.testing.assert_allclose(c.values[:, 1], curve_of("A1", "1001", "valence")[:60], atol=1e-6)
    assert c.values.dtype == np.float32


def test_rater_file_starting_later_keeps_its_offset(tmp_path):
    root = tmp_path / "DEAM"
    for label in ("arousal", "valence"):
        write_csv(rater_path(root, label, "1500"), ["WorkerId"] + sample_columns(16000, 4), [["W", 0.1, 0.2, 0.3, 0.4]])
    (c,) = read_deam_raters(root)
    assert (c.song_id, c.annotator_id, c.start_step, c.n_steps) == ("1500", "W", 32, 4)


# --------------------------------------------------------------------------------------------- good data


def test_load_reports_every_filter(deam_root):
    ds = load_small(deam_root)
    assert ds.scale == "deam" and ds.name.startswith("deam:")
    pairs = {(c.song_id, c.annotator_id) for c in ds.curves}
    assert pairs == {
        ("1001", "A1"),
        ("1002", "A1"),
        ("1003", "A1"),
        ("2001", "A1"),
        ("1001", "A2"),
        ("1003", "A2"),
        ("2001", "A2"),
        ("1002", "A3"),
        ("1003", "A3"),
        ("2001", "A3"),
    }
    dropped = ds.info["dropped"]

    # a rater with arousal only is reported, not zero-filled
    (one,) = [r for r in dropped if r["annotator_id"] == "A2" and r["song_id"] == "1002"]
    assert one["reason"] == "rater gave arousal but no valence" and one["file"].endswith("arousal/1002.csv")
    assert ds.info["filters"]["read"]["n_one_label_raters"] == 1

    # files without WorkerId are skipped and reported
    skipped = [r for r in dropped if r["action"] == "skipped" and r["song_id"] == "1004"]
    assert {Path(r["file"]).parent.name for r in skipped} == {"arousal", "valence"}
    assert all("WorkerId" in r["reason"] for r in skipped)
    assert "1004" not in ds.songs

    # the flat curve is filtered, with its deviation
    assert ds.info["filters"]["flat"]["dropped"] == [["1001", "A3"]]
    (flat,) = [r for r in dropped if r["stage"] == "flat"]
    assert "arousal" in flat["reason"] and flat["mad"][0] < 0.01 <= flat["mad"][1]

    # the listener under the minimum is dropped with its count
    ms = ds.info["filters"]["min_songs"]
    assert ms["listeners_dropped"] == {"A4": 1} and ms["n_curves_dropped"] == 1

    # split and crop
    assert ds.info["split"] == {"train": ["1001", "1002", "1003"], "test": ["2001"]}
    assert ds.info["filters"]["crop"]["steps"] == [30, 90]
    assert all(c.n_steps == 60 for c in ds.curves if c.song_id != "2001")
    assert all(c.n_steps == TEST_N and c.start_step == 30 for c in ds.curves if c.song_id == "2001")


def test_min_songs_counts_after_the_flat_filter(deam_root):
    ds = load_small(deam_root, min_songs_per_listener=4)
    assert ds.annotators == ["A1"]  # A3 has 4 songs but one flat curve, A2 has 3
    assert ds.info["filters"]["min_songs"]["listeners_dropped"] == {"A2": 3, "A3": 3, "A4": 1}


def test_authors_defaults_drop_listeners_with_15_songs_or_fewer(deam_root):
    ds = load_deam(deam_root)
    assert ds.curves == [] and ds.info["filters"]["min_songs"]["n_listeners_dropped"] == 4
    assert set(ds.consensus) == {"1001", "1002", "1003", "2001"}  # the consensus is not filtered


def test_min_songs_scope_train_keeps_test_curves(deam_root):
    ds = load_deam(deam_root, min_songs_per_listener=16, min_songs_scope="train")
    assert {c.song_id for c in ds.curves} == {"2001"}


def test_filters_can_be_switched_off(deam_root):
    ds = load_deam(deam_root, min_songs_per_listener=0, flat_mad=None, clip_steps=None)
    assert ("1001", "A3") in {(c.song_id, c.annotator_id) for c in ds.curves}
    assert {c.n_steps for c in ds.curves if c.song_id != "2001"} == {CLIP_N}


def test_train_max_id_and_test_ids(deam_root):
    ds = load_small(deam_root, train_max_id=1001, min_songs_per_listener=0)
    assert ds.info["split"] == {"train": ["1001"], "test": ["2001"]}
    assert ds.info["filters"]["split"]["songs_dropped"] == ["1002", "1003"]
    assert {c.song_id for c in ds.curves} == {"1001", "2001"}


def test_songs_consensus_and_audio_paths(deam_root):
    ds = load_small(deam_root)
    assert set(ds.songs) == {"1001", "1002", "1003", "2001"}
    song = ds.songs["1002"]
    assert song.path == deam_root / AUDIO_DIR / "1002.mp3" and song.duration_s is None
    assert ds.info["missing_audio"] == ["1001", "1002", "1003", "2001"]
    c = ds.consensus["1001"]
    assert c.annotator_id == "consensus" and c.start_step == 30 and c.n_steps == 60
    assert ds.consensus["2001"].n_steps == TEST_N
    with pytest.raises(DataError, match=r"audio of song 1001 not found"):
        load_small(deam_root, require_audio=True)
    (deam_root / AUDIO_DIR).mkdir()
    for s in ds.songs:
        (deam_root / AUDIO_DIR / f"{s}.mp3").write_bytes(b"")
    assert load_small(deam_root, require_audio=True).info["missing_audio"] == []


def test_arousal_and_valence_of_different_lengths_are_trimmed_and_reported(tmp_path):
    root = tmp_path / "DEAM"
    write_csv(
        rater_path(root, "arousal", "1500"), ["WorkerId"] + sample_columns(15000, 5), [["W", 0.1, 0.2, 0.3, 0.4, 0.5]]
    )
    write_csv(rater_path(root, "valence", "1500"), ["WorkerId"] + sample_columns(15000, 4), [["W", 0.1, 0.2, 0.3, 0.4]])
    dropped = []
    (c,) = read_deam_raters(root, dropped=dropped)
    assert c.n_steps == 4
    assert dropped[0]["action"] == "trimmed" and dropped[0]["kept_steps"] == [30, 34]


def test_check_deam_summary(deam_root):
    report = check_deam(deam_root, min_songs_per_listener=3)
    assert report["ok"] and report["problems"] == []
    s = report["summary"]
    assert s["songs"] == 4 and s["listeners"] == 3 and s["curves"] == 10
    assert s["songs_per_listener"] == {"min": 3, "median": 3.0, "max": 4}
    assert s["labelled_time_s"]["curves"] == sum(c for c in [60] * 7 + [TEST_N] * 3) * 0.5
    lo, hi = s["label_range"]["curves"]["arousal"]
    assert -1 <= lo < hi <= 1
    assert report["split"] == {"train": 3, "test": 1}
    assert report["filters"]["flat"]["n_dropped"] == 1
    assert report["missing_audio"] == 4


# --------------------------------------------------------------------------------------------- bad data


def rewrite(path: Path, edit) -> None:
    """Apply edit(rows) to a CSV file's rows (header included) in place."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    edit(rows)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def set_cell(line: int, col: int, value: str):
    def edit(rows):
        rows[line - 1][col] = value

    return edit


def drop_column(col: int):
    def edit(rows):
        for r in rows:
            del r[col]

    return edit


BAD_CASES = {
    # name: (file to edit, edit, expected message, line named)
    "empty cell inside a curve": (
        "arousal/1002.csv",
        set_cell(2, 10, ""),
        r"missing value \(empty or NaN\) inside the curve "
        r"at column\(s\) sample_19500ms",
        2,
    ),
    "NaN inside a curve": ("valence/1003.csv", set_cell(3, 5, "NaN"), r"missing value", 3),
    "out of range": ("arousal/1001.csv", set_cell(4, 7, "1.5"), r"column sample_18000ms: value 1.5 out of range", 4),
    "non-numeric": ("valence/2001.csv", set_cell(2, 100, "abc"), r"non-numeric value 'abc'", 2),
    "missing column": (
        "arousal/1003.csv",
        drop_column(2),
        r"missing column\(s\) between 'sample_15000ms' and "
        r"'sample_16000ms' \(expected sample_15500ms\)",
        1,
    ),
    "misaligned column": (
        "valence/1001.csv",
        set_cell(1, 1, "sample_15250ms"),
        r"column 'sample_15250ms': 15.25 s "
        r"is not on the 0.5 s grid",
        1,
    ),
    "decreasing columns": ("valence/1001.csv", set_cell(1, 3, "sample_15000ms"), r"does not increase", 1),
    "not a sample column": ("arousal/2001.csv", set_cell(1, 4, "time"), r"column 'time' is not a sample_<ms>ms", 1),
    "duplicate worker": (
        "arousal/1003.csv",
        set_cell(3, 0, "A1"),
        r"worker 'A1' listed twice for song 1003 "
        r"\(also line 2\)",
        3,
    ),
    "empty worker": ("arousal/1003.csv", set_cell(3, 0, " "), r"empty WorkerId", 3),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_rater_file_raises_naming_file_and_line(deam_root, case):
    rel, edit, message, line = BAD_CASES[case]
    path = deam_root / RATERS_DIR / rel
    rewrite(path, edit)
    with pytest.raises(DataError, match=message) as err:
        load_small(deam_root)
    assert f"{path}:{line}:" in str(err.value)
    with pytest.raises(DataError, match=message):
        read_deam_raters(deam_root)


def test_all_problems_are_listed_in_one_error(deam_root):
    a, v = deam_root / RATERS_DIR / "arousal/1001.csv", deam_root / AVERAGED_DIR / "valence.csv"
    rewrite(a, set_cell(2, 3, "x"))
    rewrite(a, set_cell(3, 3, "-2"))
    rewrite(v, set_cell(2, 5, ""))
    with pytest.raises(DataError) as err:
        load_small(deam_root)
    msg = str(err.value)
    assert msg.startswith("3 problem(s) in DEAM data under")
    assert f"{a}:2:" in msg and f"{a}:3:" in msg and f"{v}:2:" in msg


def test_averaged_file_errors(deam_root):
    path = deam_root / AVERAGED_DIR / "arousal.csv"
    rewrite(path, set_cell(1, 0, "id"))
    with pytest.raises(DataError, match=r"arousal.csv:1: missing column 'song_id'"):
        read_deam_averaged(deam_root)
    rewrite(path, set_cell(1, 0, "song_id"))
    rewrite(path, set_cell(3, 0, "1001"))
    with pytest.raises(DataError, match=r"arousal.csv:3: song 1001 listed twice \(also line 2\)"):
        read_deam_averaged(deam_root)


def test_not_strict_skips_bad_rows_and_returns_problems(deam_root):
    path = deam_root / RATERS_DIR / "arousal/1003.csv"
    rewrite(path, set_cell(2, 10, ""))  # A1's arousal of 1003
    ds = load_small(deam_root, strict=False)
    assert len(ds.info["problems"]) == 1 and ds.info["problems"][0].startswith(f"{path}:2:")
    assert ("1003", "A1") not in {(c.song_id, c.annotator_id) for c in ds.curves}
    # the valence of that rating is left out too, and reported
    assert any(
        r["song_id"] == "1003" and r["annotator_id"] == "A1" and r["reason"].startswith("arousal rejected")
        for r in ds.info["dropped"]
    )
    report = check_deam(deam_root, min_songs_per_listener=3)
    assert not report["ok"] and report["problems"] == ds.info["problems"]


def test_no_annotations_at_all(tmp_path):
    with pytest.raises(DataError, match="no DEAM annotations"):
        load_deam(tmp_path)
    report = check_deam(tmp_path)
    assert not report["ok"] and "no DEAM annotations" in report["problems"][0]


def test_averaged_only_dataset(deam_root):
    import shutil

    shutil.rmtree(deam_root / RATERS_DIR)
    ds = load_deam(deam_root)
    assert ds.curves == [] and len(ds.consensus) == 4
    assert any(r["reason"] == "no per-rater folder" for r in ds.info["dropped"])


# --------------------------------------------------------------------------------------------- real files


@pytest.fixture
def real_deam(tmp_path: Path) -> Path:
    src = SHARED / "deam"
    if not (src / "arousal.csv").is_file() or not (src / "valence.csv").is_file():
        pytest.skip(f"real DEAM annotation files not available ({src.resolve()} absent)")
    folder = tmp_path / "DEAM" / AVERAGED_DIR
    folder.mkdir(parents=True)
    for label in ("arousal", "valence"):
        (folder / f"{label}.csv").symlink_to((src / f"{label}.csv").resolve())
    return tmp_path / "DEAM"


def test_real_averaged_files(real_deam):
    dropped = []
    curves = read_deam_averaged(real_deam, dropped=dropped)
    assert len(curves) == 1802
    clips = [c for s, c in curves.items() if int(s) <= 2000]
    full = [c for s, c in curves.items() if int(s) > 2000]
    assert len(full) == 58 and {int(s) for s in curves if int(s) > 2000} <= set(range(2001, 2059))
    assert all(c.start_step == 30 for c in curves.values())
    assert {c.n_steps for c in clips} <= {60, 61}
    assert all(61 < c.n_steps <= 1224 for c in full) and max(c.n_steps for c in full) >= 1223
    v = np.concatenate([c.values for c in curves.values()])
    assert np.isfinite(v).all() and np.abs(v).max() <= 1.0
    # a few full songs have one more arousal than valence value (or the reverse): trimmed, reported
    assert dropped and all(r["action"] == "trimmed" and int(r["song_id"]) > 2000 for r in dropped)

    ds = load_deam(real_deam)
    assert len(ds.info["split"]["train"]) == 1744 and len(ds.info["split"]["test"]) == 58
    assert {ds.consensus[s].n_steps for s in ds.info["split"]["train"]} == {60}


def test_rater_file_without_sample_columns(tmp_path):
    root = tmp_path / "DEAM"
    path = write_csv(rater_path(root, "arousal", "1500"), ["WorkerId"], [["W"]])
    write_csv(rater_path(root, "valence", "1500"), ["WorkerId"] + sample_columns(15000, 2), [["W", 0.1, 0.2]])
    with pytest.raises(DataError) as err:
        read_deam_raters(root)
    assert f"{path}:1: no sample_<ms>ms columns" in str(err.value)

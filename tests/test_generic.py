"""The generic loader: resampling onto the 2 Hz grid and validation messages."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from pdmer.data.generic import DEAM_RANGE, load_generic, resample_to_grid
from pdmer.data.types import STEP_S, DataError

HEADER = "song_id,annotator_id,time_s,valence,arousal\n"


def make_root(
    tmp_path: Path,
    ratings: str | None,
    songs=("s1",),
    ext: str = "wav",
    header: str = HEADER,
    extra: dict[str, str] | None = None,
) -> Path:
    """A dataset folder with (empty, never decoded) audio files and the given CSV bodies."""
    root = tmp_path / "ds"
    (root / "audio").mkdir(parents=True)
    for s in songs:
        (root / "audio" / f"{s}.{ext}").write_bytes(b"")
    if ratings is not None:
        (root / "ratings.csv").write_text(header + ratings)
    for name, body in (extra or {}).items():
        (root / name).write_text(header + body)
    return root


def rows(song: str, ann: str, times, val, aro) -> str:
    return "".join(f"{song},{ann},{t!r},{v!r},{a!r}\n" for t, v, a in zip(times, val, aro, strict=False))


def test_uniform_2hz_passes_exactly(tmp_path):
    rng = np.random.default_rng(0)
    t = 15.0 + STEP_S * np.arange(60)
    v = np.round(rng.uniform(-1, 1, 60), 4)
    a = np.round(rng.uniform(-1, 1, 60), 4)
    root = make_root(tmp_path, rows("s1", "A", t.tolist(), v.tolist(), a.tolist()))
    ds = load_generic(root)
    (c,) = ds.curves
    assert c.start_step == 30 and c.n_steps == 60
    np.testing.assert_array_equal(c.times, t)
    np.testing.assert_array_equal(c.values[:, 0], a.astype(np.float32))  # internal order: arousal, valence
    np.testing.assert_array_equal(c.values[:, 1], v.astype(np.float32))
    assert ds.songs["s1"].duration_s is None
    assert ds.oracle is None and ds.consensus is None
    assert ds.name == f"generic:{root}"


def test_resample_from_1hz(tmp_path):
    t = np.arange(15.0, 31.0, 1.0)  # 1 Hz, 15..30 s
    a = 0.05 * (t - 22.0)  # linear: interpolation is exact
    v = -0.03 * (t - 20.0)
    root = make_root(tmp_path, rows("s1", "A", t.tolist(), v.tolist(), a.tolist()))
    (c,) = load_generic(root).curves
    grid = np.arange(30, 61) * STEP_S  # 15.0 .. 30.0
    assert c.start_step == 30 and c.n_steps == len(grid)
    np.testing.assert_allclose(c.values[:, 0], 0.05 * (grid - 22.0), atol=1e-6)
    np.testing.assert_allclose(c.values[:, 1], -0.03 * (grid - 20.0), atol=1e-6)


def test_resample_from_10hz(tmp_path):
    t = np.round(np.arange(150, 301) / 10.0, 1)  # 10 Hz, 15.0 .. 30.0 s
    a = np.round(0.5 * np.sin(t), 4)
    v = np.round(0.4 * np.cos(0.7 * t), 4)
    root = make_root(tmp_path, rows("s1", "A", t.tolist(), v.tolist(), a.tolist()))
    (c,) = load_generic(root).curves
    on_grid = np.isclose((t / STEP_S) % 1, 0) | np.isclose((t / STEP_S) % 1, 1)  # 10 Hz contains the grid
    assert c.start_step == 30 and c.n_steps == on_grid.sum() == 31
    np.testing.assert_allclose(c.values[:, 0], a[on_grid], atol=1e-6)
    np.testing.assert_allclose(c.values[:, 1], v[on_grid], atol=1e-6)


def test_resample_irregular_matches_numpy_interp():
    rng = np.random.default_rng(1)
    t = np.sort(rng.uniform(15.2, 44.9, 40))
    t[0], t[-1] = 15.2, 44.9
    vals = rng.uniform(-1, 1, (40, 2))
    start, out = resample_to_grid(t, vals)
    assert start == 31  # first grid time >= 15.2 is 15.5
    grid = np.arange(start, start + len(out)) * STEP_S
    assert grid[-1] <= t[-1] < grid[-1] + STEP_S
    for d in range(2):
        np.testing.assert_allclose(out[:, d], np.interp(grid, t, vals[:, d]))


def test_column_order_and_extra_columns(tmp_path):
    header = "arousal,extra,time_s,annotator_id,valence,song_id\n"
    body = "0.1,x,15.0,A,0.2,s1\n0.3,y,15.5,A,0.4,s1\n"
    root = make_root(tmp_path, body, header=header)
    (c,) = load_generic(root).curves
    np.testing.assert_allclose(c.values, [[0.1, 0.2], [0.3, 0.4]], atol=1e-7)


def test_oracle_and_consensus(tmp_path):
    r = rows("s1", "A", [15.0, 15.5], [0.1, 0.2], [0.3, 0.4])
    o = rows("s1", "A", [15.0, 15.5], [0.0, 0.0], [0.5, 0.5])
    cons = rows("s1", "consensus", [15.0, 15.5], [0.1, 0.1], [0.2, 0.2])
    root = make_root(tmp_path, r, extra={"oracle.csv": o, "consensus.csv": cons})
    ds = load_generic(root, name="x")
    assert ds.name == "x"
    np.testing.assert_allclose(ds.oracle["A", "s1"].values, [[0.5, 0.0], [0.5, 0.0]])
    np.testing.assert_allclose(ds.consensus["s1"].values, [[0.2, 0.1], [0.2, 0.1]])


def test_range_tolerance(tmp_path):
    ok = rows("s1", "A", [15.0, 15.5], [DEAM_RANGE - 0.01, 0.0], [-(DEAM_RANGE - 0.01), 0.0])
    load_generic(make_root(tmp_path, ok))
    bad = rows("s1", "A", [15.0, 15.5], [DEAM_RANGE + 0.01, 0.0], [0.0, 0.0])
    with pytest.raises(DataError, match="outside"):
        load_generic(make_root(tmp_path / "b", bad))


def test_unit_scale(tmp_path):
    body = rows("s1", "A", [15.0, 15.5], [0.9, 0.1], [-0.3, 0.5])
    with pytest.raises(DataError, match=r"line 2 .*arousal=-0.3 is outside"):
        load_generic(make_root(tmp_path, body), scale="unit")


GOOD = rows("s1", "A", [15.0, 15.5, 16.0], [0.1, 0.2, 0.3], [0.0, 0.1, 0.2])


@pytest.mark.parametrize(
    "body, expected",
    [
        (
            GOOD.replace("0.2,0.1", "abc,0.1"),
            [r"ratings\.csv line 3 \(song 's1', annotator 'A'\)", "valence='abc' is not a number"],
        ),
        (
            GOOD.replace("0.2,0.1", "nan,0.1"),
            [r"ratings\.csv line 3 \(song 's1', annotator 'A'\)", "valence='nan' is not finite"],
        ),
        (
            GOOD.replace("0.3,0.2", "0.3,inf"),
            [r"ratings\.csv line 4 \(song 's1', annotator 'A'\)", "arousal='inf' is not finite"],
        ),
        (
            GOOD.replace("0.3,0.2", "0.3,1.5"),
            [r"ratings\.csv line 4 \(song 's1', annotator 'A'\)", r"arousal=1.5 is outside \[-1.05, 1.05\]"],
        ),
        (
            GOOD.replace("16.0", "15.5"),
            [r"ratings\.csv line 4 \(song 's1', annotator 'A'\)", "duplicate time_s=15.5 .*line 3"],
        ),
        (
            GOOD.replace("16.0", "14.0"),
            [r"ratings\.csv line 4 \(song 's1', annotator 'A'\)", "time_s=14.0 is not after time_s=15.5 on line 3"],
        ),
        (GOOD.replace("15.0", "-1.0"), [r"ratings\.csv line 2 \(song 's1', annotator 'A'\)", "negative"]),
        (
            GOOD.replace("16.0", "inf"),
            [r"ratings\.csv line 4 \(song 's1', annotator 'A'\)", "time_s='inf' is not finite"],
        ),
        (
            GOOD.replace("15.5", "NaN"),
            [r"ratings\.csv line 3 \(song 's1', annotator 'A'\)", "time_s='NaN' is not finite"],
        ),
        (
            rows("s1", "A", [15.0], [0.1], [0.1]),
            [r"ratings\.csv \(song 's1', annotator 'A'\), line 2", "only 1 rating"],
        ),
        (GOOD + rows("s2", "A", [15.0, 15.5], [0.1, 0.1], [0.1, 0.1]), [r"ratings\.csv: song 's2' has no audio file"]),
        (GOOD + "s1,A,16.5\n", [r"ratings\.csv line 5: 3 fields, header has 5"]),
        (
            rows("s1", "A", [15.1, 15.3], [0.1, 0.1], [0.1, 0.1]),
            [r"ratings\.csv \(song 's1', annotator 'A'\)", "no 0.5 s grid time"],
        ),
        ("", [r"ratings\.csv: no data rows"]),
    ],
    ids=[
        "non-numeric",
        "nan",
        "inf",
        "out-of-range",
        "duplicate-time",
        "time-backwards",
        "negative-time",
        "infinite-time",
        "nan-time",
        "one-rating",
        "no-audio",
        "short-row",
        "no-grid-time",
        "empty",
    ],
)
def test_errors_name_file_and_line(tmp_path, body, expected):
    root = make_root(tmp_path, body)
    with pytest.raises(DataError) as e:
        load_generic(root)
    msg = str(e.value)
    for pattern in expected:
        assert re.search(pattern, msg), f"{pattern!r} not in:\n{msg}"


def test_missing_ratings_file(tmp_path):
    root = make_root(tmp_path, None)
    with pytest.raises(DataError, match=r"ratings\.csv: file not found"):
        load_generic(root)


def test_missing_column(tmp_path):
    root = make_root(tmp_path, "s1,A,15.0,0.1\n", header="song_id,annotator_id,time_s,valence\n")
    with pytest.raises(DataError, match=r"ratings\.csv line 1: missing column\(s\) arousal"):
        load_generic(root)


def test_missing_audio_folder_and_root(tmp_path):
    root = make_root(tmp_path, GOOD)
    for p in (root / "audio").iterdir():
        p.unlink()
    (root / "audio").rmdir()
    with pytest.raises(DataError, match="audio folder not found"):
        load_generic(root)
    with pytest.raises(DataError, match="dataset folder not found"):
        load_generic(tmp_path / "nowhere")


def test_two_audio_files_for_one_song(tmp_path):
    root = make_root(tmp_path, GOOD)
    (root / "audio" / "s1.flac").write_bytes(b"")
    with pytest.raises(DataError, match="song 's1' has two audio files"):
        load_generic(root)


def test_all_problems_listed_at_once(tmp_path):
    body = (
        GOOD.replace("0.2,0.1", "abc,0.1")  # line 3
        + rows("s2", "B", [15.0, 15.0], [0.1, 0.1], [0.1, 0.1])  # duplicate time, no audio
        + rows("s1", "C", [15.0, 15.5], [0.1, 2.0], [0.1, 0.1])  # out of range on line 8
    )
    cons = rows("s1", "consensus", [15.0, 15.5], [0.1, 0.1], [0.1, 0.1]) + rows(
        "s1", "other", [15.0, 15.5], [0.1, 0.1], [0.1, 0.1]
    )
    root = make_root(tmp_path, body, extra={"consensus.csv": cons, "oracle.csv": rows("s1", "A", [15.0], [0.1], [0.1])})
    with pytest.raises(DataError) as e:
        load_generic(root)
    msg = str(e.value)
    assert "ratings.csv line 3 (song 's1', annotator 'A'): valence='abc'" in msg
    assert "ratings.csv line 6 (song 's2', annotator 'B'): duplicate time_s=15.0" in msg
    assert "ratings.csv: song 's2' has no audio file" in msg
    assert "ratings.csv line 8 (song 's1', annotator 'C'): valence=2.0 is outside" in msg
    assert "consensus.csv: song 's1' has more than one annotator" in msg
    assert "oracle.csv (song 's1', annotator 'A'), line 2: only 1 rating(s)" in msg
    assert msg.startswith("6 problem(s) in dataset"), msg


def test_audio_extensions_and_unrated_songs(tmp_path):
    root = make_root(tmp_path, GOOD, songs=("s1", "s9"), ext="mp3")
    (root / "audio" / "notes.txt").write_text("ignored")
    ds = load_generic(root)
    assert set(ds.songs) == {"s1", "s9"}
    assert ds.songs["s1"].path.name == "s1.mp3"
    assert ds.info["unrated_songs"] == ["s9"]


def test_long_problem_lists_are_counted(tmp_path):
    from pdmer.data.generic import MAX_LISTED

    n = MAX_LISTED + 50
    body = "".join(f"s1,A{i},15.0,x,0.1\n" for i in range(n))
    with pytest.raises(DataError) as e:
        load_generic(make_root(tmp_path, body))
    msg = str(e.value)
    assert msg.startswith(f"{n} problem(s)")
    assert msg.rstrip().endswith("... and 50 more")


def test_numbers_with_surrounding_spaces_read_as_without(tmp_path):
    body = rows("s1", "A", [15.0, 15.5, 16.0], [0.1, 0.2, 0.3], [0.0, 0.1, 0.2])
    spaced = "\n".join(
        ",".join(f" {x} " if i >= 2 else x for i, x in enumerate(r.split(","))) for r in body.splitlines()
    )
    (a,) = load_generic(make_root(tmp_path / "plain", body)).curves
    (b,) = load_generic(make_root(tmp_path / "spaced", spaced + "\n")).curves
    assert a.start_step == b.start_step
    np.testing.assert_array_equal(a.values, b.values)

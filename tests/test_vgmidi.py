"""VGMIDI loader: the official layout, the annotation tool's rules, identities, rendering."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from official_layouts import write_midi

from pdmer.data.types import DataError
from pdmer.data.vgmidi import fill_unrecorded, find_soundfont, load_vgmidi, render_piece, to_grid

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "vgmidi"
ANSWERS = {
    "age": "21-25",
    "gender": "Male",
    "country": "US",
    "musicianship": 1,
    "isKnown": False,
    "ex1_valence": "1",
    "ex1_arousal": "2",
    "ex1_description": "upbeat",
    "ex2_valence": "3",
    "ex2_arousal": "Calm",
}


def curve(m: int, seed: int, lo: float = -0.9, hi: float = 0.9) -> list[float]:
    return [round(float(x), 2) for x in np.random.default_rng(seed).uniform(lo, hi, m)]


def record(m: int, seed: int, as_string: bool = False, **answers) -> dict:
    v, a = curve(m, seed), curve(m, seed + 1000)
    rec = {
        **ANSWERS,
        **answers,
        "valence": json.dumps(v) if as_string else v,
        "arousal": json.dumps(a) if as_string else a,
    }
    return rec


def fixture(tmp_path: Path) -> Path:
    """An official-layout VGMIDI folder with one case of every rule."""
    root = tmp_path / "vgmidi"
    midi = root / "labelled" / "midi"
    length = write_midi(midi / "good.mid", 20.0)  # 20 s
    write_midi(midi / "other.mid", 16.0)
    write_midi(midi / "late.mid", 20.0)
    pieces = {
        "piece0": {"midi": "good.mid", "duration": int(length), "measures": 8, "name": "Good"},
        "piece1": {"midi": "other.mid", "duration": 16, "measures": 8, "name": "Other"},
        "piece2": {"midi": "late.mid", "duration": 25, "measures": 8, "name": "Duration mismatch"},
    }
    ann = {
        # listener A (default answers): two pieces, the second with an extra value (M + 1, kept)
        "piece0_1": record(8, 1),
        "piece1_1": {**record(8, 2), "valence": curve(9, 2), "arousal": curve(9, 1002)},
        # listener B differs from A in one answer only: another listener
        "piece0_2": record(8, 3, country="CA"),
        "piece1_2": record(8, 4, country="CA", as_string=True),  # round-2 style: JSON-array strings
        # listener C: a broken curve length, and a curve with unrecorded bins (filled)
        "piece0_3": {**record(8, 5, gender="Female"), "valence": curve(11, 5), "arousal": curve(11, 1005)},
        "piece1_3": record(8, 6, gender="Female"),
        # listener D: a duplicate submission of piece0 (identical curves): both unusable
        "piece0_4": record(8, 7, age="31-35"),
        "piece0_5": record(8, 7, age="31-35"),
        "piece1_4": record(8, 8, age="31-35"),
        # listener E: under half the bins recorded
        "piece0_6": record(8, 9, age="41-45"),
        "piece1_5": record(8, 10, age="41-45"),
        # a piece with no metadata, and one whose duration does not match its MIDI
        "piece9_1": record(8, 11),
        "piece2_1": record(8, 12),
    }
    c = ann["piece1_3"]
    c["valence"][2] = c["arousal"][2] = 0.0  # one unrecorded bin
    c["valence"][7] = c["arousal"][7] = 0.0  # and the last one
    e = ann["piece1_5"]
    for i in range(5):
        e["valence"][i] = e["arousal"][i] = 0.0
    out = root / "labelled" / "annotations"
    out.mkdir(parents=True)
    (out / "vgmidi_raw_1.json").write_text(json.dumps({"pieces": pieces, "annotations": ann}))
    return root


def reasons(ds, song=None) -> list[str]:
    return [d["reason"] for d in ds.info["dropped"] if song is None or d["song_id"] == song]


def test_fixture_rules(tmp_path):
    root = fixture(tmp_path)
    ds = load_vgmidi(root, render=False, audio_dir=tmp_path / "audio")
    by = ds.by_annotator()
    assert set(ds.songs) == {"r1.piece0", "r1.piece1"}
    # a piece without metadata and a duration mismatch are dropped with their reasons
    assert any("without metadata" in r for r in reasons(ds, "r1.piece9"))
    assert any("does not match the MIDI's length" in r for r in reasons(ds, "r1.piece2"))
    # the broken curve length, the under-recorded curve and the duplicate submission are dropped
    assert any("11 values, expected measures=8" in r for r in reasons(ds))
    assert any("only 3 of 8 bins recorded" in r for r in reasons(ds))
    dup = [d for d in ds.info["dropped"] if d["stage"] == "identity"]
    assert (
        len(dup) == 1
        and "duplicate submission" in dup[0]["reason"]
        and sorted(dup[0]["records"]) == ["piece0_4", "piece0_5"]
    )
    # listeners: A and B differ in one answer; counts of usable curves per listener
    counts = sorted(len(cs) for cs in by.values())
    assert counts == [1, 1, 1, 2, 2]  # A 2, B 2, C 1 (piece1), D 1 (piece1), E 1 (piece0)
    ids = {c.annotator_id for c in ds.curves}
    assert len(ids) == 5
    # every curve covers the audio's whole steps from 0
    for c in ds.curves:
        assert c.start_step == 0 and c.n_steps == int(ds.songs[c.song_id].duration_s // 0.5)
        assert np.isfinite(c.values).all() and np.abs(c.values).max() <= 1


def test_identity_needs_submission_index_without_tutorial_answers(tmp_path):
    root = fixture(tmp_path)
    path = root / "labelled" / "annotations" / "vgmidi_raw_1.json"
    data = json.loads(path.read_text())
    blank = {k: None for k in ("ex1_valence", "ex1_arousal", "ex1_description", "ex2_valence", "ex2_arousal")}
    data["annotations"] = {
        "piece0_7": record(8, 20, **blank),
        "piece1_7": record(8, 21, **blank),
        "piece0_8": record(8, 22, **blank),
        "piece1_8": record(8, 23, **blank),
    }
    path.write_text(json.dumps(data))
    ds = load_vgmidi(root, render=False, audio_dir=tmp_path / "audio")
    # same demographics, no tutorial answers: submissions 7 and 8 are two listeners with two pieces each
    assert sorted(len(cs) for cs in ds.by_annotator().values()) == [2, 2]


def test_time_mapping_and_filling():
    # bin i is the cursor at the END of its slice: a sample at (i + 1) * D / M
    d, _m = 8.0, 4  # slices of 2 s; samples at 2, 4, 6, 8 s
    values = np.array([[0.2, -0.2], [0.4, -0.4], [0.6, -0.6], [0.8, -0.8]])
    grid = to_grid(values, d)
    assert grid.shape == (16, 2)
    np.testing.assert_allclose(grid[:5, 0], 0.2)  # held before the first sample (t <= 2 s)
    np.testing.assert_allclose(grid[5, 0], 0.2 + 0.2 * 0.25)  # t = 2.5 s, a quarter of the way to 4 s
    np.testing.assert_allclose(grid[-1, 0], 0.8 - 0.2 * 0.25)  # t = 7.5 s
    rec = np.array([True, False, True, False])
    filled = fill_unrecorded(np.array([[0.2, 0.1], [0, 0], [0.6, 0.3], [0, 0]]), rec)
    np.testing.assert_allclose(filled, [[0.2, 0.1], [0.4, 0.2], [0.6, 0.3], [0.6, 0.3]])


def test_structural_problems_are_errors(tmp_path):
    with pytest.raises(DataError, match="vgmidi_raw_"):
        load_vgmidi(tmp_path)
    root = fixture(tmp_path)
    path = root / "labelled" / "annotations" / "vgmidi_raw_1.json"
    data = json.loads(path.read_text())
    data["pieces"]["piece1"]["midi"] = "missing.mid"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="missing.mid not found"):
        load_vgmidi(root, render=False, audio_dir=tmp_path / "audio")
    path.write_text("{not json")
    with pytest.raises(DataError, match="cannot read the JSON"):
        load_vgmidi(root, render=False)


def test_every_round_is_read(tmp_path):
    root = fixture(tmp_path)
    folder = root / "labelled" / "annotations"
    shutil.copy(folder / "vgmidi_raw_1.json", folder / "vgmidi_raw_2.json")
    ds = load_vgmidi(root, render=False, audio_dir=tmp_path / "audio")
    assert ds.info["rounds"] == ["1", "2"]
    assert {s.split(".")[0] for s in ds.songs} == {"r1", "r2"}
    assert len({c.annotator_id for c in ds.curves}) == 10  # a round's listeners are its own


def _have_fluidsynth() -> str | None:
    if shutil.which("fluidsynth") is None:
        return "FluidSynth is not installed (apt-get install fluidsynth fluid-soundfont-gm)"
    try:
        find_soundfont()
    except DataError as e:
        return str(e)
    return None


@pytest.mark.skipif(_have_fluidsynth() is not None, reason=str(_have_fluidsynth()))
def test_rendering_is_deterministic_and_cut_to_duration(tmp_path):
    import soundfile as sf

    root = fixture(tmp_path)
    ds = load_vgmidi(root, audio_dir=tmp_path / "audio")
    path = ds.songs["r1.piece1"].path
    info = sf.info(str(path))
    assert info.samplerate == 44100 and info.channels == 1 and info.frames == 16 * 44100
    first = hashlib.sha256(path.read_bytes()).hexdigest()
    from pdmer.data.vgmidi import Piece

    again = render_piece(
        Piece("1", "piece1", "r1.piece1", root / "labelled" / "midi" / "other.mid", 16.0, 8, "Other"),
        tmp_path / "again.wav",
        find_soundfont(),
    )
    assert hashlib.sha256(again.read_bytes()).hexdigest() == first
    assert np.abs(sf.read(str(path))[0]).max() > 0.01  # not silent
    assert not list((tmp_path / "audio").glob(".render-*"))  # no temporary left


@pytest.mark.skipif(not (REAL / "labelled").is_dir(), reason=f"real VGMIDI round 1 not found at {REAL}")
def test_real_round_one_counts():
    ds = load_vgmidi(REAL, render=False)
    by = ds.by_annotator()
    # ../shared/data/vgmidi/README.md: round 1: 95 pieces in the JSON (91 usable), 1,501 listeners,
    # 1,256 of them with 2 or more pieces
    assert len(ds.songs) == 91
    assert len(by) == 1501
    assert sum(len(cs) >= 2 for cs in by.values()) == 1256
    assert not ds.info["problems"]
    durations = [d for d in ds.info["dropped"] if "does not match the MIDI's length" in d["reason"]]
    assert len(durations) == 4

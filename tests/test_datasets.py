"""Real datasets end to end: DEAM / PMEmo / generic through config, splits, `data check` and `train`.

Fixtures are written in exactly the publishers' layouts (``official_layouts.py``), with real
audio, and broken on purpose: NaN, out-of-range values, a missing sample column (misaligned
times), a rater with only arousal, an unreadable file, a file shorter than its labels, a
96 kHz stereo file (generic layout; MP3 stops at 48 kHz). Each gives the intended data or the
intended error, naming the file.
"""

from __future__ import annotations

import csv
import inspect
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import SHARED_DATA, tiny_overrides
from official_layouts import (
    CLIP_IDS,
    SR,
    TEST_IDS,
    deam_fixture,
    deam_overrides,
    pmemo_fixture,
    pmemo_overrides,
    song_audio,
    write_deam,
)

from pdmer.cli import main
from pdmer.config import ConfigError, DeamConfig, FeatureConfig, config_hash, load_config
from pdmer.data.check import alignment_problems, check_data, fit_to_audio
from pdmer.data.deam import AUDIO_DIR, AVERAGED_DIR, RATERS_DIR, load_deam
from pdmer.data.loading import deam_options, load_dataset, make_splits
from pdmer.data.pmemo import DYNAMIC_FILE, STATIC_FILE, load_pmemo
from pdmer.data.types import Curve, DataError, Dataset, Song
from pdmer.features import FeatureExtractor, load_audio
from pdmer.meta.tasks import check_alignment


def cfg_for(tmp: Path, tag: str, *extra: str):
    return load_config(None, tiny_overrides(tmp, tag) + list(extra))


def rewrite_cell(path: Path, line: int, col: int, value: str) -> None:
    rows = list(csv.reader(open(path, newline="")))
    rows[line - 1][col] = value
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def drop_column(path: Path, col: int) -> None:
    rows = list(csv.reader(open(path, newline="")))
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([r[:col] + r[col + 1 :] for r in rows])


def data_check(capsys, *args) -> tuple[int, str]:
    rc = main(["data", "check", *map(str, args)])
    return rc, capsys.readouterr().out


# --------------------------------------------------------------------------------------------- config


def test_deam_config_defaults_are_the_readers_defaults_the_authors_conventions():
    sig = inspect.signature(load_deam).parameters
    opts = deam_options(DeamConfig())
    for k, v in opts.items():
        if k == "test_ids":
            assert list(v) == list(range(2001, 2059)) == list(sig[k].default)
        else:
            assert v == sig[k].default, k
    assert opts["min_songs_per_listener"] == 16 and opts["flat_mad"] == 0.01 and opts["train_max_id"] == 2000


def test_source_choices_and_hash_of_unused_options():
    with pytest.raises(ConfigError, match="data.source"):
        load_config(None, ["data.source=maestro"])
    with pytest.raises(ConfigError, match="data.split.kind"):
        load_config(None, ["data.split.kind=artist"])
    with pytest.raises(ConfigError, match="data.pmemo.scale"):
        load_config(None, ["data.pmemo.scale=percent"])
    base = load_config("pdmer.synthetic.dsaml")
    # options of a source that is not used cannot change a result, nor the run folder
    assert config_hash(base) == config_hash(
        load_config("pdmer.synthetic.dsaml", ["data.deam.min_songs_per_listener=3", "data.pmemo.scale=deam"])
    )
    deam = load_config("pdmer.synthetic.dsaml", ["data.source=deam"])
    assert config_hash(deam) != config_hash(
        load_config("pdmer.synthetic.dsaml", ["data.source=deam", "data.deam.flat_mad=null"])
    )
    assert config_hash(base) != config_hash(load_config("pdmer.synthetic.dsaml", ["data.split.kind=song"]))
    # the embedded benchmark's options are a source's too: its defaults can change without moving real-data runs
    assert config_hash(deam) == config_hash(
        load_config("pdmer.synthetic.dsaml", ["data.source=deam", "data.synthetic.n_listeners=7"])
    )
    assert config_hash(base) != config_hash(load_config("pdmer.synthetic.dsaml", ["data.synthetic.n_listeners=7"]))


# --------------------------------------------------------------------------------------------- loading


def test_load_dataset_deam_and_pmemo_from_config(session_tmp):
    root = deam_fixture(session_tmp)
    cfg = cfg_for(session_tmp, "x", "data.source=deam", *deam_overrides(root))
    ds = load_dataset(cfg.data)
    assert ds.scale == "deam" and ds.info["options"]["min_songs_per_listener"] == 3
    assert sorted(ds.info["split"]["test"]) == list(TEST_IDS) and len(ds.info["split"]["train"]) == len(CLIP_IDS)
    assert {c.annotator_id for c in ds.curves} == {"W1", "W2", "W3", "W4"}  # W5 (arousal only) and W6 (flat) left out
    assert any(
        r["reason"] == "rater gave arousal but no valence" and r["annotator_id"] == "W5" for r in ds.info["dropped"]
    )
    assert ds.songs["1001"].path == root / AUDIO_DIR / "1001.mp3"
    clip = next(c for c in ds.curves if c.song_id == "1001")
    assert clip.start_step == 30 and clip.n_steps == 20  # cut to 15-25 s
    assert next(c for c in ds.curves if c.song_id == "2001").n_steps == 40  # test songs kept whole

    proot = pmemo_fixture(session_tmp)
    for scale, name, lo in (("native", "unit", 0.0), ("deam", "deam", -1.0)):
        p = load_dataset(
            cfg_for(session_tmp, "x", "data.source=pmemo", f"data.root={proot}", f"data.pmemo.scale={scale}").data
        )
        assert p.scale == name and all(c.annotator_id == "consensus" and c.start_step == 31 for c in p.curves)
        v = np.concatenate([c.values for c in p.curves])
        assert v.min() >= lo and v.max() <= 1.0 and (scale == "native" or v.min() < 0)


def test_source_without_root_is_a_clear_error():
    with pytest.raises(DataError, match="data.root"):
        load_dataset(load_config(None, ["data.source=deam"]).data)


def test_deam_label_time_maps_to_the_audio_exactly(tmp_path):
    """sample_20000ms is step 40, i.e. the audio [20.0 s, 20.5 s): a burst there lights up step 40 only."""
    root = write_deam(tmp_path / "DEAM", clip_ids=("1001",), test_ids=(), workers=("W1",), extra=False)
    sf.write(root / AUDIO_DIR / "1001.mp3", song_audio(25.1, 0, burst=(20.0, 20.5)), SR)
    ds = load_deam(root, clip_steps=20, flat_window=20, min_songs_per_listener=1, require_audio=True)
    (c,) = ds.curves
    header = next(csv.reader(open(root / RATERS_DIR / "arousal" / "1001.csv")))
    col = header.index("sample_20000ms") - 1  # value index in the curve
    step = c.start_step + col
    assert (c.start_step, step) == (30, 40)
    f = FeatureExtractor(FeatureConfig(), use_cache=False)(ds.songs["1001"])
    energy = f.local.float().exp().mean(dim=(1, 2)).numpy()  # (n_steps,) mean Mel power per step
    assert int(np.argmax(energy)) == step
    assert energy[step] > 10 * max(energy[step - 1], energy[step + 1])


# --------------------------------------------------------------------------------------------- splits


def test_song_split_deam_uses_the_official_test_songs(session_tmp):
    root = deam_fixture(session_tmp)
    cfg = cfg_for(session_tmp, "x", "data.source=deam", *deam_overrides(root), "data.split.kind=song")
    ds = load_dataset(cfg.data)
    listeners, songs = make_splits(ds, cfg.data, 1, "within_song", 20)
    assert songs["test"] == list(TEST_IDS)
    assert len(songs["val"]) == 1 and set(songs["val"]) | set(songs["train"]) == set(CLIP_IDS)
    assert not set(songs["train"]) & set(songs["val"])
    assert listeners["test"] == ["W1", "W2", "W3", "W4"] and set(listeners) == {"train", "val", "test", "excluded"}
    assert make_splits(ds, cfg.data, 1, "within_song", 20) == (listeners, songs)  # deterministic
    # the within-song protocol needs test curves longer than the support: 40 steps cannot give 60 + 2
    with pytest.raises(DataError, match="no test listener"):
        make_splits(ds, cfg.data, 1, "within_song", 60)
    listener_split, none = make_splits(
        ds, load_config(None, ["data.split.val_listeners=1", "data.split.test_listeners=1"]).data
    )
    assert (
        none is None
        and len(listener_split["test"]) == 1
        and not set(listener_split["train"]) & set(listener_split["test"])
    )


def test_song_split_without_official_test_songs(tmp_path):
    curves = [Curve(f"s{k}", f"L{j}", 0, np.zeros((30, 2))) for j in range(3) for k in range(10) if (j + k) % 4]
    ds = Dataset("mem", tmp_path, {f"s{k}": Song(f"s{k}", tmp_path / f"s{k}.wav") for k in range(10)}, curves)
    cfg = load_config(None, ["data.split.kind=song", "data.split.test_songs=0.3", "data.split.val_songs=2"]).data
    listeners, songs = make_splits(ds, cfg)
    assert [len(songs[k]) for k in ("train", "val", "test")] == [5, 2, 3]
    assert sorted(songs["train"] + songs["val"] + songs["test"]) == sorted(ds.songs)
    for a in listeners["test"]:  # a test listener has a support song among the train songs and a test song
        mine = {c.song_id for c in curves if c.annotator_id == a}
        assert mine & set(songs["train"]) and mine & set(songs["test"])
    cfg.split.seed = 1
    assert make_splits(ds, cfg)[1] != songs
    cfg.split.test_songs = 0
    with pytest.raises(DataError, match="test: 0"):
        make_splits(ds, cfg)


# --------------------------------------------------------------------------------------------- data check


def broken_deam(session_tmp: Path, tmp_path: Path, labels: bool, audio: bool) -> Path:
    root = tmp_path / "DEAM"
    shutil.copytree(deam_fixture(session_tmp), root)
    if labels:
        rewrite_cell(root / RATERS_DIR / "arousal" / "1003.csv", 2, 5, "NaN")  # NaN inside W1's curve
        rewrite_cell(root / RATERS_DIR / "valence" / "1004.csv", 3, 2, "1.7")  # out of range
        drop_column(root / RATERS_DIR / "arousal" / "1005.csv", 4)  # sample_16000ms missing: misaligned times
    if audio:
        (root / AUDIO_DIR / "1006.mp3").write_bytes(b"ID3 this is not audio" * 50)  # unreadable
        sf.write(root / AUDIO_DIR / "1002.mp3", song_audio(20.0, 1), SR)  # labels run to 25 s
        sf.write(
            root / AUDIO_DIR / "1001.mp3", song_audio(25.1, 0, sr=48000, channels=2), 48000
        )  # fine (MP3 stops at 48 kHz)
    return root


def test_data_check_deam_fixture(session_tmp, capsys):
    root = deam_fixture(session_tmp)
    rc, out = data_check(
        capsys, "--format", "deam", root, *deam_overrides(root)[1:3], "data.deam.min_songs_per_listener=3"
    )
    assert rc == 0, out
    assert "8 (6 train, 2 test)" in out and "4 (32 listener curves; 8 averaged curves)" in out
    assert "rater gave arousal but no valence" in out and "listener W5" in out  # reported, not zero-filled
    assert "flat curve" in out and "listener W6" in out
    assert "8 of 8 file(s) read" in out and out.rstrip().endswith("OK: no problems")


def test_data_check_lists_every_problem_and_train_refuses_with_the_same(session_tmp, tmp_path, capsys):
    root = broken_deam(session_tmp, tmp_path, labels=True, audio=True)
    opts = [*deam_overrides(root)[1:3], "data.deam.min_songs_per_listener=3"]
    rc, out = data_check(capsys, "--format", "deam", root, *opts)
    assert rc == 1
    rater = root / RATERS_DIR
    expected = [
        f"{rater / 'arousal' / '1003.csv'}:2: missing value (empty or NaN) inside the curve",
        f"{rater / 'valence' / '1004.csv'}:3: column sample_15500ms: value 1.7 out of range",
        f"{rater / 'arousal' / '1005.csv'}:1: missing column(s) between 'sample_16000ms' and 'sample_17000ms'",
        f"{root / AUDIO_DIR / '1006.mp3'}: cannot decode audio",
        f"{root / AUDIO_DIR / '1002.mp3'}: audio is 20.0 s (40 steps of 0.5 s) but song '1002' is rated until 25.0 s",
    ]
    for line in expected:
        assert line in out, line
    assert "1001.mp3" not in out.split("PROBLEMS")[1]  # 48 kHz stereo is fine
    assert "48000 Hz x 1" in out and "2 ch x 1" in out

    # train refuses the same labels with the same messages, before any training
    runs = tmp_path / "runs"
    argv = [
        "train",
        "pdmer.deam.dsaml",
        *tiny_overrides(session_tmp, "broken"),
        *deam_overrides(root),
        f"runtime.out_dir={runs}",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert all(line in err for line in expected[:3])
    assert not runs.exists()

    # with the labels fixed, train refuses the audio, naming each file, with the check's messages
    root2 = broken_deam(session_tmp, tmp_path / "audio_only", labels=False, audio=True)
    argv = [
        "train",
        "pdmer.deam.dsaml",
        *tiny_overrides(session_tmp, "broken"),
        *deam_overrides(root2),
        f"runtime.out_dir={runs}",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    rc, out = data_check(capsys, "--format", "deam", root2, *opts)
    assert rc == 1
    problems = out.split("PROBLEMS (2):\n")[1].strip().splitlines()
    assert len(problems) == 2
    for p in problems:
        assert p.strip() in err
    assert str(root2 / AUDIO_DIR / "1002.mp3") in err and "shorter than its labels" in err
    assert not runs.exists()


def test_data_check_pmemo_problems(session_tmp, tmp_path, capsys):
    root = tmp_path / "PMEmo2019"
    shutil.copytree(pmemo_fixture(session_tmp), root)
    dyn = root / DYNAMIC_FILE
    rows = list(csv.reader(open(dyn, newline="")))
    rows[5][1] = "18.5"  # line 6: frameTime jumps from 17.0 (line 5) to 18.5
    rows[40][2] = "1.3"  # line 41: arousal out of [0, 1]
    with open(dyn, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    (root / "chorus" / "16.mp3").unlink()
    rc, out = data_check(capsys, "--format", "pmemo", root)
    assert rc == 1
    assert f"{dyn}:6: musicId 1: frameTime jumps from 17 (line 5) to 18.5" in out
    assert f"{dyn}:41: column Arousal(mean): value 1.3 out of range [0, 1]" in out
    assert f"{root / 'chorus' / '16.mp3'}: audio file not found (song '16')" in out
    assert "label scale:" in out and "unit" in out


def test_data_check_generic_problems(tmp_path, capsys):
    root = tmp_path / "mine"
    (root / "audio").mkdir(parents=True)
    sf.write(root / "audio" / "a.wav", song_audio(5.0, 1), SR)
    with open(root / "ratings.csv", "w") as f:
        f.write(
            "song_id,annotator_id,time_s,valence,arousal\na,me,0,0.1,0.2\na,me,1,nan,0.2\na,me,2,0.1,3\nb,me,0,0,0\nb,me,1,0,0\n"
        )
    rc, out = data_check(capsys, "--format", "generic", root)
    assert rc == 1
    assert "ratings.csv line 3 (song 'a', annotator 'me'): valence='nan' is not finite" in out
    assert "ratings.csv line 4 (song 'a', annotator 'me'): arousal=3.0 is outside" in out
    assert "song 'b' has no audio file" in out


def test_data_check_real_deam_annotations(tmp_path, capsys):
    src = SHARED_DATA / "deam"
    if not (src / "arousal.csv").is_file():
        pytest.skip(f"real DEAM annotation files not available ({src.resolve()} absent)")
    folder = tmp_path / "DEAM" / AVERAGED_DIR
    folder.mkdir(parents=True)
    for label in ("arousal", "valence"):
        (folder / f"{label}.csv").symlink_to((src / f"{label}.csv").resolve())
    rc, out = data_check(capsys, "--format", "deam", tmp_path / "DEAM", "--audio", "none")
    assert rc == 0, out
    assert "1802 (1744 train, 58 test)" in out and "1802 averaged curves" in out
    assert "min 60, median 60, max 1223" in out  # clips 15-45 s; full songs up to ~10 min (7 trimmed by one step)
    assert "7 x read/trimmed" in out and "1802 of 1802 file(s) missing" in out
    rc, out = data_check(capsys, "--format", "deam", tmp_path / "DEAM", "--audio", "header")
    assert rc == 1 and "every audio file is missing" in out
    assert (
        f"{tmp_path / 'DEAM' / AUDIO_DIR / '2.mp3'}: audio file not found (song '2')" in out
        and "PROBLEMS (1802)" in out
    )


def test_data_check_tiny_benchmark(session_tmp, capsys):
    name = "pdmer.synthetic.dsaml"
    cfg = load_config(name, tiny_overrides(session_tmp, name))  # the benchmark test_experiments trains on
    ds = load_dataset(cfg.data)
    rc, out = data_check(capsys, "--format", "synthetic", cfg.data.root)
    assert rc == 0, out
    n_curves = len(ds.curves)
    per = sorted(len(v) for v in ds.by_annotator().values())
    assert f"songs:                        {len(ds.songs)}\n" in out
    assert f"{len(ds.annotators)} ({n_curves} listener curves; {len(ds.consensus)} averaged curves)" in out
    assert f"min {per[0]}, median {np.median(per):g}, max {per[-1]}" in out
    hours = sum(c.n_steps for c in ds.curves) * 0.5 / 3600
    assert f"{hours:.2f} h of listener curves" in out
    assert f"{len(ds.songs)} of {len(ds.songs)} file(s) read" in out and "oracle.csv" in out
    report = check_data("synthetic", cfg.data.root, cfg, audio="header")
    assert report["ok"] and report["summary"]["listeners"] == len(ds.annotators)


# --------------------------------------------------------------------------------------------- audio


def write_generic(root: Path, short: bool = False) -> Path:
    """Four songs at four rates (one 96 kHz stereo), six listeners rating at 4 Hz."""
    (root / "audio").mkdir(parents=True)
    sf.write(root / "audio" / "s0.wav", song_audio(25.0, 0, sr=96000, channels=2), 96000)
    sf.write(root / "audio" / "s1.flac", song_audio(25.0, 1), SR)
    sf.write(root / "audio" / "s2.wav", song_audio(25.0, 2, sr=48000), 48000)
    sf.write(root / "audio" / "s3.wav", song_audio(15.0 if short else 25.0, 3, sr=22050), 22050)
    t = np.arange(0, 24.76, 0.25)  # 4 Hz, resampled to the 2 Hz grid
    with open(root / "ratings.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["song_id", "annotator_id", "time_s", "valence", "arousal"])
        for j in range(6):
            for k in range(4):
                v = 0.5 * np.sin(0.4 * t + j + k)
                a = 0.5 * np.cos(0.3 * t * (1 + 0.1 * j) + k)
                w.writerows(
                    [[f"s{k}", f"L{j}", f"{x:g}", round(y, 4), round(z, 4)] for x, y, z in zip(t, v, a, strict=False)]
                )
    return root


GENERIC = [
    "data.source=generic",
    "data.split.val_listeners=1",
    "data.split.test_listeners=1",
    "train.seq_len=20",
    "eval.hop=10",
]


def test_generic_with_96k_stereo_trains_and_too_short_is_refused(session_tmp, tmp_path, capsys):
    root = write_generic(tmp_path / "mine")
    runs = tmp_path / "runs"
    argv = [
        "train",
        "pdmer.synthetic.dsaml",
        *tiny_overrides(session_tmp, "generic"),
        *GENERIC,
        f"data.root={root}",
        f"runtime.out_dir={runs}",
    ]
    assert main(argv) == 0
    (run,) = runs.iterdir()
    res = json.loads((run / "results.json").read_text())
    assert res["label_scale"] == "deam" and res["test"]["personalized"]["n_songs"] > 0
    capsys.readouterr()

    bad = write_generic(tmp_path / "short", short=True)
    line = f"{bad / 'audio' / 's3.wav'}: audio is 15.0 s (30 steps of 0.5 s) but song 's3' is rated until 25.0 s"
    rc, out = data_check(capsys, "--format", "generic", bad)
    assert rc == 1 and line in out
    argv = [
        "train",
        "pdmer.synthetic.dsaml",
        *tiny_overrides(session_tmp, "generic"),
        *GENERIC,
        f"data.root={bad}",
        f"runtime.out_dir={tmp_path / 'runs2'}",
    ]
    assert main(argv) == 2
    assert line in capsys.readouterr().err and not (tmp_path / "runs2").exists()


def test_check_alignment_names_the_file(tmp_path):
    class F:
        n_steps = 50

    curves = [
        Curve("s", "L1", 30, np.zeros((30, 2))),
        Curve("s", "L2", 30, np.zeros((10, 2))),
        Curve("t", "L1", 0, np.zeros((5, 2))),
    ]
    songs = {"s": Song("s", tmp_path / "audio" / "s.mp3"), "t": Song("t", tmp_path / "audio" / "t.mp3")}
    with pytest.raises(DataError) as e:
        check_alignment(curves, {"s": F()}, songs)
    msg = str(e.value)
    assert (
        f"{tmp_path / 'audio' / 's.mp3'}: audio is 25.0 s (50 steps of 0.5 s) but song 's' is rated until 30.0 s" in msg
    )
    assert f"{tmp_path / 'audio' / 't.mp3'}: no audio features" in msg
    assert alignment_problems(curves[1:2], {"s": 50}, songs) == []


def test_fit_to_audio_cuts_only_a_last_step_the_audio_ends_in(tmp_path):
    songs = {"s": Song("s", tmp_path / "s.wav")}
    fits, ends_inside, one_step, too_long = (
        Curve("s", a, 30, np.ones((n, 2))) for a, n in (("A", 20), ("B", 21), ("C", 1), ("D", 22))
    )
    one_step.start_step = 50
    fitted, records, problems = fit_to_audio([fits, ends_inside, one_step, too_long], {"s": 50}, songs)
    assert [(c.annotator_id, c.end_step) for c in fitted] == [("A", 50), ("B", 50), ("D", 52)]
    assert [(r["annotator_id"], r["action"]) for r in records] == [("B", "trimmed"), ("C", "dropped")]
    assert records[0]["reason"] == "the audio ends inside the last labelled step [25, 25.5) s: that step is cut"
    assert problems == [
        f"{tmp_path / 's.wav'}: audio is 25.0 s (50 steps of 0.5 s) but song 's' is rated until 26.0 s "
        "(annotator 'D'): the audio is shorter than its labels"
    ]


# --------------------------------------------------------------------------------------------- end to end


def test_deam_and_pmemo_train_from_the_cli(session_tmp, capsys):
    deam = deam_fixture(session_tmp)
    argv = ["train", "pdmer.deam.dsaml", *tiny_overrides(session_tmp, "pdmer.deam.dsaml"), *deam_overrides(deam)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    run = Path(out.split("run folder: ")[1].split()[0])
    splits = json.loads((run / "splits.json").read_text())
    assert splits["kind"] == "song-disjoint" and splits["protocol"] == "within_song"
    assert splits["songs"]["test"] == list(TEST_IDS) and not set(splits["songs"]["train"]) & set(TEST_IDS)
    res = json.loads((run / "results.json").read_text())
    assert res["label_scale"] == "deam" and res["split"]["songs"] == {"train": 5, "val": 1, "test": 2}
    assert set(res["test"]) == {"generic", "personalized", "maml", "offset", "others", "ridge", "consensus"}
    # every test song is scored only on its query part (after the 10 s support), never trained on
    for r in res["per_listener"].values():
        assert set(r["generic"]) <= set(TEST_IDS)

    pm = pmemo_fixture(session_tmp)
    argv = [
        "train",
        "dmer.pmemo.dsaml",
        *tiny_overrides(session_tmp, "dmer.pmemo.dsaml"),
        *pmemo_overrides(pm),
        "data.pmemo.scale=deam",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    run = Path(out.split("run folder: ")[1].split()[0])
    res = json.loads((run / "results.json").read_text())
    assert res["label_scale"] == "deam" and "labels on the deam scale" in (run / "results.md").read_text()
    assert set(res["test"]) == {
        "generic",
        "personalized",
        "maml",
        "offset",
        "ridge",
    }  # PMEmo's "listener" is the consensus itself


# --------------------------------------------------------------------------------------------- real PMEmo


def test_real_pmemo_samples_decode_and_align(tmp_path, session_tmp, capsys):
    src = SHARED_DATA / "pmemo_samples"
    if not src.is_dir():
        pytest.skip(f"real PMEmo samples not available ({src.resolve()} absent)")
    root = tmp_path / "PMEmo2019"
    (root / "chorus").mkdir(parents=True)
    (root / DYNAMIC_FILE).parent.mkdir(parents=True)
    dyn, stat = (
        [["musicId", "frameTime", "Arousal(mean)", "Valence(mean)"]],
        [["musicId", "Arousal(mean)", "Valence(mean)"]],
    )
    last_t = {}
    for p in sorted(src.glob("*.json")):
        if not p.stem.isdigit():
            continue
        d = json.loads(p.read_text())
        (root / "chorus" / f"{p.stem}.mp3").symlink_to((src / f"{p.stem}.mp3").resolve())
        t, a, v = d["dynamic"]["t"], d["dynamic"]["a"], d["dynamic"]["v"]
        dyn += [[p.stem, x, y, z] for x, y, z in zip(t, a, v, strict=False)]
        stat.append([p.stem, d["arousal_mean"], d["valence_mean"]])
        last_t[p.stem] = t[-1]
    for path, rows in ((root / DYNAMIC_FILE, dyn), (root / STATIC_FILE, stat)):
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows(rows)
    ds = load_pmemo(root, require_audio=True)
    assert sorted(ds.songs) == sorted(last_t) and len(ds.songs) == 4
    fx = FeatureExtractor(FeatureConfig(), session_tmp / "features")
    feats = {}
    for sid, c in ds.consensus.items():
        assert c.start_step == 31  # 15.5 s
        assert c.end_step - 1 == round(last_t[sid] / 0.5)  # last label's step
        wave = load_audio(ds.songs[sid].path)
        f = feats[sid] = fx(ds.songs[sid])
        assert f.n_steps == len(wave) // (SR // 2)  # every whole 0.5 s step of the decoded audio
        assert f.local.shape[1:] == (51, 128) and f.global_.shape[0] == f.n_steps
        # PMEmo rates up to the end of the file: the last rating's instant is inside the audio ...
        assert last_t[sid] <= len(wave) / SR < last_t[sid] + 0.5
    # ... so the step it labels is not whole: fitting the curves to the audio cuts that one step, and says so
    fitted, records, problems = fit_to_audio(ds.curves, {s: f.n_steps for s, f in feats.items()}, ds.songs)
    assert (
        problems == []
        and len(records) == 4
        and all(r["stage"] == "audio" and r["action"] == "trimmed" for r in records)
    )
    for c in fitted:
        assert c.end_step == feats[c.song_id].n_steps  # the features cover the labels exactly
        np.testing.assert_array_equal(c.values, ds.consensus[c.song_id].values[:-1])
    rc, out = data_check(capsys, "--format", "pmemo", root)
    assert rc == 0, out
    assert "4 of 4 file(s) read" in out and "min 60, median 64, max 90" in out
    assert (
        "4 x audio/trimmed, e.g. song 108, listener consensus" in out
        and "the audio ends inside the last labelled step [49, 49.5) s" in out
    )

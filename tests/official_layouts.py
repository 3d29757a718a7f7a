"""Tiny datasets written in exactly the publishers' layouts, with real (procedural) audio.

- :func:`write_deam`: ``MEMD_audio/<id>.mp3``, the averaged dynamic files and the per-rater files
  (``WorkerId`` first, then ``sample_15000ms, ...``), as DEAM is distributed.
- :func:`write_pmemo`: ``chorus/<id>.mp3``, ``annotations/dynamic_annotations.csv`` (2 Hz from
  15.5 s, [0, 1]) and ``annotations/static_annotations.csv``, as PMEmo2019 is distributed.
- :func:`write_vgmidi`: ``labelled/midi/*.mid`` and ``labelled/annotations/vgmidi_raw_1.json``, as
  the VGMIDI repository holds them (its audio is rendered by the loader, with FluidSynth).
- :func:`official_overrides`: the data overrides that point an experiment whose source is DEAM,
  PMEmo or VGMIDI at such a fixture (used by ``test_experiments.py``).

Clips are shorter than the real ones (25 s instead of 45 s) so that tests stay fast; the
overrides shrink ``train.seq_len`` and the DEAM clip options to match.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import soundfile as sf

from pdmer.data.deam import AUDIO_DIR as DEAM_AUDIO
from pdmer.data.deam import AVERAGED_DIR, RATERS_DIR
from pdmer.data.pmemo import AUDIO_DIR as PMEMO_AUDIO
from pdmer.data.pmemo import DYNAMIC_FILE, STATIC_FILE

SR = 44100
CLIP_S, TEST_S = 25.0, 35.0  # DEAM fixture: clip and full-song lengths
CLIP_IDS = ("1001", "1002", "1003", "1004", "1005", "1006")
TEST_IDS = ("2001", "2002")
WORKERS = ("W1", "W2", "W3", "W4")
SEQ_LEN = 20  # train.seq_len for these fixtures (10 s)
CLIP_STEPS = int((CLIP_S - 15.0) / 0.5)  # 20: labels from 15 s to the end of the clip


def song_audio(
    seconds: float, seed: int, sr: int = SR, channels: int = 1, burst: tuple[float, float] | None = None
) -> np.ndarray:
    """A tonal, moving test signal: (n,) or (n, channels) float32 in about [-0.5, 0.5].

    ``burst=(t0, t1)``: the signal is 20x louder in [t0, t1) seconds (a marker in time).
    """
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    f0 = 110.0 * 2 ** (rng.integers(0, 24) / 12)
    env = 0.5 + 0.4 * np.sin(2 * np.pi * (0.05 + 0.1 * rng.random()) * t + rng.random() * 6)  # slow loudness drift
    x = sum(np.sin(2 * np.pi * f0 * h * t * (1 + 0.01 * np.sin(0.3 * t))) / h for h in (1, 2, 3))
    x = 0.02 * env * x + 0.002 * rng.standard_normal(n)
    if burst is not None:
        i0, i1 = int(burst[0] * sr), int(burst[1] * sr)
        x[i0:i1] *= 20.0
    x = x.astype(np.float32)
    if channels > 1:
        x = np.stack([x * (1.0 - 0.1 * c) for c in range(channels)], axis=1)  # (n, channels)
    return x


def curve(n: int, seed: int, offset: float = 0.0, lo: float = -1.0, hi: float = 1.0) -> np.ndarray:
    """A smooth moving rating curve of n values within [lo, hi]."""
    t = np.arange(n)
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    y = mid + offset + half * (0.4 * np.sin(0.21 * t + seed) + 0.2 * np.cos(0.07 * t * (1 + seed % 5)))
    return np.round(np.clip(y, lo, hi), 4)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _samples(n: int, start_ms: int = 15000) -> list[str]:
    return [f"sample_{start_ms + 500 * i}ms" for i in range(n)]


def write_deam(
    root: Path,
    clip_ids=CLIP_IDS,
    test_ids=TEST_IDS,
    workers=WORKERS,
    clip_s: float = CLIP_S,
    test_s: float = TEST_S,
    extra: bool = True,
    audio_ext: str = "mp3",
) -> Path:
    """A DEAM folder: audio, averaged and per-rater dynamic labels.

    Every worker rates every song, from 15 s to the end of the audio (clips: one value more,
    ending at the clip's last instant, as DEAM's 61-value clips). With ``extra``: worker "W5"
    rates song ``clip_ids[0]`` with arousal only (reported, not zero-filled), and "W6" leaves the
    slider still on ``clip_ids[1]`` (a flat curve, filtered).
    """
    root = Path(root)
    (root / DEAM_AUDIO).mkdir(parents=True, exist_ok=True)
    per_song: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for k, sid in enumerate([*clip_ids, *test_ids]):
        seconds = clip_s if sid in clip_ids else test_s
        sf.write(root / DEAM_AUDIO / f"{sid}.{audio_ext}", song_audio(seconds + 0.1, seed=k), SR)
        n = int(round((seconds - 15.0) / 0.5)) + (1 if sid in clip_ids else 0)
        per_song[sid] = {
            w: {"arousal": curve(n, 3 * j + k, 0.1), "valence": curve(n, 7 * j + k + 1, -0.1)}
            for j, w in enumerate(workers)
        }
    if extra:
        n0 = len(per_song[clip_ids[0]][workers[0]]["arousal"])
        per_song[clip_ids[0]]["W5"] = {"arousal": curve(n0, 99)}
        per_song[clip_ids[1]]["W6"] = {"arousal": np.full(n0, 0.2), "valence": curve(n0, 98)}
    for label in ("arousal", "valence"):
        width = max(len(raters[workers[0]][label]) for raters in per_song.values())
        rows = []
        for sid, raters in per_song.items():
            vals = np.mean([r[label] for r in raters.values() if label in r and len(r) == 2], axis=0)
            rows.append([sid, *np.round(vals, 4), *[""] * (width - len(vals))])  # trailing cells empty, as in DEAM
        _write_csv(root / AVERAGED_DIR / f"{label}.csv", ["song_id", *_samples(width)], rows)
        for sid, raters in per_song.items():
            given = {w: r[label] for w, r in raters.items() if label in r}
            n = len(next(iter(given.values())))
            _write_csv(
                root / RATERS_DIR / label / f"{sid}.csv",
                ["WorkerId", *_samples(n)],
                [[w, *v] for w, v in given.items()],
            )
    return root


def write_pmemo(root: Path, n_songs: int = 6, seconds: float = 30.0, first_id: int = 1) -> Path:
    """A PMEmo2019 folder: ``chorus/<id>.mp3`` plus dynamic (2 Hz from 15.5 s, [0, 1]) and static labels."""
    root = Path(root)
    (root / PMEMO_AUDIO).mkdir(parents=True, exist_ok=True)
    (root / DYNAMIC_FILE).parent.mkdir(parents=True, exist_ok=True)
    dyn, stat = [], []
    for k in range(n_songs):
        sid = str(first_id + 3 * k)
        sf.write(root / PMEMO_AUDIO / f"{sid}.mp3", song_audio(seconds + 0.1, seed=50 + k), SR)
        n = int(round((seconds - 15.5) / 0.5))  # frames 15.5 s .. seconds - 0.5 s
        a, v = curve(n, k, lo=0.0, hi=1.0), curve(n, k + 20, lo=0.0, hi=1.0)
        dyn += [[sid, f"{15.5 + 0.5 * i:g}", a[i], v[i]] for i in range(n)]
        stat.append([sid, round(float(a.mean()), 4), round(float(v.mean()), 4)])
    _write_csv(root / DYNAMIC_FILE, ["musicId", "frameTime", "Arousal(mean)", "Valence(mean)"], dyn)
    _write_csv(root / STATIC_FILE, ["musicId", "Arousal(mean)", "Valence(mean)"], stat)
    return root


def deam_fixture(tmp: Path) -> Path:
    """The default DEAM fixture under ``tmp`` (written once, then reused)."""
    root = Path(tmp) / "DEAM"
    if not (root / "done").exists():
        write_deam(root)
        (root / "done").write_text("")
    return root


def pmemo_fixture(tmp: Path) -> Path:
    root = Path(tmp) / "PMEmo2019"
    if not (root / "done").exists():
        write_pmemo(root)
        (root / "done").write_text("")
    return root


def deam_overrides(root: Path) -> list[str]:
    """Point a DEAM experiment at a fixture from :func:`write_deam`: short clips, few songs per listener."""
    return [
        f"data.root={root}",
        f"data.deam.clip_steps={CLIP_STEPS}",
        f"data.deam.flat_window={CLIP_STEPS}",
        "data.deam.min_songs_per_listener=3",
        f"train.seq_len={SEQ_LEN}",
        "eval.hop=10",
    ]


def pmemo_overrides(root: Path) -> list[str]:
    return [f"data.root={root}", f"train.seq_len={SEQ_LEN}", "eval.hop=10"]


def official_overrides(experiment: str, tmp: Path) -> list[str]:
    """Extra overrides for an experiment whose data source is an official layout ([] otherwise)."""
    from pdmer.config import load_config

    source = load_config(experiment).data.source
    if source == "deam":
        return deam_overrides(deam_fixture(tmp))
    if source == "pmemo":
        return pmemo_overrides(pmemo_fixture(tmp))
    if source == "vgmidi":
        return vgmidi_overrides(vgmidi_fixture(tmp), tmp)
    return []


def write_midi(path: Path, seconds: float, seed: int = 0) -> float:
    """A one-track piano MIDI of about ``seconds`` (notes every 0.5 s, tempo 120); returns its length."""
    import mido

    from pdmer.data.vgmidi import midi_length

    rng = np.random.default_rng(seed)
    mid = mido.MidiFile(ticks_per_beat=480)
    track = mido.MidiTrack()
    mid.tracks.append(track)
    track.append(mido.MetaMessage("set_tempo", tempo=500000, time=0))  # 960 ticks per second
    for _ in range(int(seconds * 2)):
        note = int(rng.integers(48, 84))
        track.append(mido.Message("note_on", note=note, velocity=int(rng.integers(40, 110)), time=0))
        track.append(mido.Message("note_off", note=note, velocity=0, time=480))
    track.append(mido.MetaMessage("end_of_track", time=0))
    path.parent.mkdir(parents=True, exist_ok=True)
    mid.save(str(path))
    return midi_length(path)


VGMIDI_PIECES, VGMIDI_LISTENERS, VGMIDI_S = 5, 10, 14


def write_vgmidi(root: Path) -> None:
    """A VGMIDI repository in miniature: ``labelled/midi/*.mid`` and ``labelled/annotations/vgmidi_raw_1.json``.

    Each listener rates 2-3 pieces (per-measure curves in [-1, 1], a few unrecorded bins).
    """
    import json

    rng = np.random.default_rng(7)
    pieces, ann, count = {}, {}, {}
    for k in range(VGMIDI_PIECES):
        length = write_midi(root / "labelled" / "midi" / f"Piece {k}.mid", VGMIDI_S, seed=k)
        pieces[f"piece{k}"] = {"midi": f"Piece {k}.mid", "duration": int(length), "measures": 7, "name": f"Piece {k}"}
    for j in range(VGMIDI_LISTENERS):
        answers = {
            "age": "21-25",
            "gender": "Female",
            "country": "US",
            "musicianship": j % 3,
            "isKnown": False,
            "ex1_valence": "1",
            "ex1_arousal": "2",
            "ex1_description": f"listener {j}",
            "ex2_valence": "2",
            "ex2_arousal": "Calm",
        }
        level = rng.uniform(-0.4, 0.4, 2)
        for k in rng.choice(VGMIDI_PIECES, size=2 + j % 2, replace=False):
            count[k] = count.get(k, 0) + 1
            base = np.sin(np.arange(7) / 2 + k)[:, None] * [0.5, 0.3]
            curve = np.clip(base + level + rng.normal(0, 0.1, (7, 2)), -1, 1).round(2)
            curve[rng.integers(7)] = 0.0  # an unrecorded bin
            ann[f"piece{k}_{count[k]}"] = {**answers, "arousal": curve[:, 0].tolist(), "valence": curve[:, 1].tolist()}
    out = root / "labelled" / "annotations"
    out.mkdir(parents=True, exist_ok=True)
    (out / "vgmidi_raw_1.json").write_text(json.dumps({"pieces": pieces, "annotations": ann}))


def vgmidi_fixture(tmp: Path) -> Path:
    root = Path(tmp) / "vgmidi"
    if not (root / "done").exists():
        write_vgmidi(root)
        (root / "done").write_text("")
    return root


def vgmidi_overrides(root: Path, tmp: Path) -> list[str]:
    """Point a VGMIDI experiment at :func:`write_vgmidi`'s fixture; skips the test without FluidSynth."""
    import shutil

    import pytest

    from pdmer.data.types import DataError
    from pdmer.data.vgmidi import find_soundfont

    if shutil.which("fluidsynth") is None:
        pytest.skip(
            "FluidSynth is not installed (apt-get install fluidsynth fluid-soundfont-gm): VGMIDI audio cannot be rendered"
        )
    try:
        find_soundfont()
    except DataError as e:
        pytest.skip(str(e))
    return [
        f"data.root={root}",
        f"data.vgmidi.audio_dir={Path(tmp) / 'vgmidi-audio'}",
        f"train.seq_len={SEQ_LEN}",
        "eval.hop=10",
    ]

"""VGMIDI (Ferreira & Whitehead, ISMIR 2019): real listeners' valence-arousal curves of piano pieces.

The official repository layout (a copy of the repository, or a folder holding its ``labelled/``)::

    <root>/labelled/annotations/vgmidi_raw_<round>.json   every collection round found is read
    <root>/labelled/midi/<name>.mid                       the pieces (no audio is published)

Each JSON holds ``pieces["pieceK"]`` (``midi``, ``duration`` in seconds, ``measures``) and
``annotations["pieceK_N"]`` (``valence``, ``arousal``: arrays of numbers in [-1, 1], as JSON
arrays or JSON-array strings, plus the listener's answers). The rules below come from the
annotation tool's own code (see ``../shared/data/vgmidi/README.md``):

- **Time.** Value ``i`` of a curve is the cursor at the END of the slice ``[i D/M, (i+1) D/M)``
  (``D`` = duration, ``M`` = measures): a sample at ``t = (i+1) D/M``. Samples are interpolated
  linearly onto the 2 Hz grid (step ``k`` at ``t = k * 0.5 s``), held constant before the first
  one, for the whole 0.5 s steps of the audio (``floor(D / 0.5)`` steps).
- **Length.** ``M`` values; ``M + 1`` loses its extra last value; any other length is broken.
- **Unrecorded bins** keep the tool's initial value: an exact ``(valence, arousal) == (0, 0)``
  pair is missing, filled from the recorded neighbours (linear, held at the ends); a curve with
  fewer than ``min_recorded`` (half) of its bins recorded is dropped.
- **Duration check.** ``duration - midi_length`` must lie in ``duration_tol`` = [-1.5, +0.5] s
  (the MIDI length includes its end-of-track); a piece outside it cannot be aligned: dropped.
- **Pieces without metadata** (``pieceK`` absent from ``pieces``) are dropped.
- **Who is who.** There is no listener id: one listener is one set of identical answers
  (round, age, gender, country, musicianship and the five tutorial answers); when all five
  tutorial answers are missing, the submission index ``N`` joins the key. Two records of one
  piece by one listener (a duplicate submission, or an ambiguous identity) are both dropped.

Audio is rendered from each MIDI file once (:func:`render_piece`: FluidSynth with a General
MIDI soundfont, 44.1 kHz, mixed to mono 16-bit, cut or padded to ``duration``), cached by the
MIDI bytes, the duration, the soundfont and the settings, and deterministic (same bytes twice).

Everything dropped is recorded in ``Dataset.info["dropped"]`` with its reason, and a structural
problem (an unreadable JSON, a missing MIDI file) is a ``DataError`` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import subprocess
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pdmer.data.common import Problem, Problems, drop_record
from pdmer.data.types import LABELS, STEP_S, Curve, DataError, Dataset, Song
from pdmer.features.cache import file_hash

log = logging.getLogger(__name__)

ANNOTATIONS_DIR = Path("labelled") / "annotations"
MIDI_DIR = Path("labelled") / "midi"
IDENTITY_FIELDS = (
    "age",
    "gender",
    "country",
    "musicianship",
    "ex1_valence",
    "ex1_arousal",
    "ex1_description",
    "ex2_valence",
    "ex2_arousal",
)
TUTORIAL_FIELDS = ("ex1_valence", "ex1_arousal", "ex1_description", "ex2_valence", "ex2_arousal")
SOUNDFONTS = (
    "/usr/share/sounds/sf2/FluidR3_GM.sf2",
    "/usr/share/soundfonts/FluidR3_GM.sf2",
    "/usr/share/sounds/sf2/default-GM.sf2",
    "/usr/share/soundfonts/default.sf2",
)
RENDER_VERSION = 1  # bump when render_piece's output changes
SAMPLE_RATE = 44100
GAIN = 0.5
RANGE_TOL = 1e-6
INSTALL_HINT = "install it with: apt-get install fluidsynth fluid-soundfont-gm"


@dataclass(frozen=True)
class Piece:
    round: str
    key: str  # "pieceK" in its round's JSON
    song_id: str  # "r<round>.pieceK"
    midi: Path
    duration: float
    measures: int
    name: str


def find_rounds(root: Path) -> list[tuple[str, Path]]:
    """``(round, path)`` of every ``labelled/annotations/vgmidi_raw_<round>.json`` under ``root``."""
    folder = root / ANNOTATIONS_DIR
    if not folder.is_dir() and (root / "annotations").is_dir() and root.name == "labelled":
        folder = root / "annotations"  # the user gave the labelled/ folder itself
    found = sorted(folder.glob("vgmidi_raw_*.json"), key=lambda p: (len(p.stem), p.stem))
    return [(p.stem[len("vgmidi_raw_") :], p) for p in found]


def midi_length(path: Path) -> float:
    """Seconds of a MIDI file, its end-of-track included (mido's ``MidiFile.length``)."""
    import mido

    try:
        return float(mido.MidiFile(str(path)).length)
    except (OSError, ValueError, EOFError, KeyError, IndexError) as e:
        raise DataError(f"{path}: not a readable MIDI file ({e})") from None


def _curve_array(raw, where: str) -> np.ndarray | str:
    """A JSON array (or a JSON-array string) of numbers -> float array, or a reason it is not one."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            return f"{where} is not a JSON array"
    if not isinstance(raw, list):
        return f"{where} is a {type(raw).__name__}, not an array"
    try:
        arr = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError):
        return f"{where} holds a value that is not a number"
    if arr.ndim != 1:
        return f"{where} is not a flat array"
    return arr


def listener_id(round_: str, record: dict, submission: str) -> str:
    """A stable id from a submission's answers (see the module docstring, 'Who is who')."""
    values = [round_] + [_answer(record.get(f)) for f in IDENTITY_FIELDS]
    if all(_answer(record.get(f)) == "" for f in TUTORIAL_FIELDS):
        values.append(f"submission={submission}")
    digest = hashlib.sha1(json.dumps(values).encode()).hexdigest()[:12]
    return f"r{round_}-{digest}"


def _answer(value) -> str:
    return "" if value is None else str(value).strip()


def fill_unrecorded(values: np.ndarray, recorded: np.ndarray) -> np.ndarray:
    """Fill the bins not recorded from the recorded ones: linear between them, held at the ends."""
    idx = np.flatnonzero(recorded)
    out = values.copy()
    x = np.arange(len(values))
    for d in range(values.shape[1]):
        out[:, d] = np.interp(x, idx, values[idx, d])
    return out


def to_grid(values: np.ndarray, duration: float) -> np.ndarray:
    """Curve bins (M, 2) -> the 2 Hz grid of the audio's whole steps: (floor(D / 0.5), 2).

    Bin ``i`` is a sample at ``(i + 1) D / M``; each grid time ``k * 0.5`` is interpolated
    linearly, held at the first sample's value before it.
    """
    m = len(values)
    times = (np.arange(m) + 1) * duration / m
    grid = np.arange(int(math.floor(duration / STEP_S + 1e-9))) * STEP_S
    return np.stack([np.interp(grid, times, values[:, d]) for d in range(values.shape[1])], axis=1)


def _read_round(
    round_: str, path: Path, root: Path, problems: Problems, dropped: list[dict], duration_tol: tuple[float, float]
) -> tuple[dict[str, Piece], dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problems.append(Problem(path, None, f"cannot read the JSON ({e})"))
        return {}, {}
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("pieces"), dict)
        or not isinstance(data.get("annotations"), dict)
    ):
        problems.append(Problem(path, None, "expected an object with 'pieces' and 'annotations' objects"))
        return {}, {}
    pieces: dict[str, Piece] = {}
    midi_dir = path.parent.parent / "midi"
    for key, meta in sorted(data["pieces"].items()):
        sid = f"r{round_}.{key}"
        where = f"pieces[{key!r}]"
        try:
            duration, measures, midi = float(meta["duration"]), int(meta["measures"]), str(meta["midi"])
        except (KeyError, TypeError, ValueError) as e:
            problems.append(
                Problem(path, None, f"{where}: needs numeric 'duration', 'measures' and a 'midi' name ({e})")
            )
            continue
        if not (math.isfinite(duration) and duration > 0 and measures > 0):
            problems.append(
                Problem(path, None, f"{where}: duration={duration} and measures={measures} must be positive")
            )
            continue
        midi_path = midi_dir / midi
        if Path(midi).name != midi or not midi_path.is_file():
            problems.append(Problem(path, None, f"{where}: MIDI file {midi_path} not found"))
            continue
        try:
            length = midi_length(midi_path)
        except DataError as e:
            problems.append(Problem(path, None, f"{where}: {e}"))
            continue
        if not duration_tol[0] <= duration - length <= duration_tol[1]:
            dropped.append(
                drop_record(
                    "read",
                    "dropped",
                    f"duration {duration:g} s does not match the MIDI's length "
                    f"{length:.2f} s (allowed: duration - length in [{duration_tol[0]:g}, "
                    f"{duration_tol[1]:g}] s): its curves cannot be aligned",
                    song_id=sid,
                    file=midi_path,
                )
            )
            continue
        pieces[key] = Piece(round_, key, sid, midi_path, duration, measures, str(meta.get("name", key)))
    return pieces, data["annotations"]


def _read_curve(record: dict, piece: Piece, where: str, min_recorded: float) -> np.ndarray | str:
    """One record's curve on the 2 Hz grid (T, 2) = (arousal, valence), or why it is not usable."""
    arrays = {}
    for label in LABELS:
        arr = _curve_array(record.get(label), f"{label}")
        if isinstance(arr, str):
            return arr
        arrays[label] = arr
    a, v = arrays["arousal"], arrays["valence"]
    if len(a) != len(v):
        return f"arousal has {len(a)} values and valence {len(v)}"
    m = piece.measures
    if len(a) == m + 1:  # the tool wrote index M at the very end
        a, v = a[:m], v[:m]
    elif len(a) != m:
        return f"{len(a)} values, expected measures={m} (or {m + 1})"
    values = np.stack([a, v], axis=1)  # (M, 2)
    if not np.isfinite(values).all():
        return "holds a NaN or infinite value"
    if np.abs(values).max() > 1 + RANGE_TOL:
        return f"a value {np.abs(values).max():g} lies outside [-1, 1]"
    recorded = ~((a == 0.0) & (v == 0.0))
    if recorded.sum() < min_recorded * m:
        return f"only {int(recorded.sum())} of {m} bins recorded (under {min_recorded:g})"
    if not recorded.all():
        values = fill_unrecorded(values, recorded)
    return to_grid(values, piece.duration)


def load_vgmidi(
    root: str | Path,
    *,
    audio_dir: str | Path | None = None,
    soundfont: str | Path | None = None,
    render: bool = True,
    strict: bool = True,
    min_recorded: float = 0.5,
    duration_tol: tuple[float, float] = (-1.5, 0.5),
) -> Dataset:
    """VGMIDI's per-listener curves, with audio rendered from the MIDI files.

    Args:
        root: a copy of the VGMIDI repository (or a folder holding its ``labelled/``).
        audio_dir: where rendered audio is cached (None: ``<repo>/cache/vgmidi-audio``).
        soundfont: a General MIDI ``.sf2`` (None: the first of ``SOUNDFONTS`` that exists).
        render: render missing audio (False: songs point at the cache paths, rendered or not).
        strict: raise one DataError listing every structural problem; False lists them in
            ``info["problems"]`` and goes on with what is usable.
        min_recorded: share of a curve's bins that must have been recorded.
        duration_tol: allowed ``duration - midi_length`` in seconds.

    Returns:
        Dataset (scale "deam"): one curve per usable (listener, piece), starting at step 0;
        ``info`` has "rounds", "dropped" (what was left out and why), "pieces" (name, duration,
        measures per song id), "problems".

    Raises:
        DataError: no annotation file, or (``strict``) structural problems; FluidSynth or the
            soundfont missing when audio must be rendered.
    """
    root = Path(root)
    rounds = find_rounds(root)
    if not rounds:
        raise DataError(
            f"no VGMIDI annotations: {root / ANNOTATIONS_DIR}/vgmidi_raw_*.json not found "
            f"(data.root must be a copy of the VGMIDI repository)"
        )
    problems = Problems()
    dropped: list[dict] = []
    pieces: dict[str, Piece] = {}
    records: list[tuple[str, Piece, str, np.ndarray]] = []  # (listener, piece, record key, grid curve)
    for round_, path in rounds:
        round_pieces, annotations = _read_round(
            round_, path, root, problems, dropped, (float(duration_tol[0]), float(duration_tol[1]))
        )
        pieces.update({p.song_id: p for p in round_pieces.values()})
        records += _round_curves(round_, path, round_pieces, annotations, min_recorded, problems, dropped)
    curves = _resolve_identities(records, dropped)
    if strict:
        problems.raise_if_any(f"VGMIDI data under {root}")
    used = sorted({c.song_id for c in curves})
    songs = {
        sid: Song(sid, p, pieces[sid].duration)
        for sid, p in audio_paths([pieces[s] for s in used], audio_dir, soundfont, render).items()
    }
    info = {
        "source": "vgmidi",
        "rounds": [r for r, _ in rounds],
        "options": {"min_recorded": min_recorded, "duration_tol": list(duration_tol)},
        "pieces": {
            s: {
                "name": pieces[s].name,
                "duration": pieces[s].duration,
                "measures": pieces[s].measures,
                "midi": str(pieces[s].midi),
            }
            for s in used
        },
        "dropped": dropped,
        "problems": problems.messages(),
    }
    log.info(
        "VGMIDI %s: rounds %s, %d pieces, %d listeners, %d curves; %d dropped, %d problem(s)",
        root,
        ",".join(info["rounds"]),
        len(songs),
        len({c.annotator_id for c in curves}),
        len(curves),
        len(dropped),
        len(problems),
    )
    return Dataset(name=f"vgmidi:{root}", root=root, songs=songs, curves=curves, scale="deam", info=info)


def _round_curves(
    round_: str,
    path: Path,
    round_pieces: dict[str, Piece],
    annotations: dict,
    min_recorded: float,
    problems: Problems,
    dropped: list[dict],
) -> list[tuple[str, Piece, str, np.ndarray]]:
    """(listener, piece, record key, grid curve) of one round's usable records; what is not usable is recorded."""
    records: list[tuple[str, Piece, str, np.ndarray]] = []
    no_meta = Counter()
    for rec_key, record in sorted(annotations.items()):
        piece_key, _, submission = rec_key.rpartition("_")
        sid = f"r{round_}.{piece_key}"
        if not isinstance(record, dict) or not piece_key:
            problems.append(Problem(path, None, f"annotations[{rec_key!r}]: not a record of the form pieceK_N"))
            continue
        piece = round_pieces.get(piece_key)
        if piece is None:
            if any(r["song_id"] == sid for r in dropped):
                continue  # its piece was dropped (duration check): already said
            no_meta[piece_key] += 1
            continue
        aid = listener_id(round_, record, submission)
        curve = _read_curve(record, piece, rec_key, min_recorded)
        if isinstance(curve, str):
            dropped.append(
                drop_record(
                    "read",
                    "dropped",
                    f"broken curve: {curve}",
                    song_id=sid,
                    annotator_id=aid,
                    file=path,
                    record=rec_key,
                )
            )
            continue
        records.append((aid, piece, rec_key, curve))
    for piece_key, n in sorted(no_meta.items()):
        dropped.append(
            drop_record(
                "read",
                "dropped",
                f"{n} record(s) of a piece without metadata in 'pieces'",
                song_id=f"r{round_}.{piece_key}",
                file=path,
            )
        )
    return records


def _resolve_identities(records: list[tuple[str, Piece, str, np.ndarray]], dropped: list[dict]) -> list[Curve]:
    """One curve per (listener, piece); a listener with two records of one piece loses both."""
    by: dict[tuple[str, str], list[tuple[str, np.ndarray]]] = defaultdict(list)
    for aid, piece, rec_key, curve in records:
        by[aid, piece.song_id].append((rec_key, curve))
    curves = []
    for (aid, sid), recs in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if len(recs) > 1:
            same = all(np.array_equal(recs[0][1], c) for _, c in recs[1:])
            why = "duplicate submission (identical curves)" if same else "ambiguous identity (different curves)"
            dropped.append(
                drop_record(
                    "identity",
                    "dropped",
                    f"{len(recs)} records of this piece by one listener: {why}",
                    song_id=sid,
                    annotator_id=aid,
                    records=[k for k, _ in recs],
                )
            )
            continue
        curves.append(Curve(sid, aid, 0, recs[0][1]))
    return curves


# ---------------------------------------------------------------------------------------------
# Audio: MIDI -> WAV, once, deterministic


def find_soundfont(soundfont: str | Path | None = None) -> Path:
    if soundfont:
        p = Path(soundfont)
        if not p.is_file():
            raise DataError(f"soundfont {p} not found")
        return p
    for s in SOUNDFONTS:
        if Path(s).is_file():
            return Path(s)
    raise DataError(
        f"no General MIDI soundfont found (looked for {', '.join(SOUNDFONTS)}); {INSTALL_HINT}, "
        "or set data.vgmidi.soundfont"
    )


def render_key(piece: Piece, soundfont_digest: str) -> str:
    """The cache key of a rendering: MIDI bytes, duration, soundfont bytes (their sha256), settings."""
    spec = {
        "midi": file_hash(piece.midi),
        "duration": piece.duration,
        "soundfont": soundfont_digest,
        "sr": SAMPLE_RATE,
        "gain": GAIN,
        "version": RENDER_VERSION,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def render_piece(piece: Piece, out: Path, soundfont: Path) -> Path:
    """Render one piece with FluidSynth to ``out`` (mono 16-bit WAV, exactly ``duration`` seconds).

    Written to a temporary file first and renamed: a killed render leaves no partial file.
    """
    import soundfile as sf

    exe = shutil.which("fluidsynth")
    if exe is None:
        raise DataError(f"VGMIDI audio is rendered from MIDI with FluidSynth, which is not installed; {INSTALL_HINT}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".render-") as tmp:
        raw = Path(tmp) / "raw.wav"
        cmd = [
            exe,
            "-ni",
            "-q",
            "-r",
            str(SAMPLE_RATE),
            "-g",
            str(GAIN),
            "-T",
            "wav",
            "-O",
            "s16",
            "-F",
            str(raw),
            str(soundfont),
            str(piece.midi),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0 or not raw.is_file():
            raise DataError(f"{piece.midi}: FluidSynth failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
        audio, sr = sf.read(str(raw), dtype="int16", always_2d=True)
        mono = np.round(audio.astype(np.int32).sum(1) / audio.shape[1]).astype(np.int16)
        n = int(round(piece.duration * sr))
        mono = mono[:n] if len(mono) >= n else np.concatenate([mono, np.zeros(n - len(mono), np.int16)])
        part = Path(tmp) / "out.wav"
        sf.write(str(part), mono, sr, subtype="PCM_16", format="WAV")
        part.replace(out)
    return out


def audio_paths(
    pieces: list[Piece], audio_dir: str | Path | None, soundfont: str | Path | None, render: bool
) -> dict[str, Path]:
    """song id -> its rendered WAV in the cache, rendering the missing ones when ``render``."""
    from pdmer.runs import REPO

    folder = Path(audio_dir) if audio_dir else REPO / "cache" / "vgmidi-audio"
    if not pieces:
        return {}
    try:
        sf2 = find_soundfont(soundfont)
    except DataError:
        if render:
            raise
        return {p.song_id: folder / f"{p.song_id}.wav" for p in pieces}
    out = {}
    todo = []
    sf2_digest = file_hash(sf2)
    for p in pieces:
        path = folder / f"{p.song_id}-{render_key(p, sf2_digest)}.wav"
        out[p.song_id] = path
        if not path.is_file():
            todo.append((p, path))
    if todo and render:
        log.info("rendering %d VGMIDI piece(s) with FluidSynth into %s", len(todo), folder)
        for p, path in todo:
            render_piece(p, path, sf2)
    return out

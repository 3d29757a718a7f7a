"""``calibrate_many``: one profile per listener of a study file, the audio's features computed once.

Not batched across listeners. Each listener goes through :func:`pdmer.calibrate`'s own code path
(``_calibrate_checked``: lock, repair, adaptation, divergence check, safe rule, crash-safe install),
one after another. Adapting listeners together with ``torch.func.vmap``
(:func:`pdmer.meta.maml.batched_inner_loop`, the ``meta.batch_tasks`` path) was measured against
:func:`pdmer.meta.maml.adapt` one listener after another on this CPU (1 thread, one 30 s support
window per listener, 5 first-order inner steps, best of 2-3): with the default model (``size=small``,
local branch on) batched is slower, 0.69x at 4 and at 16 listeners (1.21 s vs 0.84 s, 4.81 s vs
3.34 s); only a far smaller model (hidden 32, global branch only: the tests' tiny run) gains, 1.2x at
8 and 1.7x at 16 listeners, 0.65x at 4. The benchmarks' meta-batch shows the same on the CPU
(batched 0.52x, ``benchmarks/README.md``). Listeners' supports also differ in shape (rated spans,
number of songs), which vmap needs equal.

Where a GPU batch would go: in :func:`calibrate_many`'s second phase, group the listeners whose
support batches have one shape, adapt each group at once with ``batched_inner_loop`` inside
``tasks_batched(model, second_order=False)`` and hand each listener its adapted parameters in place
of the ``_adapt`` call of ``_adapt_checked`` (the rest of a calibration, per listener, is unchanged).
"""

from __future__ import annotations

import csv
import io
import logging
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from pdmer.data.types import DataError
from pdmer.features.audio import check_audio_file
from pdmer.personal.base import BaseModel, load_base_model
from pdmer.personal.calibration import _calibrate_checked, _check_settings, _Job
from pdmer.personal.names import ProfileError, _display, profile_dir
from pdmer.personal.ratings import _ratings_file_size, _read_ratings

log = logging.getLogger(__name__)

MAX_STUDY_BYTES = 256 * 2**20  # a study file read at once (each listener's rows are then held to MAX_RATINGS_BYTES)


@dataclass
class BatchReport:
    """What :func:`calibrate_many` did with each listener of a study file.

    Attributes:
        ratings: the study file.
        written: annotator id -> its profile folder (in the file's order); the adapted weights are not
            kept in memory (:func:`pdmer.load_profile` reads them).
        info: annotator id -> the written profile's ``profile.json`` (fit metrics, songs, adaptation).
        skipped: annotator id -> why nothing was written for it: what is wrong and where (file, line,
            song). Rows without an annotator id are listed under ``""``.
    """

    ratings: Path
    written: dict[str, Path] = field(default_factory=dict)
    info: dict[str, dict] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Every listener was written."""
        return not self.skipped

    def summary(self) -> str:
        """A few lines for people: how many were written (and where), each skipped one and why."""
        n = len(self.written) + len(self.skipped)
        lines = [f"calibrated {len(self.written)} of {n} listener(s) of {_display(self.ratings)}"]
        for aid, path in self.written.items():
            fit = self.info[aid]["fit"]["mean"]
            lines.append(
                f"  wrote {_display(path)}/ (fit on its support, mean CCC: generic "
                f"{fit['generic']['ccc_mean']:.3f} -> personal {fit['personalized']['ccc_mean']:.3f})"
            )
        for aid, why in self.skipped.items():
            lines.append(f"  skipped {aid!r}: " + why.replace("\n", "\n    "))
        return "\n".join(lines)


@dataclass
class _Rows:
    """One listener's rows of the study file: their physical lines ``[a, b)`` (0-based) and, per song, line numbers."""

    spans: list[tuple[int, int]] = field(default_factory=list)
    songs: dict[str, list[int]] = field(default_factory=dict)  # song id -> its rows' line numbers (1-based)


@dataclass
class _Study:
    """A study file read once: its physical lines, header line and the rows of each annotator id."""

    path: Path
    lines: list[str]
    header_end: int
    listeners: dict[str, _Rows]

    def text(self, rows: _Rows, keep_lines: bool) -> str:
        """The header and ``rows``; ``keep_lines``: other rows blanked, so line numbers are the study's."""
        parts, pos = ["".join(self.lines[: self.header_end])], self.header_end
        for a, b in rows.spans:
            if keep_lines:
                parts.append("\n" * (a - pos))
            chunk = "".join(self.lines[a:b])
            parts.append(chunk if chunk.endswith(("\n", "\r")) else chunk + "\n")
            pos = b
        if not parts[0].endswith(("\n", "\r")):
            parts[0] += "\n"
        return "".join(parts)


def _read_study(path: Path) -> _Study:
    """The study file's rows grouped by annotator id (a whole-file problem is a DataError)."""
    from pdmer.data.generic import COLUMNS

    size = _ratings_file_size(path)
    if size > MAX_STUDY_BYTES:
        raise DataError(
            f"{path}: {size / 2**20:.0f} MB of ratings, over the {MAX_STUDY_BYTES / 2**20:g} MB one batch "
            "reads; split the study file by listener (annotator_id) and calibrate each part"
        )
    lines = list(io.StringIO(path.read_bytes().decode("utf-8-sig", errors="replace"), newline=""))
    reader = csv.reader(lines)
    header = [h.strip() for h in next(reader, [])]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise DataError(
            f"{path} line 1: missing column(s) {', '.join(missing)} (header is {','.join(header)!r}); a "
            f"study file has the columns {','.join(COLUMNS)}, one listener per annotator_id"
        )
    isong, iann = header.index("song_id"), header.index("annotator_id")
    listeners: dict[str, _Rows] = {}
    start = header_end = reader.line_num
    for row in reader:
        end = reader.line_num
        if any(x.strip() for x in row):
            aid = row[iann].strip() if len(row) > iann else ""
            sid = row[isong].strip() if len(row) > isong else ""
            rows = listeners.setdefault(aid, _Rows())
            rows.spans.append((start, end))
            rows.songs.setdefault(sid, []).append(end)
        start = end
    return _Study(path, lines, header_end, listeners)


def _audio_index(audio_dir: Path) -> dict[str, list[Path]]:
    """Song id (file stem) -> the audio files of ``audio_dir`` with that stem (``AUDIO_EXTS``, any case)."""
    from pdmer.data.generic import AUDIO_EXTS

    if not audio_dir.is_dir():
        raise DataError(f"{audio_dir}: audio folder not found")
    index: dict[str, list[Path]] = {}
    for p in sorted(audio_dir.iterdir()):
        if p.suffix.lower() in AUDIO_EXTS and not p.is_dir():
            index.setdefault(p.stem, []).append(p)
    return index


def _where(study: _Study, lines: list[int]) -> str:
    return f"{study.path} line{'s' if len(lines) > 1 else ''} {lines[0]}{f'-{lines[-1]}' if len(lines) > 1 else ''}"


def _audio_problems(study: _Study, rows: _Rows, index: dict[str, list[Path]], audio_dir: Path) -> tuple[dict, list]:
    """(song id -> its audio file, the problems: a rated song without exactly one audio file in ``audio_dir``)."""
    from pdmer.data.generic import _EXTS

    audio, problems = {}, []
    for sid, lines in rows.songs.items():
        if not sid:
            continue  # an empty song id: the ratings check reports it with its line
        found = index.get(sid, [])
        if not found:
            problems.append(f"{_where(study, lines)}: song {sid!r} has no audio file {audio_dir}/{sid}.<{_EXTS}>")
        elif len(found) > 1:
            problems.append(
                f"{_where(study, lines)}: song {sid!r} has {len(found)} audio files in {audio_dir} "
                f"({', '.join(p.name for p in found)}); keep one"
            )
        else:
            try:
                audio[sid] = check_audio_file(found[0])
            except DataError as e:
                problems.append(f"{_where(study, lines)}: song {sid!r}: {e}")
    return audio, problems


@dataclass
class _Checked:
    """A listener whose cheap checks passed: what :func:`~pdmer.personal.calibration._calibrate_checked` takes."""

    dest: Path
    audio: dict[str, Path]
    curves: list
    rates: dict
    ratings_bytes: bytes


def _check_listener(study: _Study, aid: str, index: dict, audio_dir: Path, annotators_dir, tmp: Path) -> _Checked:
    """The checks :func:`pdmer.calibrate` runs before loading anything heavy, on one listener's rows.

    The rows are checked by :func:`pdmer.personal.ratings.read_ratings` itself, on a copy of the study
    file that holds only this listener's rows at their own lines, so that messages name the study file
    and its line numbers.

    Raises:
        ProfileError: the annotator id is not a safe listener name.
        DataError: every problem of its rows and audio, each with file and line.
    """
    rows = study.listeners[aid]
    if not aid:
        lines = sorted(n for ls in rows.songs.values() for n in ls)
        raise DataError(
            f"{_where(study, lines)}: {len(lines)} row(s) without an annotator_id (first on line "
            f"{lines[0]}): they belong to no listener"
        )
    try:
        dest = profile_dir(aid, annotators_dir)
    except ProfileError as e:
        lines = sorted(n for ls in rows.songs.values() for n in ls)
        raise ProfileError(f"{_where(study, lines)}: annotator_id {aid!r} cannot name a profile: {e}") from None
    audio, problems = _audio_problems(study, rows, index, audio_dir)
    songs = [s for s in rows.songs if s]
    copy = tmp / study.path.name
    copy.write_text(study.text(rows, keep_lines=True), encoding="utf-8")
    try:
        curves, rates = _read_ratings(copy, songs, aid)
    except DataError as e:
        problems.append(str(e).replace(str(copy), str(study.path)))
    finally:
        copy.unlink()
    if problems:
        raise DataError("\n".join(problems))
    ratings_bytes = study.text(rows, keep_lines=False).encode("utf-8")
    return _Checked(dest, {s: audio[s] for s in songs}, curves, rates, ratings_bytes)


def calibrate_many(
    ratings: str | Path,
    audio_dir: str | Path,
    model: str | Path | None = None,
    *,
    annotators_dir: str | Path | None = None,
    runs_dir: str | Path | None = None,
    keep_history: bool = False,
    inner_steps: int | None = None,
    inner_lr: float | None = None,
    device: str | None = None,
    plot: bool = True,
    base: BaseModel | None = None,
    names: Iterable[str] | None = None,
) -> BatchReport:
    """Calibrate every listener of a study file, one profile each, as :func:`pdmer.calibrate` does one.

    The study file is read once and grouped by ``annotator_id``; each rated song is the audio file
    ``<audio_dir>/<song_id>.<wav|flac|mp3|ogg>`` and its features are computed once, shared by its
    listeners. Listener ``A`` is calibrated into ``<annotators>/A/`` through ``calibrate``'s own code
    path (same checks, safe rule, divergence check, lock and crash-safe store), so its profile is the
    one ``calibrate("A", its songs, its rows)`` writes; its ``ratings.csv`` holds the study's header and
    A's rows. A listener whose id is not a safe name, whose rows or audio fail the checks, whose
    calibration diverges or is running elsewhere is skipped with the reason; the others are written.
    Listeners run one after another (see the module docstring for why they are not batched).

    Args:
        ratings: the study CSV, generic layout: ``song_id,annotator_id,time_s,valence,arousal``.
        audio_dir: the folder of the rated songs' audio files.
        names: calibrate only these annotator ids (None = every one in the file); an id with no rows
            in the file is reported as skipped.
        Other arguments as in :func:`pdmer.calibrate`.

    Returns:
        BatchReport: the profiles written and the listeners skipped, with reasons.

    Raises:
        DataError: the study file or the audio folder cannot be read at all (missing, a column
            missing, too large).
        ProfileError: no usable base model.
        ConfigError: ``inner_steps`` / ``inner_lr`` out of range.
        OSError, KeyboardInterrupt: a crash while writing one listener's profile is not caught: the
            profiles already written stay complete, that listener's old profile (if any) stays or is
            restored by the next command (:mod:`pdmer.store`).
    """
    study_path, audio_dir = Path(ratings), Path(audio_dir)
    _check_settings(inner_steps, inner_lr)
    study = _read_study(study_path)
    index = _audio_index(audio_dir)
    report = BatchReport(study_path)
    wanted = list(dict.fromkeys(names)) if names is not None else list(study.listeners)
    with tempfile.TemporaryDirectory(prefix="pdmer-study-") as tmp:  # phase 1: the cheap checks, every listener
        checked = _check_all(study, wanted, index, audio_dir, annotators_dir, Path(tmp), report)
    if not checked:
        return report
    base = base or load_base_model(model, runs_dir, device)
    settings = dict(inner_steps=inner_steps, inner_lr=inner_lr, keep_history=keep_history, plot=plot)
    _calibrate_all(checked, study_path, base, settings, report)  # phase 2
    report.skipped = {a: report.skipped[a] for a in wanted if a in report.skipped}  # the file's order
    report.written = {a: report.written[a] for a in wanted if a in report.written}
    log.info("%s", report.summary())
    return report


def _check_all(
    study: _Study, wanted: list[str], index: dict, audio_dir: Path, annotators_dir, tmp: Path, report: BatchReport
) -> dict[str, _Checked]:
    """Phase 1 of :func:`calibrate_many`: every wanted listener's cheap checks; the failures go to ``report``."""
    checked: dict[str, _Checked] = {}
    for aid in wanted:
        if aid not in study.listeners:
            report.skipped[aid] = f"{study.path}: no rows of annotator_id {aid!r}"
            continue
        try:
            checked[aid] = _check_listener(study, aid, index, audio_dir, annotators_dir, tmp)
        except (DataError, ProfileError) as e:
            report.skipped[aid] = str(e)
    for aid, why in report.skipped.items():
        log.warning("%s: skipped: %s", aid or "(no annotator_id)", why)
    return checked


def _calibrate_all(
    checked: dict[str, _Checked], study_path: Path, base: BaseModel, settings: dict, report: BatchReport
) -> None:
    """Phase 2 of :func:`calibrate_many`: each checked listener in turn, each song's features computed once.

    A song's features are freed after the last listener who rated it (a GPU batch of adaptations
    would go here, see the module docstring).
    """
    uses = Counter(s for c in checked.values() for s in c.audio)
    feats: dict[str, object] = {}  # song id -> features, or the DataError its audio raised
    for i, (aid, c) in enumerate(checked.items(), start=1):
        log.info("[%d/%d] calibrating %s", i, len(checked), aid)
        for sid, path in c.audio.items():
            if sid not in feats:
                try:
                    feats[sid] = base.features(path)
                except DataError as e:
                    feats[sid] = e
        bad = [f"song {sid!r}: {feats[sid]}" for sid in c.audio if isinstance(feats[sid], DataError)]
        try:
            if bad:
                raise DataError("\n".join(bad))
            job = _Job(
                aid,
                c.dest,
                c.audio,
                study_path,
                c.curves,
                c.rates,
                **settings,
                feats={s: feats[s] for s in c.audio},
                ratings_bytes=c.ratings_bytes,
            )
            prof = _calibrate_checked(job, lambda: base)
            report.written[aid], report.info[aid] = prof.path, prof.info  # its weights are not kept
        except (DataError, ProfileError) as e:  # bad audio, ratings beyond it, diverged, being calibrated elsewhere
            report.skipped[aid] = str(e)
            log.warning("%s: skipped: %s", aid, e)
        for sid in c.audio:
            uses[sid] -= 1
            if uses[sid] == 0:
                del feats[sid]

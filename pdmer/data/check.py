"""Dataset validation and summaries: ``python run.py data check --format F ROOT``.

:func:`check_data` reads a dataset the way training does (the same readers, options and
messages) but never raises on bad data: it returns a report with a summary (songs, listeners,
songs and steps per listener, labelled time, label ranges), what was filtered out and why,
the audio files' state, and every problem with its file and line or song id.
:func:`format_report` renders it as text.

Audio is checked in one of three modes:

- ``decode`` (default): every audio file is decoded as training decodes it (any rate, any
  channel count, resampled to ``features.sample_rate``); a missing, corrupt, undecodable,
  silent or NaN file is a problem naming the file, and so is a file shorter than its labels.
- ``header``: only the file headers are read (fast); durations of MP3 files are estimates.
- ``none``: files are not opened; missing files are counted, not reported as problems.

:func:`alignment_problems` is shared with training (``pdmer.training.context.build_context``), so
``train`` refuses audio shorter than its labels with the same message as ``data check``.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from pdmer.data.sources import SOURCES, read_source
from pdmer.data.types import STEP_S, Curve, DataError, Dataset, Song

log = logging.getLogger(__name__)

FORMATS = tuple(SOURCES)  # deam, pmemo, vgmidi, generic, synthetic
AUDIO_MODES = ("decode", "header", "none")
_LISTED = 50  # problems / records printed by format_report before "... and N more"


def alignment_problems(curves: list[Curve], n_steps: dict[str, int], songs: dict[str, Song] | None = None) -> list[str]:
    """Songs whose audio is shorter than their ratings (or has none), one message per song.

    Args:
        curves: the rated curves.
        n_steps: song id -> whole 0.5 s steps of its decoded audio (absent: no audio / features).
        songs: song id -> Song, to name the audio file in the messages.

    Returns:
        One message per bad song: the audio file, its length, and how far it is rated (by whom).
    """
    by_song: dict[str, list[Curve]] = defaultdict(list)
    for c in curves:
        by_song[c.song_id].append(c)
    problems = []
    for sid, cs in by_song.items():
        song = (songs or {}).get(sid)
        name = str(song.path) if song is not None else f"song {sid!r}"
        end = max(cs, key=lambda c: c.end_step)
        n_late = sum(c.end_step > n_steps.get(sid, 0) for c in cs)
        who = f"annotator {end.annotator_id!r}" + (f" and {n_late - 1} other curve(s)" if n_late > 1 else "")
        if sid not in n_steps:
            problems.append(f"{name}: no audio features for song {sid!r}, rated by {len(cs)} curve(s) (audio missing?)")
        elif any(c.start_step < 0 for c in cs):
            problems.append(f"{name}: song {sid!r} has ratings before 0 s")
        elif n_late:
            problems.append(
                f"{name}: audio is {n_steps[sid] * STEP_S:.1f} s ({n_steps[sid]} steps of {STEP_S} s) "
                f"but song {sid!r} is rated "
                f"until {end.end_step * STEP_S:.1f} s ({who}): the audio is shorter than its labels"
            )
    return problems


def fit_to_audio(
    curves: list[Curve], n_steps: dict[str, int], songs: dict[str, Song] | None = None
) -> tuple[list[Curve], list[dict], list[str]]:
    """Fit curves to their audio: the one rule of training and ``data check``.

    A curve must lie inside its song's whole 0.5 s steps. When the audio ends inside the
    curve's last step (the last rating's instant is inside the audio, the step after it is
    not whole: PMEmo rates up to the file's end, e.g. a last frame at 49.0 s in a 49.15 s file),
    that one step is cut and recorded. A curve running further past its audio is a problem.

    Args:
        curves: the rated curves.
        n_steps: song id -> whole 0.5 s steps of its decoded audio.
        songs: song id -> Song, to name the audio file.

    Returns:
        (curves, records, problems): the curves, the cut ones replaced; one record per cut (or
        dropped, when nothing is left) curve, as ``Dataset.info["dropped"]`` entries (stage
        "audio"); the problems of :func:`alignment_problems` (a curve that runs more than one step
        past its audio, or a song without audio), naming the file.
    """
    from pdmer.data.common import drop_record

    bad = [c for c in curves if c.song_id not in n_steps or c.start_step < 0 or c.end_step > n_steps[c.song_id] + 1]
    problems = alignment_problems(bad, n_steps, songs)
    bad_ids = {id(c) for c in bad}
    out, records = [], []
    for c in curves:
        if id(c) in bad_ids or c.end_step <= n_steps[c.song_id]:
            out.append(c)
            continue
        song = (songs or {}).get(c.song_id)
        t = (c.end_step - 1) * STEP_S
        where = {"song_id": c.song_id, "annotator_id": c.annotator_id, "file": None if song is None else song.path}
        if c.n_steps > 1:
            out.append(Curve(c.song_id, c.annotator_id, c.start_step, c.values[:-1]))
            records.append(
                drop_record(
                    "audio",
                    "trimmed",
                    f"the audio ends inside the last labelled step [{t:g}, {t + STEP_S:g}) s: that step is cut",
                    **where,
                )
            )
        else:
            records.append(
                drop_record(
                    "audio",
                    "dropped",
                    f"the curve's only step [{t:g}, {t + STEP_S:g}) s is not whole in the audio",
                    **where,
                )
            )
    return out, records, problems


def _problem_lines(e: DataError) -> list[str]:
    """The individual problems of a DataError listing several (one per indented line)."""
    lines = str(e).splitlines()
    items = [ln.strip()[2:] if ln.strip().startswith("- ") else ln.strip() for ln in lines[1:] if ln.strip()]
    return items or [str(e)]


def check_audio(
    dataset: Dataset, mode: str = "decode", sample_rate: int = 44100, progress: bool = False
) -> tuple[dict, list[str]]:
    """Check every song's audio file against the dataset's curves.

    Returns:
        (info, problems): info = {"mode", "files", "missing", "checked", "duration_s",
        "sample_rates", "channels", "trimmed"} (``trimmed``: records of the curves whose last
        step the audio does not cover whole, see :func:`fit_to_audio`); problems = one message
        per bad file, naming it.
    """
    import soundfile as sf

    from pdmer.features.audio import load_audio

    if mode not in AUDIO_MODES:
        raise ValueError(f"audio mode must be one of {AUDIO_MODES}, got {mode!r}")
    songs = dataset.songs
    missing = [s for s, song in songs.items() if not Path(song.path).is_file()]
    info = {
        "mode": mode,
        "files": len(songs),
        "missing": missing,
        "checked": 0,
        "duration_s": 0.0,
        "sample_rates": {},
        "channels": {},
        "trimmed": [],
    }
    problems: list[str] = []
    if mode == "none":
        return info, problems
    problems += [f"{songs[s].path}: audio file not found (song {s!r})" for s in missing]
    rates, channels = Counter(), Counter()
    n_steps: dict[str, int] = {}
    items = [s for s in songs if s not in set(missing)]
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc=f"audio ({mode})", unit="file")
    step = int(round(STEP_S * sample_rate))
    for sid in items:
        path = Path(songs[sid].path)
        if mode == "decode":  # exactly what training does: the same errors, the same messages
            try:
                wave = load_audio(path, sample_rate)
            except DataError as e:
                problems.append(str(e))
                continue
            seconds = len(wave) / sample_rate
            n_steps[sid] = len(wave) // step
        try:
            meta = sf.info(str(path))
        except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError
            if mode == "header":
                problems.append(f"{path}: cannot read audio header, corrupt or unsupported format ({e})")
                continue
        else:
            rates[int(meta.samplerate)] += 1
            channels[int(meta.channels)] += 1
            if mode == "header":
                seconds = float(meta.duration)
                n_steps[sid] = int(seconds // STEP_S)
        info["checked"] += 1
        info["duration_s"] += seconds
    checked = [c for c in dataset.curves if c.song_id in n_steps]
    _, records, found = fit_to_audio(checked, n_steps, songs)
    problems += found
    info["trimmed"] = records
    info["sample_rates"] = {str(k): v for k, v in sorted(rates.items())}
    info["channels"] = {str(k): v for k, v in sorted(channels.items())}
    return info, problems


def _generic_filters(dataset: Dataset, min_songs: int) -> tuple[dict, list[dict]]:
    by = dataset.by_annotator()
    few = {a: len(cs) for a, cs in by.items() if len(cs) < min_songs}
    dropped = [
        {
            "stage": "min_songs",
            "action": "excluded",
            "reason": f"listener has {n} song(s), fewer than {min_songs}: cannot form a task (support + query)",
            "annotator_id": a,
            "song_id": None,
            "file": None,
        }
        for a, n in few.items()
    ]
    unrated = dataset.info.get("unrated_songs") or []
    dropped += [
        {
            "stage": "read",
            "action": "unused",
            "reason": "audio without ratings",
            "song_id": s,
            "annotator_id": None,
            "file": str(dataset.songs[s].path),
        }
        for s in unrated
    ]
    return {
        "min_songs": {"min_songs_per_listener": min_songs, "n_listeners_excluded": len(few), "listeners_excluded": few},
        "unrated_songs": len(unrated),
    }, dropped


def _read(fmt: str, root: str | Path | None, cfg, audio: str, report: dict) -> Dataset | None:
    """The dataset read as training reads it, its notes added to ``report``; None (and the problems) if unreadable."""
    problems: list[str] = report["problems"]
    ds: Dataset | None = None
    try:
        if fmt in ("deam", "pmemo"):
            ds = read_source(fmt, root, cfg.data, require_audio=False, strict=False)
        elif fmt == "vgmidi":
            ds = read_source(fmt, root, cfg.data, render=audio != "none", strict=False)
        elif fmt == "generic" or root is not None:  # a synthetic benchmark's folder is written in the generic layout
            ds = read_source("generic", root, cfg.data, **({} if fmt == "generic" else {"scale": "deam"}))
            if fmt == "synthetic" and (ds.oracle is None or ds.consensus is None):
                problems.append(f"{root}: synthetic benchmark without oracle.csv / consensus.csv")
        else:
            ds = read_source("synthetic", None, cfg.data)
            report["root"] = str(ds.root)
        if fmt == "pmemo":
            report["notes"].append(
                "PMEmo publishes averaged curves only: they are one pseudo-listener 'consensus' "
                "(DMER training; no personalized tasks)"
            )
        elif fmt == "vgmidi":
            report["notes"].append(
                f"collection round(s) {', '.join(ds.info['rounds'])}; audio rendered from MIDI "
                "(FluidSynth) into the cache"
            )
    except DataError as e:
        problems.extend(_problem_lines(e))
        return None
    return ds


def _add_filters(fmt: str, ds: Dataset, min_songs: int, report: dict) -> None:
    """The split, filters and dropped records of ``ds`` into ``report``, as its source reports them."""
    if fmt == "deam":
        report["split"] = {k: len(v) for k, v in ds.info["split"].items()}
        report["filters"] = ds.info["filters"]
        report["dropped"] = ds.info["dropped"]
    elif fmt == "vgmidi":
        report["filters"], dropped = _generic_filters(ds, min_songs)
        report["dropped"] = ds.info["dropped"] + dropped
    elif fmt == "pmemo":
        report["dropped"] = ds.info["dropped"]
        report["filters"] = {"no_static": len(ds.info["no_static"])}
    else:
        report["filters"], report["dropped"] = _generic_filters(ds, min_songs)
        if ds.oracle is not None:
            report["notes"].append(
                f"oracle.csv: {len(ds.oracle)} noise-free personal curves; consensus.csv: "
                f"{len(ds.consensus or {})} songs"
            )


def check_data(fmt: str, root: str | Path | None, cfg=None, audio: str = "decode", progress: bool = False) -> dict:
    """Validate a dataset without raising on bad data.

    Args:
        fmt: "deam", "pmemo", "generic", or "synthetic" (the embedded benchmark: ``root`` None
            is the default benchmark of ``cfg.data.synthetic``, generated if needed; a folder is
            read as the generic layout it is written in).
        root: the dataset folder.
        cfg: an ExperimentConfig for the options (``data.deam.*``, ``data.pmemo.*``,
            ``data.generic.scale``, ``data.min_songs_per_listener``, ``features.sample_rate``);
            None takes the defaults (the DSAML authors' conventions).
        audio: "decode", "header" or "none" (see the module docstring).

    Returns:
        {"format", "root", "ok", "summary", "scale", "split", "filters", "dropped", "audio",
        "problems", "notes"}: ``ok`` is True when ``problems`` is empty; ``summary`` as
        :func:`pdmer.data.common.summarize` (None when the labels could not be read at all).
    """
    from pdmer.config import ExperimentConfig
    from pdmer.data.common import summarize

    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    cfg = cfg if cfg is not None else ExperimentConfig()
    report = {
        "format": fmt,
        "root": None if root is None else str(root),
        "ok": False,
        "summary": None,
        "scale": None,
        "split": None,
        "filters": None,
        "dropped": [],
        "audio": None,
        "problems": [],
        "notes": [],
    }
    problems: list[str] = report["problems"]
    if root is None and fmt != "synthetic":
        problems.append(f"--format {fmt} needs the dataset folder (ROOT)")
        return report
    ds = _read(fmt, root, cfg, audio, report)
    if ds is None:
        return report
    report["root"] = str(ds.root)
    problems.extend(ds.info.get("problems") or [])
    report["summary"] = summarize(ds)
    avg = [c.n_steps for c in (ds.consensus or {}).values()]
    report["summary"]["averaged_curves"] = len(avg)
    report["summary"]["steps_per_averaged_curve"] = (
        {"min": min(avg), "median": float(np.median(avg)), "max": max(avg)}
        if avg
        else {"min": None, "median": None, "max": None}
    )
    report["scale"] = ds.scale
    _add_filters(fmt, ds, cfg.data.min_songs_per_listener, report)
    info, audio_problems = check_audio(ds, audio, cfg.features.sample_rate, progress)
    report["audio"] = info
    report["dropped"] = list(report["dropped"]) + info["trimmed"]
    problems.extend(audio_problems)
    report["ok"] = not problems
    return report


def _rng(r) -> str:
    return "-" if r is None else f"[{r[0]:+.3f}, {r[1]:+.3f}]"


def _stats(d: dict) -> str:
    return "-" if d["min"] is None else f"min {d['min']}, median {d['median']:g}, max {d['max']}"


def format_report(report: dict, verbose: bool = False) -> str:
    """A data-check report as text: summary, filters, audio, problems (each with file and line)."""
    title = {
        "deam": "DEAM",
        "pmemo": "PMEmo2019",
        "vgmidi": "VGMIDI",
        "generic": "generic layout",
        "synthetic": "embedded benchmark",
    }[report["format"]]
    out = [f"{title}: {report['root']}"]
    if report["summary"] is not None:
        out += _summary_lines(report)
    f = {k: v for k, v in (report["filters"] or {}).items() if v}
    if f:
        out += ["  filtered:"] + _filter_lines(f)
    if report["dropped"]:
        out += _dropped_lines(report["dropped"], verbose)
    if report["audio"] is not None:
        out += _audio_lines(report["audio"])
    for note in report["notes"]:
        out.append(f"  note: {note}")
    problems = report["problems"]
    if problems:
        out.append(f"PROBLEMS ({len(problems)}):")
        shown = problems if verbose else problems[:_LISTED]
        out += [f"  {p}" for p in shown]
        if len(shown) < len(problems):
            out.append(f"  ... and {len(problems) - len(shown)} more (--verbose-report lists all)")
    else:
        out.append("OK: no problems")
    return "\n".join(out)


def _row(label: str, text: str) -> str:
    """One summary row: the label in a 30-character column."""
    return f"  {(label + ':') if label else '':<30}{text}"


def _summary_lines(report: dict) -> list[str]:
    """Songs, listeners, steps, labelled time, label ranges and scale."""
    out: list[str] = []

    def row(label: str, text: str) -> None:
        out.append(_row(label, text))

    s = report["summary"]
    scale = {"deam": "DEAM scale, about [-1, 1]", "unit": "unit scale, [0, 1]"}.get(report["scale"], report["scale"])
    split = report["split"]
    row("songs", f"{s['songs']}" + (f" ({split['train']} train, {split['test']} test)" if split else ""))
    n_avg = s.get("averaged_curves", 0)
    if s["listeners"]:
        row(
            "listeners",
            f"{s['listeners']} ({s['curves']} listener curves" + (f"; {n_avg} averaged curves" if n_avg else "") + ")",
        )
        row("songs per listener", _stats(s["songs_per_listener"]))
        row("steps per curve", f"{_stats(s['steps_per_curve'])} (0.5 s steps)")
    else:
        row("listeners", f"none with their own curves ({n_avg} averaged curves)")
    if n_avg:
        row("steps per averaged curve", _stats(s["steps_per_averaged_curve"]))
    t = s["labelled_time_s"]
    times = ([f"{t['curves'] / 3600:.2f} h of listener curves"] if s["listeners"] else []) + (
        [f"{t['consensus'] / 3600:.2f} h of averaged curves"] if n_avg else []
    )
    row("labelled time", ", ".join(times) or "none")
    for kind, name in (("curves", "listener curves"), ("consensus", "averaged curves")):
        if kind == "curves" and not s["listeners"]:
            continue
        r = s["label_range"][kind]
        if r and any(v is not None for v in r.values()):
            row(f"label range, {name}", f"arousal {_rng(r['arousal'])}, valence {_rng(r['valence'])}")
    row("label scale", f"{report['scale']} ({scale})")
    return out


def _filter_lines(f: dict) -> list[str]:
    """One line per filter that removed something."""
    out: list[str] = []
    if "read" in f:
        r = f["read"]
        out.append(
            f"    read:      {r['n_curves']} listener curves, {r['n_consensus']} averaged curves; "
            f"{r['n_files_skipped']} file(s) skipped, {r['n_one_label_raters']} rater(s) with one label only, "
            f"{r['n_trimmed']} curve(s) trimmed to common arousal/valence steps"
        )
    if "split" in f:
        out.append(
            f"    split:     {len(f['split']['songs_dropped'])} song(s) outside the train/test ids, "
            f"{f['split']['n_curves_dropped']} curve(s) dropped"
        )
    if "crop" in f:
        lo, hi = f["crop"]["steps"]
        out.append(
            f"    crop:      {f['crop']['n_cropped']} train-clip curve(s) cut to {lo * STEP_S:g}-{hi * STEP_S:g} s "
            f"({f['crop']['n_shorter_than_clip']} shorter than that)"
        )
    if "flat" in f:
        out.append(
            f"    flat:      {f['flat']['n_dropped']} curve(s) dropped (mean absolute deviation over the first "
            f"{f['flat']['window']} values < {f['flat']['threshold']:g}: slider not moved)"
        )
    if "min_songs" in f:
        m = f["min_songs"]
        n = m.get("n_listeners_dropped", m.get("n_listeners_excluded"))
        out.append(
            f"    min_songs: {n} listener(s) with fewer than {m['min_songs_per_listener']} songs "
            + ("dropped" if "n_listeners_dropped" in m else "excluded from tasks")
        )
    if f.get("unrated_songs"):
        out.append(f"    unrated:   {f['unrated_songs']} audio file(s) without ratings (not used)")
    if f.get("no_static"):
        out.append(f"    static:    {f['no_static']} song(s) without a static label")
    return out


def _dropped_lines(dropped: list[dict], verbose: bool) -> list[str]:
    """The dropped or changed items grouped by reason, one example each (all of them with ``verbose``)."""
    out: list[str] = []
    reasons = Counter((r["stage"], r["action"], _reason_kind(r["reason"])) for r in dropped)
    out.append(f"  dropped or changed ({len(dropped)}), by reason:")
    for (stage, action, reason), n in reasons.most_common():
        group = [r for r in dropped if (r["stage"], r["action"], _reason_kind(r["reason"])) == (stage, action, reason)]
        ex = group[0]
        who = ", ".join(
            x
            for x in (
                f"song {ex['song_id']}" if ex.get("song_id") else "",
                f"listener {ex['annotator_id']}" if ex.get("annotator_id") else "",
            )
            if x
        )
        where = f"({ex['file']})" if ex.get("file") else ""
        example = " ".join(x for x in (who, where) if x)
        if example:
            example = f", {'e.g. ' if n > 1 else ''}{example}"
        out.append(f"    {n:5d} x {stage}/{action}{example}: {ex['reason']}")
    if verbose:
        for r in dropped:
            out.append(f"      {r}")
    return out


def _audio_lines(a: dict) -> list[str]:
    """The audio files' state."""
    out: list[str] = []

    def row(label: str, text: str) -> None:
        out.append(_row(label, text))

    if a["mode"] == "none":
        row("audio", f"not opened (--audio none); {len(a['missing'])} of {a['files']} file(s) missing")
    else:
        rates = ", ".join(f"{k} Hz x {v}" for k, v in a["sample_rates"].items()) or "-"
        chans = ", ".join(f"{k} ch x {v}" for k, v in a["channels"].items()) or "-"
        row(
            f"audio ({a['mode']})",
            f"{a['checked']} of {a['files']} file(s) read, {a['duration_s'] / 3600:.2f} h; "
            f"{len(a['missing'])} missing; {rates}; {chans}",
        )
    if a["missing"] and len(a["missing"]) == a["files"]:
        row("", "every audio file is missing: only the labels were checked")
    return out


def _reason_kind(reason: str) -> str:
    """A reason with its numbers masked, to group records ("listener has 3 song(s)" -> "listener has N song(s)")."""
    import re

    return re.sub(r"\d+(\.\d+)?", "N", reason)

"""Speed and memory of pdmer: prints a table and writes JSON (``benchmarks/README.md``).

    python benchmarks/run.py [--device cpu|cuda] [--size small|paper] [--quick] [--precision fp32 bf16]

Measured, each in its own subprocess (so the peak memory of one does not hide another's):

- ``meta``: one PDMER meta-batch (first-order MAML: the tasks' inner loops, their query losses,
  the outer Adam step), random inputs of the paper's shapes: 16 tasks x 16 inner steps, support
  1 song x 60 steps, query 15 songs x 60 steps. Tasks adapted together (``meta.batch_tasks``) and
  one by one, in the same run, and their ratio.
- ``dmer``: one plain training step on 15 songs x 60 steps.
- ``calibrate``: one-shot calibration of one 30 s song from its WAV file: decoding, features,
  the inner loop (``meta.inner_steps`` of the experiment's config).
- ``predict``: a 10-minute WAV file to its emotion curve (decoding, features in segments,
  sliding windows as the ``predict`` command runs them, the per-step part of the model once per
  step): real-time factor, split into features and model, with the default (exact) CQT descriptor
  and with the multirate one (``features.cqt=multirate``); and the peak memory against a song
  three times as long.
- ``log_mel``: the local scale's log-Mel alone on the same song, decoded beforehand (on the CPU,
  where the features are computed). With the model's windows it gives the speed this feature
  definition cannot pass, whatever the descriptor (``log_mel_model_rtf`` in the summary).

Every time is the median over ``--repeats`` runs after one warm-up, with the min and max. Peak
memory: the subprocess's maximum resident set (CPU) and ``torch.cuda.max_memory_allocated``
(GPU). ``--quick`` (used by the test suite so the script cannot rot) shrinks shapes and repeats;
its figures are not the benchmark's. The weights are random: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from pdmer.config import CHOICES  # noqa: E402

# the paper's meta-batch (../shared/docs/dsaml.md; the authors' code: 15.7 s on an H100)
PAPER_META = {"tasks": 16, "steps": 16, "query": 15, "seq_len": 60}
QUICK_META = {"tasks": 2, "steps": 2, "query": 3, "seq_len": 60}
TARGETS = {  # (measurement, device, size) -> (bound, unit, direction)
    ("meta_batched_s", "cuda", "paper"): (0.8, "s", "max"),
    ("meta_batched_peak_gib", "cuda", "paper"): (16.0, "GiB", "max"),
    ("meta_speedup", "cuda", "paper"): (5.0, "x", "min"),
    ("calibrate_s", "cpu", "small"): (2.0, "s", "max"),
    ("predict_rtf", "cpu", "small"): (500.0, "x real time", "min"),
    ("predict_rtf", "cpu", "paper"): (100.0, "x real time", "min"),
    ("predict_rtf_multirate", "cpu", "small"): (500.0, "x real time", "min"),
    ("predict_rtf_multirate", "cpu", "paper"): (100.0, "x real time", "min"),
}


# --- measurements (run in a subprocess: ``--section NAME``) --------------------------------------


def _config(args):
    """The benchmark's config and device, the thread count set."""
    import torch

    from pdmer.config import load_config

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config("pdmer.synthetic.dsaml", [f"size={args.size}", f"train.precision={args.precision}"])
    return cfg, torch.device(args.device)


def _setup(args):
    """:func:`_config` and a model with random weights (seed 0), in training mode, on the device."""
    import torch

    from pdmer.features import descriptor_dim
    from pdmer.models.dsaml import DSAML

    torch.manual_seed(0)
    cfg, device = _config(args)
    model = DSAML(cfg.model, descriptor_dim(cfg.features)).to(device).train()
    return cfg, device, model


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, repeats: int, device) -> dict:
    fn()  # warm-up (allocator, caches, lazy init)
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return _stats(times)


def _stats(times: list[float]) -> dict:
    """Median, min, max and count of timed repeats (the warm-up left out)."""
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "repeats": len(times)}


def _random_batch(n_songs: int, seq_len: int, g_dim: int, device):
    import torch

    return (
        torch.randn(n_songs, seq_len, 51, 128, device=device).half(),  # features are cached as float16
        torch.randn(n_songs, seq_len, g_dim, device=device),
        torch.rand(n_songs, seq_len, 2, device=device) * 2 - 1,
    )


def _peaks(device) -> dict:
    import torch

    out = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux
    if device.type == "cuda":
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def section_meta(args) -> dict:
    import torch

    from pdmer.meta.maml import meta_step, meta_step_batched
    from pdmer.training.context import make_loss_fn

    cfg, device, model = _setup(args)
    shape = QUICK_META if args.quick else PAPER_META
    tasks = [
        (
            _random_batch(1, shape["seq_len"], model.global_dim, device),
            _random_batch(shape["query"], shape["seq_len"], model.global_dim, device),
        )
        for _ in range(shape["tasks"])
    ]
    loss_fn = make_loss_fn(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        if args.mode == "batched":
            stats = meta_step_batched(model, tasks, loss_fn, shape["steps"], cfg.meta.inner_lr, True, args.task_chunk)
        else:
            stats = meta_step(model, tasks, loss_fn, shape["steps"], cfg.meta.inner_lr, True)
        opt.step()
        return stats["query_loss"]

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out = {"shape": shape, "mode": args.mode, "task_chunk": args.task_chunk, **_timed(step, args.repeats, device)}
    return {**out, **_peaks(device)}


def section_dmer(args) -> dict:
    import torch

    from pdmer.meta.maml import split_state
    from pdmer.training.context import make_loss_fn

    cfg, device, model = _setup(args)
    songs = 3 if args.quick else 15
    batch = _random_batch(songs, 60, model.global_dim, device)
    loss_fn = make_loss_fn(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model, *split_state(model), batch).backward()
        opt.step()

    return {"songs": songs, "seq_len": 60, **_timed(step, args.repeats, device), **_peaks(device)}


def _write_song(path: Path, seconds: float, sr: int = 44100) -> Path:
    """A stereo WAV file of chords, noise bursts and silence-free texture (any audio times the same)."""
    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(0)
    with sf.SoundFile(str(path), "w", samplerate=sr, channels=2, subtype="PCM_16") as f:
        for start in range(0, int(seconds * sr), 10 * sr):  # written 10 s at a time
            n = min(10 * sr, int(seconds * sr) - start)
            t = (start + np.arange(n)) / sr
            x = 0.2 * np.sin(2 * np.pi * (220 + 30 * np.sin(t / 7)) * t) + 0.05 * rng.standard_normal(n)
            f.write(np.stack([x, 0.8 * x], axis=1).astype(np.float32))
    return path


def section_calibrate(args) -> dict:
    import torch

    from pdmer.data.types import Curve
    from pdmer.features import FeatureExtractor
    from pdmer.meta.maml import adapt
    from pdmer.meta.tasks import make_batch
    from pdmer.personal import song_features
    from pdmer.training.context import make_loss_fn

    cfg, device, model = _setup(args)
    model.eval()
    loss_fn = make_loss_fn(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        wav = _write_song(Path(tmp) / "song.wav", 30.0)
        fx = FeatureExtractor(cfg.features, use_cache=False)
        rng = torch.Generator().manual_seed(0)

        def run():
            feats = song_features(wav, fx)
            n = min(feats.n_steps, cfg.train.seq_len)
            curve = Curve("song", "me", 0, (torch.rand(n, 2, generator=rng) * 2 - 1).numpy())
            support = make_batch([(curve, 0, n)], {"song": feats}, device)
            adapt(model, support, loss_fn, cfg.meta.inner_steps, cfg.meta.inner_lr)

        out = _timed(run, args.repeats, device)
    return {"song_s": 30.0, "inner_steps": cfg.meta.inner_steps, **out, **_peaks(device)}


def section_predict(args) -> dict:
    """Prediction of one long WAV file with each descriptor of ``--cqt``, in turns (repeat by repeat).

    Taking the descriptors in turns puts them under the same machine load, so their ratio holds
    even when the machine's speed drifts during the run. Returns the first descriptor's figures,
    and the others' under ``"other"`` (descriptor -> figures).
    """
    import dataclasses

    from pdmer.features import FeatureExtractor
    from pdmer.personal import song_features
    from pdmer.personal.adaptation import predict_span

    cfg, device, model = _setup(args)
    model.eval()
    seconds = args.song_s
    kinds = list(dict.fromkeys(args.cqt))
    with tempfile.TemporaryDirectory() as tmp:
        wav = _write_song(Path(tmp) / "song.wav", seconds)
        fxs = {k: FeatureExtractor(dataclasses.replace(cfg.features, cqt=k), use_cache=False) for k in kinds}
        split = {k: {"total": [], "features": [], "model": []} for k in kinds}

        def run(kind: str) -> None:
            t0 = time.perf_counter()
            feats = song_features(wav, fxs[kind])
            t1 = time.perf_counter()
            predict_span(model, feats, 0, feats.n_steps, cfg.train.seq_len, cfg.eval.hop)  # as `predict` runs it
            _sync(device)
            t2 = time.perf_counter()
            for part, v in (("total", t2 - t0), ("features", t1 - t0), ("model", t2 - t1)):
                split[kind][part].append(v)

        for _ in range(args.repeats + 1):  # the first round is the warm-up
            for kind in kinds:
                run(kind)
    out = {}
    for kind, parts in split.items():
        total = _stats(parts["total"][1:])  # [0] is the warm-up
        out[kind] = {
            "song_s": seconds,
            "hop": cfg.eval.hop,
            "cqt": kind,
            "rtf": seconds / total["median"],
            **total,
            **{f"{k}_median": statistics.median(v[1:]) for k, v in parts.items() if k != "total"},
        }
    first, *others = kinds
    peaks = _peaks(device)  # of the process: both descriptors' runs together
    return {**out[first], **peaks, "other": {k: {**out[k], **peaks} for k in others}}


def section_log_mel(args) -> dict:
    """The local scale's log-Mel alone, on a decoded song (in its own process: prediction's memory
    figures do not hold the decoded song). With the model's windows from the prediction section, it
    is what a prediction with this feature definition takes at least, whatever the global descriptor
    and the decoding cost."""
    import soundfile as sf

    from pdmer.features.local import log_mel

    cfg, device = _config(args)  # no model: only the features are timed
    with tempfile.TemporaryDirectory() as tmp:
        wav = _write_song(Path(tmp) / "song.wav", args.song_s)
        wave, sr = sf.read(str(wav), dtype="float32", always_2d=True)  # (n, channels)
    wave = wave.mean(1).astype("float32")  # (n,) mono, as the features decode it
    if sr != cfg.features.sample_rate:
        raise SystemExit(f"the benchmark song is at {sr} Hz, the features at {cfg.features.sample_rate} Hz")
    times = _timed(lambda: log_mel(wave, cfg.features), args.repeats, device)
    return {**times, "song_s": args.song_s, "n_fft": cfg.features.n_fft, "sample_rate": cfg.features.sample_rate}


def section_listeners(args) -> dict:
    """Many listeners' one-shot adaptations: one after another, as ``calibrate_many`` runs them, or together.

    Each listener has one 30 s support window (random features and ratings: any values time the
    same); "together" adapts them in one ``vmap`` over per-listener parameters
    (:func:`pdmer.meta.maml.batched_inner_loop`, the meta-training path), the batch that
    :mod:`pdmer.personal.batch` leaves out on the CPU.
    """
    import torch

    from pdmer.features import descriptor_dim
    from pdmer.meta.maml import adapt, batched_inner_loop, split_state, stack_tasks, tasks_batched
    from pdmer.training.context import make_loss_fn

    cfg, device, model = _setup(args)
    model.eval()
    loss_fn = make_loss_fn(cfg)
    steps, lr = cfg.meta.inner_steps, cfg.meta.inner_lr
    torch.manual_seed(1)
    supports = [
        _random_batch(1, cfg.train.seq_len, descriptor_dim(cfg.features), device) for _ in range(args.listeners)
    ]
    stacked = stack_tasks(supports)

    def one_by_one():
        for support in supports:
            adapt(model, support, loss_fn, steps, lr)

    def together():
        params, buffers = split_state(model)
        params = {k: v.detach() for k, v in params.items()}
        buffers = {k: v.detach() for k, v in buffers.items()}
        with torch.enable_grad(), tasks_batched(model, second_order=False):
            batched_inner_loop(model, params, buffers, stacked, loss_fn, steps, lr, first_order=True)

    seq = _timed(one_by_one, args.repeats, device)
    bat = _timed(together, args.repeats, device)
    n = args.listeners
    return {
        "listeners": n,
        "inner_steps": steps,
        "sequential": seq,
        "batched": bat,
        "sequential_per_s": n / seq["median"],
        "batched_per_s": n / bat["median"],
        "median": seq["median"],
        **_peaks(device),
    }


SECTIONS = {
    "meta": section_meta,
    "dmer": section_dmer,
    "calibrate": section_calibrate,
    "listeners": section_listeners,
    "predict": section_predict,
    "log_mel": section_log_mel,
}


# --- driver ------------------------------------------------------------------------------------


def _sub(args, section: str, **extra) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--section",
        section,
        "--device",
        args.device,
        "--size",
        args.size,
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
    ]
    cmd += ["--quick"] if args.quick else []
    for k, v in extra.items():
        cmd += [f"--{k.replace('_', '-')}", *str(v).split()]  # "exact multirate": two values
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"benchmark section {section} {extra} failed:\n{p.stderr[-4000:]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    print(
        f"  {section} {' '.join(f'{k}={v}' for k, v in extra.items())}: {out['median']:.3f} s median "
        f"({time.perf_counter() - t0:.0f} s wall)",
        file=sys.stderr,
        flush=True,
    )
    return out


def _device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    return f"{cpu or 'CPU'}, {torch.get_num_threads()} threads"


def run_all(args) -> dict:
    import torch

    from pdmer.runs import git_info

    res: dict = {
        "device": args.device,
        "device_name": _device_name(args.device),
        "size": args.size,
        "quick": args.quick,
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "git": git_info(exclude=("benchmarks/results",)),  # writing one result must not mark the next dirty
        "precisions": {},
    }
    for prec in args.precision:
        r = {}
        if "meta" not in args.skip:
            r["meta_batched"] = _sub(args, "meta", mode="batched", precision=prec, task_chunk=args.task_chunk)
            if args.sequential:
                r["meta_sequential"] = _sub(args, "meta", mode="sequential", precision=prec)
        if "dmer" not in args.skip:
            r["dmer"] = _sub(args, "dmer", precision=prec)
        res["precisions"][prec] = r
    res["calibrate"] = _sub(args, "calibrate")
    res["listeners"] = _sub(args, "listeners", listeners=2 if args.quick else 8)
    long_s = 120.0 if args.quick else 600.0
    res["predict"] = _sub(args, "predict", song_s=long_s, cqt="exact multirate")  # both descriptors, in turns
    res["predict_multirate"] = res["predict"].pop("other")["multirate"]
    res["log_mel"] = _sub(args, "log_mel", song_s=long_s)
    # memory against song length: three times as long, past the point where the windows fill a batch
    res["predict_long"] = _sub(args, "predict", song_s=3 * long_s, repeats=1)
    res["summary"] = summarize(res)
    return res


def summarize(res: dict) -> dict:
    first = res["precisions"][next(iter(res["precisions"]))]
    s = {}
    if "meta_batched" in first:
        s["meta_batched_s"] = first["meta_batched"]["median"]
        s["meta_batched_peak_gib"] = first["meta_batched"].get("peak_gpu_gib", first["meta_batched"]["peak_rss_gib"])
    if "dmer" in first:
        s["dmer_step_s"] = first["dmer"]["median"]
    s.update(
        {
            "calibrate_s": res["calibrate"]["median"],
            "predict_rtf": res["predict"]["rtf"],
            **({"predict_rtf_multirate": res["predict_multirate"]["rtf"]} if "predict_multirate" in res else {}),
            "predict_peak_rss_gib": res["predict"]["peak_rss_gib"],
            "predict_long_peak_rss_gib": res["predict_long"]["peak_rss_gib"],
        }
    )
    if "log_mel" in res:  # the log-Mel and the model's windows alone
        s["log_mel_model_rtf"] = res["predict"]["song_s"] / (res["log_mel"]["median"] + res["predict"]["model_median"])
    if "listeners" in res:
        s["listeners_per_s"] = res["listeners"]["sequential_per_s"]
        s["listeners_batched_per_s"] = res["listeners"]["batched_per_s"]
    if "meta_sequential" in first:
        s["meta_sequential_s"] = first["meta_sequential"]["median"]
        s["meta_speedup"] = s["meta_sequential_s"] / s["meta_batched_s"]
    return s


def fmt_time(m: dict) -> str:
    return f"{m['median']:.3f} s ({m['min']:.3f}-{m['max']:.3f}, n={m['repeats']})"


def table(res: dict) -> str:
    """Markdown table of one benchmark result, with the targets that apply to it."""
    dev, size = res["device"], res["size"]
    gpu = dev == "cuda"
    mem = (
        (lambda m: f"{m['peak_gpu_gib']:.2f} GiB GPU, {m['peak_rss_gib']:.2f} GiB RSS")
        if gpu
        else (lambda m: f"{m['peak_rss_gib']:.2f} GiB RSS")
    )
    rows = []
    for prec, r in res["precisions"].items():
        if "meta_batched" in r:
            sh = r["meta_batched"]["shape"]
            what = f"{sh['tasks']} tasks x {sh['steps']} inner steps, query {sh['query']} x {sh['seq_len']}"
            rows.append(
                f"| PDMER meta-batch, tasks batched ({prec}; {what}) | {fmt_time(r['meta_batched'])} | {mem(r['meta_batched'])} |"
            )
        if "meta_sequential" in r:
            ratio = r["meta_sequential"]["median"] / r["meta_batched"]["median"]
            rows.append(
                f"| PDMER meta-batch, tasks one by one ({prec}) | {fmt_time(r['meta_sequential'])} | {mem(r['meta_sequential'])} |"
            )
            rows.append(f"| batched speed-up over one by one ({prec}) | {ratio:.2f}x | |")
        if "dmer" in r:
            rows.append(
                f"| DMER train step ({prec}; {r['dmer']['songs']} songs x 60 steps) | {fmt_time(r['dmer'])} | {mem(r['dmer'])} |"
            )
    c, p, q = res["calibrate"], res["predict"], res["predict_long"]
    rows.append(
        f"| one-shot calibration, 30 s song (WAV -> adapted weights, {c['inner_steps']} steps) | {fmt_time(c)} | {mem(c)} |"
    )
    if "listeners" in res:
        m = res["listeners"]
        rows.append(
            f"| adapting {m['listeners']} listeners ({m['inner_steps']} steps, 30 s support each), one after another "
            f"(`calibrate_many`) | {fmt_time(m['sequential'])} = {m['sequential_per_s']:.2f} listeners/s | {mem(m)} |"
        )
        rows.append(
            f"| the same listeners adapted together (vmap) | {fmt_time(m['batched'])} = {m['batched_per_s']:.2f} "
            f"listeners/s ({m['batched_per_s'] / m['sequential_per_s']:.2f}x) | |"
        )

    def prediction(m: dict, what: str = "", vs: str = "") -> None:
        rows.append(
            f"| prediction, {m['song_s'] / 60:.0f}-min song{what} | {fmt_time(m)} = **{m['rtf']:.0f}x real time**{vs} "
            f"| {mem(m)} |"
        )
        rows.append(
            f"| of which: decoding + features / the model's sliding windows | {m['features_median']:.3f} s / "
            f"{m['model_median']:.3f} s | |"
        )

    prediction(p, " (WAV -> curve)")
    mel = res.get("log_mel")
    if mel:
        rows.append(
            f"| the local scale's log-Mel alone, same song (decoded audio -> log-Mel; {mel['sample_rate']} Hz, "
            f"n_fft {mel['n_fft']}; own process) | {fmt_time(mel)} | |"
        )
    if "predict_multirate" in res:
        n = res["predict_multirate"]
        vs = f" ({n['rtf'] / p['rtf']:.2f}x the exact one's)"
        prediction(n, ", the multirate CQT descriptor (`features.cqt=multirate`)", vs)
    rows.append(
        f"| prediction, {q['song_s'] / 60:.0f}-min song (memory against song length) | {fmt_time(q)} = {q['rtf']:.0f}x real time | {mem(q)} |"
    )
    head = (
        f"**{dev}, size {size}{', quick' if res['quick'] else ''}**: {res['device_name']}; torch {res['torch']}; "
        f"{res['date']}, commit {(res['git']['commit'] or 'unknown')[:7]}{' (uncommitted changes)' if res['git']['dirty'] else ''}"
    )
    lines = [head, "", "| measurement | time: median (min-max, repeats) | peak memory |", "|---|---|---|", *rows]
    checks = []
    for (key, d, sz), (bound, unit, how) in TARGETS.items():
        if d == dev and sz == size and key in res["summary"]:
            v = res["summary"][key]
            ok = v <= bound if how == "max" else v >= bound
            checks.append(
                f"- target {key} {'<=' if how == 'max' else '>='} {bound:g} {unit}: measured {v:.3g} -> "
                f"**{'met' if ok else 'NOT met'}**"
            )
    if "log_mel_model_rtf" in res["summary"]:
        checks.append(
            f"- the local log-Mel and the model's windows as they are, with nothing else (decoding and the global "
            f"descriptor come on top): {res['summary']['log_mel_model_rtf']:.0f}x real time"
        )
    key = "peak_gpu_gib" if gpu else "peak_rss_gib"
    growth = q[key] / p[key]
    checks.append(
        f"- prediction memory flat in song length: peak {p[key]:.2f} GiB for {p['song_s']:.0f} s, "
        f"{q[key]:.2f} GiB for {q['song_s']:.0f} s ({growth:.2f}x for {q['song_s'] / p['song_s']:.0f}x the "
        f"audio) -> **{'flat' if growth < 1.2 else 'NOT flat'}**"
    )
    lines += ["", *checks]
    return "\n".join(lines)


MARKER = "<!-- figures: generated by `python benchmarks/run.py --readme` from benchmarks/results/*.json -->"


def write_readme(path: Path = HERE / "README.md") -> Path:
    """Replace the figures part of ``benchmarks/README.md`` with the tables of the saved results."""
    text = path.read_text()
    if MARKER not in text:
        raise SystemExit(f"{path}: marker line not found; it must contain:\n{MARKER}")
    found = sorted(p for p in (HERE / "results").glob("*.json") if not p.stem.endswith("-quick"))
    tables = [table(json.loads(p.read_text())) + f"\n\n(`{p.relative_to(REPO)}`)" for p in found]
    path.write_text(text.split(MARKER)[0] + MARKER + "\n\n" + ("\n\n".join(tables) or "No results yet.") + "\n")
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    ap.add_argument("--size", choices=["small", "paper"], default="small")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and 1 repeat (a smoke test, not figures)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats after one warm-up (default 5; quick 2)")
    ap.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32"])
    ap.add_argument("--no-sequential", dest="sequential", action="store_false", help="skip the one-by-one meta-batch")
    ap.add_argument(
        "--skip",
        nargs="+",
        choices=["meta", "dmer"],
        default=[],
        help="leave out these (e.g. meta at paper size on a CPU: minutes per meta-batch)",
    )
    ap.add_argument("--task-chunk", type=int, default=0, help="meta.task_chunk of the batched meta-batch (0 = all)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument(
        "--out", type=Path, default=None, help="JSON path (default benchmarks/results/<device>-<size>.json)"
    )
    ap.add_argument(
        "--readme", action="store_true", help="only regenerate benchmarks/README.md's figures from the saved JSON"
    )
    # internal: one measurement in this process
    ap.add_argument("--section", choices=sorted(SECTIONS), help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="batched", help=argparse.SUPPRESS)
    ap.add_argument("--song-s", type=float, default=600.0, help=argparse.SUPPRESS)
    ap.add_argument("--listeners", type=int, default=8, help=argparse.SUPPRESS)
    ap.add_argument("--cqt", nargs="+", choices=CHOICES["features.cqt"], default=["exact"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.repeats is None:
        args.repeats = 1 if args.quick else 5
    if args.readme:
        print(f"written: {write_readme()}")
        return 0
    if args.section:
        args.precision = args.precision[0]
        print(json.dumps(SECTIONS[args.section](args)))
        return 0
    res = run_all(args)
    out = args.out or HERE / "results" / f"{args.device}-{args.size}{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(table(res))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

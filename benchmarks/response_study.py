"""How much a listener's linear response to the music carries over, with no model trained.

The safe rule's ``response`` component (:mod:`pdmer.response`) fits, on one support sequence, a
ridge regression of the listener's residual on the step spectra, and adds its prediction on another
span. This script measures that on its own, against a listener-blind base curve that needs no
training: the leave-one-out average of the other listeners' curves of the song (``others``, which
has seen the song's ratings: a strong base). Per listener, the support is the first ``SUPPORT``
steps of one song (chosen at random with the seed), and the query

- ``across``: each of the listener's other songs, whole (pdmer's ``songs`` protocol);
- ``within``: the rest of the support song (the DSAML authors' protocol).

For each setting of the design (principal axes ``k``, smoothing ``tau``, lags) and penalty
``lam``, and a weight of 1 (the whole response), it prints the mean change of mean CCC and of RMSE
(both dimensions) against the base, with a 95 % interval over listeners (normal approximation).
The constants in :mod:`pdmer.response` are the ``k=4 tau=3 lags=0,4 lam=0.1`` row. Nothing here
is a table row; it says what the data allow before any model is trained.

    python benchmarks/response_study.py                                   # the embedded benchmark
    python benchmarks/response_study.py pdmer.vgmidi.dsaml --protocol within   # VGMIDI (data/vgmidi)
    python benchmarks/response_study.py pdmer.synthetic_carry0.dsaml      # control: nothing carries over
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdmer import response as R  # noqa: E402
from pdmer.config import config_hash, load_config  # noqa: E402
from pdmer.data.types import Curve  # noqa: E402
from pdmer.metrics import song_metrics  # noqa: E402
from pdmer.references import OthersAverage  # noqa: E402
from pdmer.training.context import build_context  # noqa: E402

SUPPORT = 60  # steps: 30 s, the paper's support sequence
Z95 = 1.96


def tasks(ctx, protocol: str, seed: int, listeners: list[str]) -> list[tuple[Curve, list[Curve]]]:
    """(support sequence, queries) per listener."""
    by: dict[str, list[Curve]] = {}
    for c in ctx.dataset.curves:
        if c.annotator_id in listeners and c.song_id in ctx.features:
            by.setdefault(c.annotator_id, []).append(c)
    rng = np.random.default_rng(seed)
    out = []
    for a in sorted(by):
        cs = by[a]
        if protocol == "across" and len(cs) < 2:
            continue
        if protocol == "within":
            cs = [c for c in cs if c.n_steps >= SUPPORT + 10]
            if not cs:
                continue
        i = int(rng.integers(len(cs)))
        s = cs[i]
        sup = Curve(s.song_id, a, s.start_step, s.values[:SUPPORT])
        if protocol == "within":
            queries = [Curve(s.song_id, a, s.start_step + SUPPORT, s.values[SUPPORT:])]
        else:
            queries = [c for j, c in enumerate(cs) if j != i]
        out.append((sup, queries))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("experiment", nargs="?", default="pdmer.synthetic.dsaml")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides")
    ap.add_argument("--protocol", choices=("across", "within"), default="across")
    ap.add_argument("--split", default="all", choices=("all", "train", "val", "test"), help="whose curves are scored")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="the defaults only (for the tests)")
    ap.add_argument("--out", metavar="FILE", help="also write the table (markdown) to FILE")
    args = ap.parse_args(argv)

    cfg = load_config(args.experiment, list(args.overrides) + ["runtime.progress=false"])
    ctx = build_context(cfg)
    train_songs = sorted({c.song_id for cs in ctx.train_curves().values() for c in cs if c.song_id in ctx.features})
    basis = R.ResponseBasis.fit([R.step_spectra(ctx.features[s].local) for s in train_songs], k=8)  # as a run's
    listeners = [a for s, ls in ctx.splits.items() if args.split in ("all", s) and s != "excluded" for a in ls]
    others = OthersAverage(ctx.dataset.curves)
    work = tasks(ctx, args.protocol, args.seed, set(listeners))
    grid = [(R.K, R.TAU_STEPS, R.LAGS)]
    lams = [R.LAMBDA]
    if not args.quick:
        grid = list(itertools.product((2, 4, 8), (0.0, R.TAU_STEPS), ((0,), R.LAGS)))
        lams = [0.03, 0.1, 0.3, 1.0]
    designs = {(c.song_id, g): None for c in ctx.dataset.curves for g in grid}
    for sid, g in list(designs):
        if sid in ctx.features:
            designs[sid, g] = basis.design_with(ctx.features[sid].local, *g)

    rows = {(g, lam): [] for g in grid for lam in lams}
    for sup, queries in work:
        base_s = others(sup.annotator_id, sup)
        if base_s is None:
            continue
        bases = [(q, others(q.annotator_id, q)) for q in queries]
        bases = [(q, b) for q, b in bases if b is not None]
        if not bases:
            continue
        for g in grid:
            xs = R.span(designs[sup.song_id, g], sup.start_step, sup.end_step)
            for lam in lams:
                beta = R.fit_songs([xs], [sup.values - base_s], lam)
                ch = []
                for q, b in bases:
                    p = b + R.curve(R.span(designs[q.song_id, g], q.start_step, q.end_step), beta)
                    m0, m1 = song_metrics(b.astype(np.float32), q.values), song_metrics(p.astype(np.float32), q.values)
                    ch.append(
                        [
                            m1["ccc_mean"] - m0["ccc_mean"],
                            m1["rmse_arousal"] - m0["rmse_arousal"],
                            m1["rmse_valence"] - m0["rmse_valence"],
                        ]
                    )
                rows[g, lam].append(np.nanmean(ch, 0))
    n = len(next(iter(rows.values())))
    lines = [
        f"{cfg.name} (config {config_hash(cfg)}), protocol {args.protocol}, {n} listeners ({args.split}), seed "
        f"{args.seed}, base: the others' average; generated by `python benchmarks/response_study.py "
        + " ".join(argv if argv is not None else sys.argv[1:])
        + "`",
        "",
        "| k | tau | lags | lam | CCC mean change (95 % CI) | RMSE arousal change | RMSE valence change |",
        "|---|---|---|---|---|---|---|",
    ]
    table = {}
    for (g, lam), v in sorted(rows.items(), key=lambda kv: -np.mean([r[0] for r in kv[1]] or [0])):
        v = np.array(v)
        m, se = v.mean(0), v.std(0, ddof=1) / np.sqrt(len(v))
        cells = [f"{m[j]:+.4f} [{m[j] - Z95 * se[j]:+.4f}, {m[j] + Z95 * se[j]:+.4f}]" for j in range(3)]
        lag_s = ",".join(str(x) for x in g[2])
        lines.append(f"| {g[0]} | {g[1]:g} | {lag_s} | {lam:g} | " + " | ".join(cells) + " |")
        table[g, lam] = {"listeners": len(v), "mean": m.tolist(), "se": se.tolist()}
    print("\n".join(lines))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n")
    return table


if __name__ == "__main__":
    main()

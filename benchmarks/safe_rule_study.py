"""Compare ways of choosing the safe rule's weights on finished runs, on their test listeners.

The safe rule (:mod:`pdmer.personalize`) combines, per listener, what evaluation already computed
(generic and adapted curves, the support statistics, the held-out check). Only the choice of the
population weights differs between the variants compared here, so the expensive part (adapting
every validation and test listener) runs once per run folder and is kept in
``<run>/study/parts-{val,test}.npz`` (plain arrays, no pickle); the comparison then takes seconds.

    python benchmarks/safe_rule_study.py dump runs/pdmer.vgmidi.dsaml-4714c7f7 [...]
    python benchmarks/safe_rule_study.py compare runs/pdmer.vgmidi.dsaml-4714c7f7 [...]

``compare`` prints, per run and choice, the weights chosen on the validation listeners and what
they do to the test listeners: the mean CCC gain with its 95 % interval (normal approximation
over listeners' parts), and the metrics on which the interval lies wholly on the bad side.
It is a development tool: the table rows are made by ``run.py reproduce``.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdmer import personalize as P  # noqa: E402
from pdmer.data.types import LABELS  # noqa: E402

Z95 = 1.96


# --- dump --------------------------------------------------------------------------------------


def _flatten(parts: list[P.Parts]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for i, p in enumerate(parts):
        out[f"{i}_support"] = np.stack([p.support.offset, p.support.scale])
        if p.check is not None:
            c = p.check
            extra = [] if c.response is None else [c.response]  # the response component's curve, when computed
            out[f"{i}_check"] = np.stack([c.ratings, c.generic, c.adapted, *extra]).astype(np.float64)
            out[f"{i}_check_support"] = np.stack([c.support.offset, c.support.scale])
        for j, q in enumerate(p.queries.values()):  # (ratings, generic, adapted[, response])
            out[f"{i}_q{j}"] = np.stack([x for x in q if x is not None]).astype(np.float64)
    out["n"] = np.array(len(parts))
    out["listeners"] = np.array([p.listener for p in parts], dtype=str)
    return out


def _unflatten(z) -> list[P.Parts]:
    parts = []
    for i in range(int(z["n"])):
        s = z[f"{i}_support"]
        check = None
        if f"{i}_check" in z:
            c, cs = z[f"{i}_check"], z[f"{i}_check_support"]
            check = P.Check(c[0], c[1], c[2], P.Support(cs[0], cs[1]), c[3] if len(c) > 3 else None)
        queries, j = {}, 0
        while f"{i}_q{j}" in z:
            q = z[f"{i}_q{j}"]
            queries[f"q{j}"] = tuple(q)  # (ratings, generic, adapted[, response])
            j += 1
        who = str(z["listeners"][i]) if "listeners" in z else ""
        parts.append(P.Parts(P.Support(s[0], s[1]), check, queries, who))
    return parts


def dump(run: Path, overrides: list[str] = (), tag: str = "") -> None:
    from pdmer.checkpoint import load_weights
    from pdmer.config import config_hash
    from pdmer.evaluation.split import evaluate_split, rule_parts
    from pdmer.personalize import Weights
    from pdmer.runs import load_run_config
    from pdmer.training.context import build_context, build_model

    cfg = load_run_config(run)
    if overrides:  # evaluation-time settings only (e.g. meta.inner_steps=10): the weights are the run's
        from omegaconf import OmegaConf

        from pdmer.config import from_dict, to_dict

        merged = OmegaConf.merge(OmegaConf.create(to_dict(cfg)), OmegaConf.from_dotlist(list(overrides)))
        cfg = from_dict(OmegaConf.to_container(merged))
    ctx = build_context(cfg)
    model = build_model(ctx)
    load_weights(run / "checkpoints" / "best.safetensors", model, {"config_hash": config_hash(load_run_config(run))})
    model.eval()
    (run / "study").mkdir(exist_ok=True)
    for split in ("val", "test"):
        base = run / "study" / f"parts-{split}.npz"
        if split == "test" and tag and not overrides and base.exists() and "listeners" in np.load(base):
            shutil.copyfile(base, run / "study" / f"parts{tag}-{split}.npz")  # test parts do not depend on the choice
            continue
        if split == "val":  # what the rule is chosen on (all support draws)
            parts, _ = rule_parts(model, ctx)
        else:
            _, results = evaluate_split(model, ctx, split, weights=Weights(), protocol=cfg.eval.protocol)
            parts = [p for r in results for p in r.parts]
        np.savez(run / "study" / f"parts{tag}-{split}.npz", **_flatten(parts))
        print(f"{run}: {split}: {len(parts)} parts", flush=True)


# --- choices -----------------------------------------------------------------------------------


def _bounds(ch: np.ndarray, z: float) -> tuple[np.ndarray, np.ndarray]:
    mean = ch.mean(0)
    se = ch.std(0, ddof=1) / np.sqrt(len(ch)) if len(ch) > 1 else np.full(ch.shape[1], np.inf)
    return mean, z * se


def rule_superiority(ch, z=1.645):
    """Today's: no metric worse with confidence (each changed metric's bad-side bound within 0)."""
    m, h = _bounds(ch, z)
    return m[0] - h[0] >= -P.TOL and m[1] + h[1] <= P.TOL and m[2] - h[2] >= -P.TOL


def rule_not_significantly_worse(ch, z=1.645):
    """No metric significantly worse (the good-side bound reaches 0) and no mean worse."""
    m, h = _bounds(ch, z)
    return (
        m[0] >= -P.TOL
        and m[1] <= P.TOL
        and m[2] >= -P.TOL
        and m[0] + h[0] >= 0
        and m[1] - h[1] <= 0
        and m[2] + h[2] >= 0
    )


def rule_rmse_confident(ch, z=1.645):
    """RMSE no worse with confidence, CCC and PCC no worse on average."""
    m, h = _bounds(ch, z)
    return m[1] + h[1] <= P.TOL and m[0] >= -P.TOL and m[2] >= -P.TOL


def rule_margin(delta, z=1.645):
    """Non-inferiority at margin ``delta``: each metric's mean no worse, its bad-side bound within ``delta``."""

    def f(ch):
        m, h = _bounds(ch, z)
        return (
            m[0] >= -P.TOL
            and m[1] <= P.TOL
            and m[2] >= -P.TOL
            and m[0] - h[0] >= -delta
            and m[1] + h[1] <= delta
            and m[2] - h[2] >= -delta
        )

    return f


def choose(parts, safe, use_gate=True, objective=P.objective, grid=P.GRID):
    """Weights per dimension maximizing ``objective(changes)`` among the ``safe(changes)`` points."""
    best_total, best_w = -np.inf, None
    for gated in (True, False) if use_gate else (False,):
        w = P.Weights(gate=gated)
        total = 0.0
        for d in range(2):
            best = ((0.0, 0.0, 0.0), 0.0)
            points = [pt for pt in itertools.product(grid, repeat=3) if any(pt)]
            padded = np.array([pt + (0.0,) * (len(P.COMPONENTS) - 3) for pt in points])  # offset, scale, maml only
            for pt, changes in zip(points, P._grid_scores(parts, d, padded, gated)):
                ch = P.by_listener(changes, [p.listener for p in parts])
                if not safe(ch):
                    continue
                o = objective(ch)
                if o > best[1]:
                    best = (pt, o)
            w.offset[d], w.scale[d], w.maml[d] = best[0]
            total += best[1]
        if total > best_total + 1e-12 or (gated and abs(total - best_total) <= 1e-12):
            best_total, best_w = total, w
    return best_w


def mean_objective(ch):
    return float(ch[:, 0].mean() - ch[:, 1].mean())


def lcb_objective(z):
    """The objective's lower confidence bound over the listeners' parts (a pessimistic choice)."""

    def f(ch):
        o = ch[:, 0] - ch[:, 1]
        return float(o.mean() - z * o.std(ddof=1) / np.sqrt(len(o))) if len(o) > 1 else -np.inf

    return f


CHOICES = {
    "superiority (today)": dict(safe=rule_superiority, objective=mean_objective),
    "not signif. worse": dict(safe=rule_not_significantly_worse, objective=mean_objective),
    "rmse confident": dict(safe=rule_rmse_confident, objective=mean_objective),
    "production (pdmer.personalize)": None,
    "margin 0.005": dict(safe=rule_margin(0.005), objective=mean_objective),
    "margin 0.01": dict(safe=rule_margin(0.01), objective=mean_objective),
    "lcb(1.645) + not worse": dict(safe=rule_not_significantly_worse, objective=lcb_objective(1.645)),
    "lcb(1.645) + rmse conf": dict(safe=rule_rmse_confident, objective=lcb_objective(1.645)),
}


def score_test(parts, w: P.Weights) -> dict:
    who = [p.listener for p in parts]
    per = [P.by_listener(P._dim_scores(parts, d, w.of(d), w.gate[d]), who) for d in range(2)]  # 2 x (n, 3)
    ccc = (per[0][:, 0] + per[1][:, 0]) / 2
    out = {
        "gain": float(ccc.mean()),
        "ci": (
            float(ccc.mean() - Z95 * ccc.std(ddof=1) / np.sqrt(len(ccc))),
            float(ccc.mean() + Z95 * ccc.std(ddof=1) / np.sqrt(len(ccc))),
        ),
    }
    bad = []
    for d, label in enumerate(LABELS):
        for k, name, sign in ((0, "ccc", 1), (1, "rmse", -1), (2, "pcc", 1)):
            x = sign * per[d][:, k]
            if x.std() > 1e-9 and x.mean() + Z95 * x.std(ddof=1) / np.sqrt(len(x)) < 0:
                bad.append(f"{name} {label}")
    out["worse"] = bad
    out["rmse"] = [float(per[d][:, 1].mean()) for d in range(2)]
    return out


def compare(runs: list[Path], tag: str = "") -> None:
    for run in runs:
        val = _unflatten(np.load(run / "study" / f"parts{tag}-val.npz"))
        test = _unflatten(np.load(run / "study" / f"parts{tag}-test.npz"))
        print(f"\n{run.name}: {len(val)} validation parts, {len(test)} test parts")
        for name, spec in CHOICES.items():
            if spec is None:
                w, _ = P.choose_weights(val)
            else:
                w = choose(val, spec["safe"], objective=spec["objective"])
            s = score_test(test, w)
            ws = " ".join(f"{c}={getattr(w, c)}" for c in P.COMPONENTS)
            print(
                f"  {name:26s} gate={''.join(str(int(g)) for g in w.gate)} {ws}\n      test gain {s['gain']:+.4f} "
                f"[{s['ci'][0]:+.4f}, {s['ci'][1]:+.4f}] rmse change {s['rmse'][0]:+.4f}/{s['rmse'][1]:+.4f} "
                f"worse: {', '.join(s['worse']) or 'none'}"
            )
        # the references: plain MAML (maml weight 1, no check) and offset only
        for name, w in (
            ("plain maml", P.Weights(maml=[1.0, 1.0], gate=False)),
            ("offset only", P.Weights(offset=[1.0, 1.0], gate=False)),
        ):
            s = score_test(test, w)
            print(
                f"  {name:26s} test gain {s['gain']:+.4f} [{s['ci'][0]:+.4f}, {s['ci'][1]:+.4f}] "
                f"rmse change {s['rmse'][0]:+.4f}/{s['rmse'][1]:+.4f} worse: {', '.join(s['worse']) or 'none'}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("dump", "compare"))
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument(
        "--set", nargs="*", default=[], help="evaluation-time overrides for dump (e.g. meta.inner_steps=10)"
    )
    ap.add_argument("--tag", default="", help="suffix of the parts files (one per set of overrides)")
    args = ap.parse_args()
    if args.what == "dump":
        import torch

        torch.set_num_threads(1)
        for run in args.runs:
            if (run / "study" / f"parts{args.tag}-test.npz").exists():
                print(f"{run}: already dumped", flush=True)
                continue
            dump(run, args.set, args.tag)
    else:
        compare(args.runs, args.tag)


if __name__ == "__main__":
    main()

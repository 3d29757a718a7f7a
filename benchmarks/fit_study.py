"""How a listener-blind model's fit evolves during training, against the ridge probe and the consensus ceiling.

A development tool for "a generic model that tracks real music emotion" (the table rows are made
by ``run.py reproduce``). It trains EXPERIMENT (``dmer`` or ``pdmer``; the same training step as
``run.py train``) and, before the first step and every ``--every`` outer steps, scores the
generic model on every validation listener (no adaptation, no checkpoint selection):

- ``val``: mean over validation listeners of the mean over their curves (every curve they rated)
  of RMSE and PCC per dimension and mean CCC, for the model, the ridge probe and the training
  listeners' mean curve of the piece (``consensus``: a listener-blind model that knew the training
  listeners' average of every piece exactly; under a listener split the pieces are known, so this
  is the ceiling such a model can reach);
- ``train fit``: the same metrics of the model and the probe against the training listeners' mean
  curve of a fixed sample of training pieces, the target ``train.target=consensus`` trains on.
  A model that learns the known pieces moves far from the probe here; one that only learns what
  the descriptor predicts linearly stays near it.

    python benchmarks/fit_study.py dmer.vgmidi.dsaml --iterations 600 --every 150
    python benchmarks/fit_study.py dmer.vgmidi.dsaml --iterations 450 --every 150 \\
        train.outer_lr=0.003 model.dropout=0.0

Writes ``benchmarks/results/fit/<experiment>-<config hash>.json`` (``--out`` to change the folder) (every row) and prints each row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdmer.checkpoint import atomic_write_text  # noqa: E402
from pdmer.config import config_hash, load_config  # noqa: E402
from pdmer.data.types import Curve  # noqa: E402
from pdmer.evaluation.inference import predict_curve  # noqa: E402
from pdmer.metrics import song_metrics  # noqa: E402
from pdmer.runs import git_info  # noqa: E402
from pdmer.training.context import build_context, references, seed_everything  # noqa: E402
from pdmer.training.loop import outer_step, training_parts  # noqa: E402

KEYS = ("rmse_arousal", "rmse_valence", "pcc_arousal", "pcc_valence", "ccc_mean")
OUT = Path(__file__).resolve().parent / "results" / "fit"
TRAIN_SAMPLE = 60  # training pieces whose consensus fit is scored


def score(predict, groups: list[list[Curve]]) -> dict[str, float]:
    """Mean over groups (listeners) of the mean over each group's curves of :data:`KEYS` (NaN PCCs skipped)."""
    rows = []
    for curves in groups:
        ms = [song_metrics(p, q.values) for q in curves if (p := predict(q)) is not None]
        if ms:
            rows.append([np.nanmean([m[k] for m in ms]) for k in KEYS])
    return dict(zip(KEYS, np.nanmean(np.array(rows), axis=0).tolist(), strict=True))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("experiment")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    ap.add_argument("--iterations", type=int, default=600)
    ap.add_argument("--every", type=int, default=150)
    ap.add_argument("--out", type=Path, default=OUT, help=f"folder for the JSON record (default {OUT})")
    args = ap.parse_args(argv)
    cfg = load_config(
        args.experiment,
        ["runtime.progress=false", f"train.iterations={args.iterations}", *args.overrides],
    )
    git = git_info()  # the code that trains (HEAD may move while it runs)
    seed_everything(cfg.train.seed)
    ctx = build_context(cfg)
    model, sampler, optimizer, loss_fn = training_parts(ctx)
    ridge, consensus = references(ctx).ridge, sampler.consensus
    if ridge is None:
        raise SystemExit(f"{args.experiment}: no ridge probe (no training curves with features)")
    by_listener: dict[str, list[Curve]] = {}
    for c in ctx.dataset.curves:
        if c.song_id in ctx.features:
            by_listener.setdefault(c.annotator_id, []).append(c)
    val = [by_listener[a] for a in ctx.splits["val"] if a in by_listener]
    pieces = sorted(consensus)
    rng = np.random.default_rng(0)
    fit = [[consensus[s]] for s in rng.choice(pieces, min(TRAIN_SAMPLE, len(pieces)), replace=False)]

    def of_consensus(q: Curve):
        m = consensus.get(q.song_id)
        a, b = q.start_step - (m.start_step if m else 0), q.end_step - (m.start_step if m else 0)
        return None if m is None or a < 0 or b > len(m.values) else m.values[a:b]

    def of_ridge(q: Curve):
        return ridge(ctx.features[q.song_id], q)

    def of_model(q: Curve):
        with torch.no_grad():
            return predict_curve(model, ctx.features[q.song_id], q, cfg.train.seq_len, cfg.eval.hop)

    rows = []

    def emit(what: str, it: int | None, d: dict) -> None:
        rows.append({"what": what, "iteration": it, **d})
        at = "" if it is None else f" at {it}"
        print(f"{what}{at}: " + " ".join(f"{k} {v:.4f}" for k, v in d.items()), flush=True)

    emit("val consensus", None, score(of_consensus, val))
    emit("val ridge", None, score(of_ridge, val))
    emit("train fit ridge", None, score(of_ridge, fit))
    t0 = time.time()
    for it in range(args.iterations + 1):
        if it:
            model.train()
            outer_step(model, optimizer, sampler, loss_fn, cfg, it)
        if it % args.every == 0 or it == args.iterations:
            model.eval()
            emit("val model", it, score(of_model, val))
            emit("train fit model", it, score(of_model, fit))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{cfg.name}-{config_hash(cfg)}.json"
    record = {
        "experiment": cfg.name,
        "overrides": args.overrides,
        "iterations": args.iterations,
        "val_listeners": len(val),
        "train_pieces_scored": len(fit),
        "seconds": time.time() - t0,
        "git": git,
        "rows": rows,
    }
    atomic_write_text(path, json.dumps(record, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

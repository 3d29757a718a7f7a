"""Score a run's validation or test listeners, choose the safe rule's weights, write the results.

:func:`evaluate_split` runs the protocol (:mod:`pdmer.evaluation.protocol`) over one split;
:func:`choose_rule` chooses the safe rule's population weights on the validation listeners;
:func:`evaluate_and_report` scores the test listeners once and writes ``results.json``,
``results.md``, ``curves.png`` and ``personalization.json``; :func:`evaluate_run` does it again
for a finished run (``python run.py evaluate RUN``), keeping the earlier results under ``history/``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from torch import nn

from pdmer.checkpoint import atomic_write_text, load_weights
from pdmer.config import config_hash
from pdmer.data.loading import MIN_QUERY_STEPS, role_curves
from pdmer.data.types import DataError
from pdmer.evaluation.protocol import Adaptation, ListenerResult, apply_weights, evaluate_listener, evaluate_within_song
from pdmer.evaluation.report import format_table, paired_gains, plot_listener, summarize
from pdmer.models.dsaml import channels_last_cnn
from pdmer.personalize import COMPONENTS, RULE_DRAWS, Parts, Weights, choose_weights
from pdmer.runs import code_info
from pdmer.training.context import (
    Context,
    build_context,
    build_model,
    make_loss_fn,
    references,
    response_basis,
    selection_metric,
)

log = logging.getLogger(__name__)


RULE_FILE = "personalization.json"  # the safe rule's weights chosen on validation listeners (calibrate uses them)
REPORT_FILES = (RULE_FILE, "results.json", "results.md", "curves.png")  # what evaluate_and_report writes
HISTORY_DIR = "history"


def evaluate_split(
    model: nn.Module,
    ctx: Context,
    split: str,
    limit: int | None = None,
    keep_curves: bool = False,
    weights: Weights | None = None,
    protocol: str | None = None,
    draw: int = 0,
    generic: dict | None = None,
) -> tuple[dict, list[ListenerResult]]:
    """Score every listener of ``split`` (at most ``limit``); see :mod:`pdmer.evaluation.protocol`.

    Listener split: each listener's support song(s) and queries are among all their songs.
    Song split: support from their train songs, queries on the split's songs only.
    ``protocol`` (default: ``eval.protocol`` for test, ``songs`` otherwise) ``within_song``: support =
    the first ``train.seq_len`` steps of each query song, query = the rest of it.

    ``weights``: the safe rule's population weights for the ``personalized`` condition; None
    chooses them on these same listeners (:func:`pdmer.personalize.choose_weights`; in-sample, for
    the checkpoint selection during training).

    ``draw`` (songs protocol): which support draw of each listener (:func:`pdmer.evaluation.protocol.choose_support`;
    0 = the protocol's); listeners who rated too few songs for it are left out.

    ``generic``: the generic curves predicted so far with this model's weights (shared by calls
    on the same weights, :class:`pdmer.evaluation.protocol.Adaptation`); None: kept for this call only.
    """
    with channels_last_cnn(model):  # faster on the CPU; the same weights
        return _evaluate_split(model, ctx, split, limit, keep_curves, weights, protocol, draw, generic)


def _evaluate_split(model, ctx, split, limit, keep_curves, weights, protocol, draw, generic):
    cfg = ctx.cfg
    protocol = protocol or (cfg.eval.protocol if split == "test" else "songs")
    listeners = ctx.splits[split][:limit] if limit else ctx.splits[split]
    pools = role_curves(ctx.dataset, listeners, ctx.songs, split)
    how = Adaptation(
        make_loss_fn(cfg),
        cfg.meta.inner_steps,
        cfg.meta.inner_lr,
        cfg.train.seq_len,
        cfg.eval.hop,
        cfg.eval.support_songs,
        cfg.train.seed,
        MIN_QUERY_STEPS,
        cfg.eval.safe_check,
        draw,
        response_basis(ctx),
        {} if generic is None else generic,
    )
    refs = references(ctx)
    k, results = cfg.eval.support_songs, []
    for a in listeners:
        pool, queries = pools[a]
        if protocol == "within_song":
            r = evaluate_within_song(
                model, ctx.dataset, ctx.features, a, pool if queries is None else queries, how, keep_curves, refs
            )
            if r is not None:
                results.append(r)
        elif (
            (len(pool) > k and len(pool) >= k * (draw + 1))
            if queries is None
            else (len(pool) >= k * (draw + 1) and queries)
        ):
            results.append(
                evaluate_listener(model, ctx.dataset, ctx.features, a, pool, how, keep_curves, queries, refs)
            )
    if not results:
        raise DataError(f"no {split} listener can be scored (split {ctx.split_record()['kind']}, protocol {protocol})")
    if weights is None:
        weights, _ = choose_weights(
            [p for r in results for p in r.parts], f"{split} listeners (in-sample)", use_gate=cfg.eval.safe_check
        )
    apply_weights(results, weights, keep_curves)
    return summarize(results), results


def rule_parts(model: nn.Module, ctx: Context, generic: dict | None = None) -> tuple[list[Parts], str]:
    """What the safe rule is chosen on: every validation listener under the test protocol.

    Songs protocol: each listener is scored with up to ``RULE_DRAWS`` different support songs in
    turn (the protocol's draw first), so that their vote does not hang on one song's luck; the
    choice averages a listener's draws (:func:`pdmer.personalize.by_listener`).

    ``generic``: see :func:`evaluate_split` (the draws share one in any case).

    Returns:
        (parts, what they are, for the report).
    """
    protocol = ctx.cfg.eval.protocol
    generic = {} if generic is None else generic
    try:
        _, results = evaluate_split(model, ctx, "val", weights=Weights(), protocol=protocol, generic=generic)
    except DataError as e:  # e.g. DEAM's validation clips are no longer than one support sequence
        if protocol == "songs":
            raise
        log.warning("safe personalization: %s; the weights are chosen under the songs protocol instead", e)
        protocol = f"songs (no validation listener can be scored {protocol})"
        _, results = evaluate_split(model, ctx, "val", weights=Weights(), protocol="songs", generic=generic)
    listeners = len(results)
    parts = [p for r in results for p in r.parts]
    draws = 1
    if protocol == "songs":
        for draw in range(1, RULE_DRAWS):
            try:
                _, more = evaluate_split(
                    model, ctx, "val", weights=Weights(), protocol="songs", draw=draw, generic=generic
                )
            except DataError:  # no validation listener rated enough songs for another draw
                break
            parts += [p for r in more for p in r.parts]
            draws += 1
    what = f"{listeners} validation listeners, protocol {protocol}"
    return parts, what + (f", up to {draws} support draws each ({len(parts)} in all)" if draws > 1 else "")


def choose_rule(model: nn.Module, ctx: Context, generic: dict | None = None) -> tuple[Weights, dict]:
    """The safe rule's population weights, chosen on every validation listener under the test protocol."""
    parts, what = rule_parts(model, ctx, generic)
    weights, report = choose_weights(parts, what, use_gate=ctx.cfg.eval.safe_check)
    log.info("safe personalization: weights %s (%s)", {k: getattr(weights, k) for k in COMPONENTS}, weights.chosen_on)
    return weights, report


def evaluate_and_report(model, ctx: Context, run: Path, writer=None, **extra) -> dict:
    """Score test listeners once, write results.json / results.md / curves.png."""
    cfg = ctx.cfg
    t0 = time.time()
    generic: dict = {}  # the generic curves, predicted once for the choice and the test alike
    weights, rule_report = choose_rule(model, ctx, generic)
    atomic_write_text(
        run / RULE_FILE,
        json.dumps(
            {"weights": weights.to_json(), "response": response_basis(ctx).to_json(), "report": rule_report},
            indent=2,
            default=float,
        ),
    )
    test, per_listener = evaluate_split(model, ctx, "test", keep_curves=True, weights=weights, generic=generic)
    cond, metric = selection_metric(cfg)
    results = {
        "experiment": cfg.name,
        "config_hash": config_hash(cfg),
        "problem": cfg.problem,
        "data": ctx.dataset.name,
        "label_scale": ctx.dataset.scale,
        "curves_cut_to_audio": ctx.dataset.info.get("fitted_to_audio", 0),
        "selection": {"split": "val", "condition": cond, "metric": metric},
        "listeners": {k: len(v) for k, v in ctx.splits.items()},
        "split": {
            "kind": ctx.split_record()["kind"],
            "protocol": cfg.eval.protocol,
            **({"songs": {k: len(v) for k, v in ctx.songs.items()}} if ctx.songs is not None else {}),
        },
        "support_songs": cfg.eval.support_songs,
        "test": test,
        "gain_ccc_mean": test["personalized"]["ccc_mean"] - test["generic"]["ccc_mean"],
        "gain_per_listener": paired_gains(per_listener)["ccc_mean"],
        "personalization": {
            "weights": weights.to_json(),
            "report": rule_report,
            "listeners_personalized": sum(
                any(u[d] and any(weights.of(d)) for u in r.use for d in range(2)) for r in per_listener
            ),
        },
        "paired": {
            **{c: paired_gains(per_listener, c) for c in ("personalized", "maml", "offset")},
            # the safe rule against the offset-only baseline (issue: within a song it should be at least as good)
            "personalized-offset": paired_gains(per_listener, "personalized", "offset"),
        },
        "per_listener": {
            r.listener: {
                "support": r.support,
                "use": r.use,
                **{c: {s: m for s, m in r.per_song[c].items()} for c in ("generic", "personalized", "maml")},
            }
            for r in per_listener
        },
        "eval_seconds": time.time() - t0,
        "evaluated_at": code_info(),  # a finished run re-evaluated later (run.py evaluate) differs from run.json's
        **extra,
    }
    if writer is not None:
        for c, m in test.items():
            for k in ("ccc_mean", "ccc_arousal", "ccc_valence"):
                writer.add_scalar(f"test/{c}_{k}", m[k], 0)
    atomic_write_text(run / "results.json", json.dumps(results, indent=2, default=float))
    if cfg.eval.protocol == "within_song":
        how = f"support: the first {cfg.train.seq_len} steps of each test song, query: the rest"
    else:
        how = f"one-shot ({cfg.eval.support_songs} support song)"
    songs = f", {len(ctx.songs['test'])} test songs" if ctx.songs is not None else ""
    table = format_table(
        test,
        f"{cfg.name}: test listeners ({results['listeners']['test']}{songs}), {how}; labels on the "
        f"{ctx.dataset.scale} scale",
    )
    atomic_write_text(run / "results.md", table + "\n")
    if cfg.eval.plot and per_listener:
        r = max(per_listener, key=lambda r: len(r.per_song["personalized"]))
        plot_listener(r, run / "curves.png")
    return results


def evaluate_run(run: Path, split: str = "test") -> dict:
    """Re-evaluate a finished run's best checkpoint (``python run.py evaluate RUN_DIR``)."""
    from pdmer.runs import load_run_config

    cfg = load_run_config(run)
    ctx = build_context(cfg)
    model = build_model(ctx, fit_skip=False)  # its weights are loaded next
    load_weights(Path(run) / "checkpoints" / "best.safetensors", model, {"config_hash": config_hash(cfg)})
    if split == "test":
        keep_history(Path(run))
        return evaluate_and_report(model, ctx, Path(run))
    summary, _ = evaluate_split(model, ctx, split)
    return {"experiment": cfg.name, split: summary}


def keep_history(run: Path) -> Path | None:
    """Copy the run's current evaluation files into ``history/<n>-<evaluation commit>/`` before a re-evaluation.

    An evaluation with a rule that is later reverted then never loses the earlier numbers, and
    rule changes can be compared on the same weights. Copies, not moves: the current files stay
    in place until the new evaluation replaces each one (atomically), so an interrupted
    re-evaluation leaves a complete set. Returns the history folder, or None when there was
    nothing to keep.
    """
    import shutil

    present = [run / f for f in REPORT_FILES if (run / f).is_file()]
    if not present:
        return None
    commit = "unknown"
    try:
        commit = (json.loads((run / "results.json").read_text()).get("evaluated_at") or {}).get("commit") or commit
    except (OSError, ValueError, AttributeError):
        pass
    root = run / HISTORY_DIR
    n = 1 + max((int(d.name.split("-")[0]) for d in root.glob("*-*") if d.name.split("-")[0].isdigit()), default=0)
    dest = root / f"{n:03d}-{str(commit)[:7]}"
    dest.mkdir(parents=True)
    for f in present:
        shutil.copy2(f, dest / f.name)
    log.info("kept the earlier evaluation of %s in %s", run.name, dest)
    return dest

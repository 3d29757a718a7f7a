"""Which per-step features the safe rule's ``response`` component could be fitted on, side by side.

The ``response`` component (:mod:`pdmer.response`) fits, on one support sequence, a ridge
regression of a listener's residual on a few per-step features of the music and adds its
prediction on another song. How much it can gain depends on those features. This script scores
several designs on the same listeners and support draws (the protocol of
``benchmarks/response_study.py``: the base curve is the leave-one-out average of the other
listeners, which needs no model; support = the first 30 s of one song; queries = the listener's
other songs, or the rest of that song under ``--protocol within``):

- ``spectra``: the step's mean log-Mel spectrum on its first 4 principal axes (pdmer's design
  before session 22);
- ``learned directions``: pdmer's design now (:meth:`pdmer.response.ResponseBasis.learn`): per
  dimension, 8 directions among the first 32 principal axes of two views of the step's spectrum
  (the mean log-Mel and the log of the mean Mel power), meta-trained on the training listeners so
  that a ridge response fitted on one song predicts another song (zero where held-out training
  listeners say nothing carries over);
- ``spectra + flux``: the same and the step's spectral flux (mean positive change between frames,
  a note-density cue);
- ``learned personal axes``: per dimension, the 2 directions (among the spectra's first 32
  principal axes) along which the training listeners' own responses carry over between two of
  their songs (the top eigenvectors of the cross-song moment of their per-song ridge responses);
- ``musical descriptors``: three classic cues of music emotion per step, from the step's mean Mel
  power: loudness (ln of the total power), brightness (ln of the share of power in the bands above
  3 kHz) and pitch height (the power-weighted mean of log2 of the band centres from 60 Hz to
  1.1 kHz, where the fundamentals of melody and bass lie), whitened over the training songs;
- ``network embedding``: the run's local branch (CNN and projection, the checkpoint's weights) per
  step, on its first 4 principal axes;
- ``true factors`` (the embedded benchmark only): the six factor curves the songs were rendered
  from. No audio feature has them; the row says what perfect features would allow.

Every design is smoothed and lagged as pdmer's (``TAU_STEPS``, ``LAGS``), unit variance over the
training songs, ridge ``LAMBDA``; axes and embeddings are fitted on the training listeners and
songs; the listeners scored are the run's validation and test listeners. Each row gives the mean
change of mean CCC and RMSE from the base (95 % intervals over listeners), at the response's
weight 1 and 1.5 (the ends of the safe rule's grid without and with the shrinkage undone,
``pdmer.personalize.RESPONSE_GRID``), and the paired CCC difference from ``spectra``
at the same weight.

    python benchmarks/response_designs.py runs/pdmer.synthetic.dsaml-4e1ccfde \\
        --out benchmarks/results/response/designs-synthetic.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from response_study import SUPPORT, Z95, tasks  # noqa: E402

from pdmer import response as R  # noqa: E402
from pdmer.features.descriptor import mel_centres  # noqa: E402
from pdmer.metrics import song_metrics  # noqa: E402
from pdmer.references import OthersAverage  # noqa: E402

N_PCA = 32  # principal axes the learned personal axes are sought among
K_DIRS = 2  # learned personal axes per dimension
DIR_LAMBDA = 0.3  # ridge of the per-song responses the axes are estimated from
WEIGHTS = (1.0, 1.5)
BRIGHT_HZ = 3000.0  # brightness: the share of power above this
PITCH_HZ = (60.0, 1100.0)  # pitch height: the bands between these


def _pca(feats: dict[str, np.ndarray], songs: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, axes (k, d)) of the training steps, each axis scaled to unit variance: pdmer's response
    basis (:meth:`pdmer.response.ResponseBasis.fit`), fitted on any per-step features."""
    basis = R.ResponseBasis.fit([feats[t] for t in songs], k=k)
    return basis.mean, basis.axes


def _flux(local) -> np.ndarray:
    """(T, frames, mels) log-Mel patches -> (T, 1) mean positive change between consecutive frames."""
    x = local.float().numpy()
    return np.maximum(np.diff(x, axis=1), 0.0).mean((1, 2))[:, None].astype(np.float64)


def _descriptors(local, centres: np.ndarray) -> np.ndarray:
    """(T, frames, mels) log-Mel patches -> (T, 3) loudness, brightness and pitch height per step."""
    p = np.exp(local.float().numpy().astype(np.float64)).mean(1)  # (T, mels) mean power
    total = p.sum(1) + 1e-12
    high = centres > BRIGHT_HZ
    low = (centres > PITCH_HZ[0]) & (centres < PITCH_HZ[1])
    pl = p[:, low]
    pitch = (pl * np.log2(centres[low])).sum(1) / (pl.sum(1) + 1e-12)
    return np.stack([np.log(total), np.log(p[:, high].sum(1) + 1e-12) - np.log(total), pitch], 1)


def _carried_axes(z: dict[str, np.ndarray], curves: list, protocol: str) -> list[np.ndarray]:
    """Per dimension, the ``K_DIRS`` directions of ``z``'s columns along which responses carry over.

    A curve's residual is its ratings minus the other (training) listeners' mean on its steps
    (:class:`pdmer.references.OthersAverage`; a curve with a step no other listener rated is left out).
    """
    curves = [c for c in curves if c.song_id in z]
    others = OthersAverage(curves)
    groups: dict[str, list[np.ndarray]] = {}
    for c in curves:
        base = others(c.annotator_id, c)
        steps = min(c.n_steps, len(z[c.song_id]) - c.start_step)  # steps with features
        if base is None or steps < 4 * R.MIN_SUPPORT_STEPS:
            continue
        resid = (c.values - base)[:steps].astype(np.float64)
        x = z[c.song_id][c.start_step : c.start_step + steps]
        if protocol == "within":
            h = steps // 2
            groups[f"{c.annotator_id}/{c.song_id}"] = [
                R.fit(x[:h], resid[:h], DIR_LAMBDA),
                R.fit(x[h:], resid[h:], DIR_LAMBDA),
            ]
        else:
            groups.setdefault(c.annotator_id, []).append(R.fit(x, resid, DIR_LAMBDA))
    n = next(iter(z.values())).shape[1]
    moment, pairs = np.zeros((2, n, n)), 0
    for bs in groups.values():
        if len(bs) < 2:
            continue
        b = np.stack(bs)  # (m, n, 2)
        tot = b.sum(0)
        for d in range(2):
            moment[d] += np.outer(tot[:, d], tot[:, d]) - b[:, :, d].T @ b[:, :, d]
        pairs += len(bs) * (len(bs) - 1)
    if pairs == 0:
        raise SystemExit("no training listener has two songs (or two halves) to learn personal axes from")
    out = []
    for d in range(2):
        w, v = np.linalg.eigh(moment[d] / pairs)
        out.append(v[:, np.argsort(w)[::-1][:K_DIRS]])  # (n, K_DIRS)
    return out


def designs(ctx, model, protocol: str) -> dict[str, tuple[dict, dict]]:
    """Design name -> (arousal designs, valence designs), each song id -> (T, P)."""
    import torch

    songs = sorted({c.song_id for c in ctx.dataset.curves if c.song_id in ctx.features})
    train_curves = [c for cs in ctx.train_curves().values() for c in cs if c.song_id in ctx.features]
    train = sorted({c.song_id for c in train_curves})
    spectra = {s: R.step_spectra(ctx.features[s].local) for s in songs}
    out = {}

    def shared(feats: dict[str, np.ndarray], k: int) -> tuple[dict, dict]:
        mean, axes = _pca(feats, train, k)
        d = {s: R.lagged((feats[s] - mean) @ axes.T) for s in songs}
        return d, d

    out["spectra"] = shared(spectra, R.K)
    basis = R.ResponseBasis.learn(
        {c.song_id: ctx.features[c.song_id].local for c in train_curves},
        train_curves,
        "within_song" if protocol == "within" else "songs",
        ctx.cfg.train.seed,
    )
    learned = {s: basis.design(ctx.features[s].local) for s in songs}  # (T, 2, P)
    out["learned directions"] = tuple({s: learned[s][:, d] for s in songs} for d in range(2))
    mean, axes = _pca(spectra, train, R.K)
    flux = {s: _flux(ctx.features[s].local) for s in songs}
    fm, fs = np.concatenate([flux[s] for s in train]).mean(0), np.concatenate([flux[s] for s in train]).std(0)
    with_flux = {s: np.concatenate([(spectra[s] - mean) @ axes.T, (flux[s] - fm) / (fs + 1e-9)], 1) for s in songs}
    out["spectra + flux"] = shared(with_flux, with_flux[songs[0]].shape[1])

    mean, axes = _pca(spectra, train, N_PCA)
    z = {s: R._smooth((spectra[s] - mean) @ axes.T, R.TAU_STEPS) for s in songs}
    per_dim = []
    for u in _carried_axes(z, train_curves, protocol):
        zs = np.concatenate([z[s] @ u for s in train])
        sd = np.where(zs.std(0) > 1e-9, zs.std(0), 1.0)
        per_dim.append({s: R.lagged(z[s] @ u / sd, tau=0) for s in songs})  # z is smoothed already
    out["learned personal axes"] = tuple(per_dim)

    centres = mel_centres(ctx.cfg.features)
    out["musical descriptors"] = shared({s: _descriptors(ctx.features[s].local, centres) for s in songs}, 3)

    emb = {}
    with torch.no_grad():
        for s in songs:
            x = (ctx.features[s].local.float() - model.local_mean) / model.local_std
            emb[s] = model.local_proj(model.cnn(x)).double().numpy()  # (T, H)
    out["network embedding"] = shared(emb, R.K)

    if ctx.cfg.data.source == "synthetic":
        from pdmer.data.synthetic import default_root

        root = Path(ctx.cfg.data.root) if ctx.cfg.data.root else default_root(ctx.cfg.data.synthetic)
        factors = np.load(root / "factors.npz")
        true = {s: factors[s].astype(np.float64)[: len(spectra[s])] for s in songs}
        out["true factors"] = shared(true, true[songs[0]].shape[1])
    return out


def score(ctx, protocol: str, all_designs: dict) -> dict:
    """(design, weight) -> per-listener (CCC mean change, RMSE arousal change, RMSE valence change)."""
    others = OthersAverage(ctx.dataset.curves)
    listeners = set(ctx.splits.get("val", [])) | set(ctx.splits.get("test", []))
    rows = {(name, w): [] for name in all_designs for w in WEIGHTS}
    for sup, queries in tasks(ctx, protocol, 0, listeners):
        base_s = others(sup.annotator_id, sup)
        bases = [(q, others(q.annotator_id, q)) for q in queries]
        bases = [(q, b) for q, b in bases if b is not None]
        if base_s is None or not bases:
            continue
        for name, dims in all_designs.items():
            betas = [
                R.fit(R.span(dims[d][sup.song_id], sup.start_step, sup.end_step), (sup.values - base_s)[:, d : d + 1])
                for d in range(2)
            ]
            resp = []
            for q, _ in bases:
                spans = [R.span(dims[d][q.song_id], q.start_step, q.end_step) for d in range(2)]
                resp.append(np.concatenate([R.curve(spans[d], betas[d]) for d in range(2)], 1))
            for w in WEIGHTS:
                ch = []
                for (q, b), r in zip(bases, resp):
                    m0 = song_metrics(b.astype(np.float32), q.values)
                    m1 = song_metrics((b + w * r).astype(np.float32), q.values)
                    ch.append([m1[k] - m0[k] for k in ("ccc_mean", "rmse_arousal", "rmse_valence")])
                rows[name, w].append(np.nanmean(ch, 0))
    return {k: np.array(v) for k, v in rows.items()}


def report(rows: dict, head: str) -> str:
    def ci(v: np.ndarray) -> str:
        m, se = v.mean(), v.std(ddof=1) / np.sqrt(len(v))
        return f"{m:+.4f} [{m - Z95 * se:+.4f}, {m + Z95 * se:+.4f}]"

    lines = [
        head,
        "",
        "| design | weight | CCC mean change | RMSE arousal change | RMSE valence change | CCC against `spectra` |",
        "|---|---|---|---|---|---|",
    ]
    for (name, w), v in rows.items():
        ref = rows["spectra", w]
        diff = "" if name == "spectra" else ci(v[:, 0] - ref[:, 0])
        lines.append(f"| {name} | {w:g} | {ci(v[:, 0])} | {ci(v[:, 1])} | {ci(v[:, 2])} | {diff} |")
    return "\n".join(lines)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a trained run folder (its config, split and checkpoint)")
    ap.add_argument("--protocol", choices=("across", "within"), default="across")
    ap.add_argument("--out", type=Path, help="also write the table (markdown) here")
    args = ap.parse_args(argv)

    from pdmer.checkpoint import load_weights
    from pdmer.config import config_hash
    from pdmer.runs import load_run_config
    from pdmer.training.context import build_context, build_model

    cfg = load_run_config(args.run)
    ctx = build_context(cfg)
    model = build_model(ctx, fit_skip=False)
    load_weights(args.run / "checkpoints" / "best.safetensors", model, {"config_hash": config_hash(cfg)})
    model.eval()
    rows = score(ctx, args.protocol, designs(ctx, model, args.protocol))
    n = len(rows["spectra", WEIGHTS[0]])
    cmd = "python benchmarks/response_designs.py " + " ".join(argv if argv is not None else sys.argv[1:])
    head = (
        f"{cfg.name} ({args.run.name}), protocol {args.protocol}, {n} validation and test listeners, support "
        f"{SUPPORT} steps, base: the others' average; generated by `{cmd}`"
    )
    text = report(rows, head)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()

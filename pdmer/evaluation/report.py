"""What evaluation reports: per-condition summaries, paired per-listener gains with bootstrap intervals, tables, plots."""

from __future__ import annotations

import numpy as np

from pdmer.evaluation.protocol import CONDITIONS, ListenerResult
from pdmer.metrics import average


def summarize(results: list[ListenerResult]) -> dict[str, dict[str, float]]:
    """Average metrics per condition over every (listener, query song)."""
    out = {}
    for cond in CONDITIONS:
        songs = [m for r in results for m in r.per_song[cond].values()]
        if songs:
            out[cond] = average(songs)
    return out


PAIRED_METRICS = (
    "ccc_mean",
    "ccc_arousal",
    "ccc_valence",
    "pcc_arousal",
    "pcc_valence",
    "rmse_arousal",
    "rmse_valence",
)


def listener_means(results: list[ListenerResult], cond: str, base: str, metric: str) -> np.ndarray:
    """Per listener: mean over their query songs of ``cond - base`` in ``metric`` (both finite)."""
    out = []
    for r in results:
        c, b = r.per_song.get(cond, {}), r.per_song.get(base, {})
        diffs = [
            c[s][metric] - b[s][metric] for s in b if s in c and np.isfinite(c[s][metric]) and np.isfinite(b[s][metric])
        ]
        if diffs:
            out.append(float(np.mean(diffs)))
    return np.asarray(out)


def paired_gain(
    results: list[ListenerResult],
    metric: str = "ccc_mean",
    cond: str = "personalized",
    base: str = "generic",
    n_boot: int = 10000,
    seed: int = 0,
) -> dict:
    """``cond`` minus ``base``, per listener (mean over their query songs), then over listeners.

    The listener is the unit of the bootstrap (query songs of one listener are not independent);
    the 95 % interval is ``scipy.stats.bootstrap``'s percentile interval of the mean. For RMSE a
    negative difference is an improvement ("better" counts those listeners).

    Returns:
        {"metric", "mean", "ci95": [lo, hi], "listeners_improved", "listeners_worse", "listeners"};
        empty when undefined.
    """
    return gain_summary(listener_means(results, cond, base, metric), metric, n_boot, seed)


def gain_summary(gains: np.ndarray, metric: str, n_boot: int = 10000, seed: int = 0) -> dict:
    """:func:`paired_gain`'s summary of per-listener differences ``gains`` (empty: {})."""
    from scipy.stats import bootstrap

    gains = np.asarray(gains, dtype=float)
    if len(gains) == 0:
        return {}
    sign = -1 if metric.startswith("rmse") else 1
    if len(gains) > 1 and np.ptp(gains) > 0:
        ci = bootstrap(
            (gains,), np.mean, n_resamples=n_boot, method="percentile", rng=np.random.default_rng(seed)
        ).confidence_interval
        lo, hi = float(ci.low), float(ci.high)
    else:
        lo = hi = float(gains.mean())
    return {
        "metric": metric,
        "mean": float(gains.mean()),
        "ci95": [lo, hi],
        "listeners_improved": int((sign * gains > 0).sum()),
        "listeners_worse": int((sign * gains < 0).sum()),
        "listeners": int(len(gains)),
    }


def paired_gains(results: list[ListenerResult], cond: str = "personalized", base: str = "generic") -> dict[str, dict]:
    """:func:`paired_gain` for every metric of ``PAIRED_METRICS``."""
    return {m: paired_gain(results, m, cond, base) for m in PAIRED_METRICS}


def format_table(summary: dict[str, dict[str, float]], title: str = "") -> str:
    """A Markdown table: one row per condition."""
    cols = ["ccc_mean", "ccc_arousal", "ccc_valence", "pcc_arousal", "pcc_valence", "rmse_arousal", "rmse_valence"]
    head = "| condition | " + " | ".join(c.replace("_", " ") for c in cols) + " | songs |"
    lines = [f"**{title}**", ""] if title else []
    lines += [head, "|" + "---|" * (len(cols) + 2)]
    for cond, m in summary.items():
        cells = " | ".join(f"{m[c]:.3f}" for c in cols)
        lines.append(f"| {cond} | {cells} | {m['n_songs']} |")
    return "\n".join(lines)


def plot_listener(result: ListenerResult, path, song_id: str | None = None) -> str:
    """PNG of one listener's query song: ratings, generic, personalized (and oracle)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    song_id = song_id or sorted(result.curves["ratings"])[0]
    ratings = result.curves["ratings"][song_id]
    t = np.arange(len(ratings)) * 0.5
    fig, axes = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True)
    styles = {
        "ratings": ("k", "-", 1.6),
        "generic": ("tab:blue", "-", 1.2),
        "personalized": ("tab:red", "-", 1.4),
        "oracle": ("tab:green", "--", 1.0),
    }
    for c, label in enumerate(("arousal", "valence")):
        ax = axes[c]
        for cond, (color, ls, lw) in styles.items():
            curves = result.curves.get(cond, {})
            if song_id in curves:
                ax.plot(t, curves[song_id][:, c], color=color, ls=ls, lw=lw, label=cond)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_title(f"listener {result.listener}, query song {song_id} (support: {', '.join(result.support)})")
    axes[1].set_xlabel("seconds from the first rating")
    axes[0].legend(loc="upper right", fontsize=8, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return song_id

"""What calibrate and predict write besides the profile: the fit plot, prediction CSVs and plots."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from pdmer.data.types import LABELS, Curve
from pdmer.io import atomic_write_text

if TYPE_CHECKING:
    from pdmer.personal.prediction import SongPrediction

log = logging.getLogger(__name__)


def _plot_fit(path: Path, curves: list[Curve], generic: dict, personal: dict, fit: dict, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = curves[:4]
    fig, axes = plt.subplots(len(shown), 2, figsize=(11, 2.8 * len(shown) + 0.4), squeeze=False)
    for i, c in enumerate(shown):
        t = c.times
        for j, label in enumerate(LABELS):
            ax = axes[i, j]
            ax.plot(t, c.values[:, j], color="k", lw=1.6, label=f"{name}'s ratings")
            ax.plot(t, generic[c.song_id][:, j], color="tab:blue", lw=1.2, label="generic")
            ax.plot(t, personal[c.song_id][:, j], color="tab:red", lw=1.4, label="personal (calibrated)")
            m = fit["per_song"][c.song_id]
            ax.set_title(
                f"{c.song_id}: {label}  CCC generic {m['generic'][f'ccc_{label}']:.2f}, personal {m['personalized'][f'ccc_{label}']:.2f}",
                fontsize=9,
            )
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[i, 0].set_xlabel("time in the song (s)")
        axes[i, 1].set_xlabel("time in the song (s)")
    axes[0, 0].legend(loc="best", fontsize=8)
    more = f" (first 4 of {len(curves)} songs)" if len(curves) > 4 else ""
    fig.suptitle(f"calibration of {name!r}: fit on the support song(s){more}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _write_prediction_csv(path: Path, p: SongPrediction) -> None:
    a, v = LABELS.index("arousal"), LABELS.index("valence")
    cols = ["time_s", "valence", "arousal"] + (["generic_valence", "generic_arousal"] if p.personal is not None else [])
    lines = [",".join(cols)]
    cur = p.curve
    for i, t in enumerate(p.times):
        row = [f"{t:.1f}", f"{cur[i, v]:.4f}", f"{cur[i, a]:.4f}"]
        if p.personal is not None:
            row += [f"{p.generic[i, v]:.4f}", f"{p.generic[i, a]:.4f}"]
        lines.append(",".join(row))
    atomic_write_text(path, "\n".join(lines) + "\n")


def _plot_prediction(path: Path, p: SongPrediction) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, v = LABELS.index("arousal"), LABELS.index("valence")
    curves = [("generic", p.generic, "tab:blue")] + (
        [(f"personal ({p.name})", p.personal, "tab:red")] if p.personal is not None else []
    )
    n = len(curves)
    fig = plt.figure(figsize=(4.2 * n + 6.5, 4.6))
    grid = fig.add_gridspec(2, n + 1, width_ratios=[1] * n + [1.7])
    for i, (label, c, color) in enumerate(curves):
        ax = fig.add_subplot(grid[:, i])
        ax.plot(c[:, v], c[:, a], color=color, lw=0.6, alpha=0.5)
        sc = ax.scatter(c[:, v], c[:, a], c=p.times, cmap="viridis", s=7, zorder=3)
        ax.plot(c[0, v], c[0, a], "o", mfc="none", mec="k", ms=8, label="start")
        ax.axhline(0, color="0.7", lw=0.8)
        ax.axvline(0, color="0.7", lw=0.8)
        ax.set_xlim(-1, 1)
        ax.set_ylim(-1, 1)
        ax.set_aspect("equal")
        ax.set_xlabel("valence")
        if i == 0:
            ax.set_ylabel("arousal")
        ax.set_title(label, color=color, fontsize=10)
        ax.legend(loc="lower right", fontsize=7)
    fig.colorbar(sc, ax=fig.axes[:n], shrink=0.8, label="time (s)")
    for row, (j, label) in enumerate(((a, "arousal"), (v, "valence"))):
        ax = fig.add_subplot(grid[row, n])
        for name, c, color in curves:
            ax.plot(p.times, c[:, j], color=color, lw=1.2, label=name)
        ax.set_ylabel(label)
        ax.set_ylim(-1, 1)
        ax.grid(alpha=0.3)
        if row == 0:
            ax.legend(loc="upper right", fontsize=7)
        else:
            ax.set_xlabel("time (s)")
    who = f" for {p.name}" if p.name else ""
    fig.suptitle(f"{p.song_id}{who} (model {p.model.name if p.model else '?'})", fontsize=10)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)

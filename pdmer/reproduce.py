"""Reproductions over seeds and the experiments table (``python run.py reproduce`` / ``tables``).

A reproduction trains and evaluates one experiment once per training seed (``train.seed``; the
data, its split and the support songs stay fixed), then writes
``runs/reproduce/<experiment>-<hash>/table.md`` and ``table.json``: every test metric's mean and
standard deviation (sample std, ddof=1) over the seeds. Each seed is an ordinary run folder, so a
finished seed is never trained again and ``resume=True`` continues an interrupted one from its
last training state.

``write_experiments_readme`` regenerates ``experiments/README.md`` from those ``table.json``
files: one row per experiment file, "not run yet" where there is no reproduction of the
experiment's own config (no numbers are ever typed by hand).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pdmer import paths
from pdmer.config import EXPERIMENTS_DIR, ConfigError, ExperimentConfig, config_hash, load_config
from pdmer.io import atomic_write_text
from pdmer.runs import REPO, git_info, run_dir_for

log = logging.getLogger(__name__)

DEFAULT_SEEDS = (0, 1, 2)
METRICS = ("ccc_mean", "ccc_arousal", "ccc_valence", "pcc_arousal", "pcc_valence", "rmse_arousal", "rmse_valence")
ROW_CONDITIONS = ("generic", "personalized", "maml", "offset", "others", "ridge")  # the columns of the summary table
CONDITION_ORDER = (*ROW_CONDITIONS, "consensus", "oracle")  # the rows of a full table (others after, by name)


def base_hash(cfg: ExperimentConfig) -> str:
    """The config hash of an experiment with its training seed left out (seed 0 stands for any)."""
    return config_hash(replace(cfg, train=replace(cfg.train, seed=0)))


def reproduction_dir(cfg: ExperimentConfig, seeds: list[int]) -> Path:
    key = json.dumps({"config": base_hash(cfg), "seeds": sorted(seeds)}, sort_keys=True).encode()
    out = run_dir_for(cfg).parent / "reproduce"
    return out / f"{cfg.name}-{hashlib.sha1(key).hexdigest()[:8]}"


def mean_std(values: list[float]) -> dict:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    return {
        "mean": float(v.mean()) if len(v) else float("nan"),
        "std": float(v.std(ddof=1)) if len(v) > 1 else float("nan"),
        "n": int(len(v)),
        "values": [float(x) for x in values],
    }


def aggregate(results: dict[int, dict]) -> dict:
    """{condition: {metric: mean_std}} over seeds, for the conditions every seed reports."""
    per_seed = [r["test"] for r in results.values()]
    conditions = [c for c in per_seed[0] if all(c in t for t in per_seed)]
    table = {c: {m: mean_std([t[c][m] for t in per_seed]) for m in METRICS if m in per_seed[0][c]} for c in conditions}
    gain = mean_std([r["gain_ccc_mean"] for r in results.values()])
    return {"test": table, "gain_ccc_mean": gain, "paired": aggregate_paired(results)}


# A paired difference this small is float error, not a difference: the curves are float32 (machine
# epsilon 1.2e-7), so an offset's PCC differs from the generic one's by about 1e-8 (the tables show
# three decimals)
ROUNDING = 1e-6


def aggregate_paired(results: dict[int, dict]) -> dict:
    """Per condition compared with generic and per metric: the per-listener paired gains over seeds.

    ``mean``: mean ± std over seeds of each seed's mean per-listener difference; ``ci95``: each
    seed's 95 % bootstrap interval; ``worse_seeds``: the seeds whose interval lies wholly on the
    bad side (below 0 for CCC / PCC, above 0 for RMSE); ``better_seeds`` likewise on the good side.
    An interval within ``ROUNDING`` of 0 is 0 (two curves that differ by rounding alone: an offset
    or a scale leaves the PCC as it was, up to float error).
    """
    out: dict = {}
    per_seed = {s: r.get("paired") or {} for s, r in results.items()}
    conditions = set.intersection(*(set(p) for p in per_seed.values())) if per_seed else set()
    for cond in sorted(conditions):
        out[cond] = {}
        for metric in METRICS:
            gains = {s: p[cond].get(metric) for s, p in per_seed.items()}
            if not all(gains.values()):
                continue
            lower_is_better = metric.startswith("rmse")

            def above(g: dict) -> bool:
                return g["ci95"][0] > ROUNDING

            def below(g: dict) -> bool:
                return g["ci95"][1] < -ROUNDING

            worse, better = (above, below) if lower_is_better else (below, above)
            out[cond][metric] = {
                "mean": mean_std([g["mean"] for g in gains.values()]),
                "ci95": {str(s): g["ci95"] for s, g in gains.items()},
                "worse_seeds": [s for s, g in gains.items() if worse(g)],
                "better_seeds": [s for s, g in gains.items() if better(g)],
            }
    return out


def worse_metrics(table: dict, cond: str = "personalized") -> list[str]:
    """The metrics on which some seed's paired CI of ``cond`` minus generic lies wholly on the bad side."""
    return [m for m, g in (table.get("paired") or {}).get(cond, {}).items() if g["worse_seeds"]]


def format_cell(s: dict) -> str:
    if not np.isfinite(s["mean"]):
        return "n/a"
    return f"{s['mean']:.3f} ± {s['std']:.3f}" if np.isfinite(s["std"]) else f"{s['mean']:.3f}"


def _condition_rank(cond: str) -> tuple[int, str]:
    return (CONDITION_ORDER.index(cond) if cond in CONDITION_ORDER else len(CONDITION_ORDER), cond)


def format_reproduction(table: dict) -> str:
    """Markdown: one row per condition, mean ± std over seeds of every metric."""
    seeds = ", ".join(str(s) for s in table["seeds"])
    over = " ".join(table.get("overrides") or [])
    lines = [
        f"**{table['experiment']}**: test metrics, mean ± std (ddof=1) over seeds {seeds}; "
        f"{table['date']}, trained at commit {short_commit(table)}" + (f"; overrides `{over}`" if over else ""),
        "",
        *_metrics_header("condition"),
    ]
    for cond in sorted(table["test"], key=_condition_rank):  # a published table's keys are sorted
        m = table["test"][cond]
        lines.append(f"| {cond} | " + " | ".join(format_cell(m[k]) if k in m else "" for k in METRICS) + " |")
    lines += ["", f"personalization gain (personalized - generic, mean CCC): {format_cell(table['gain_ccc_mean'])}"]
    paired = table.get("paired") or {}
    if paired:
        lines += [
            "",
            "Paired per-listener differences from generic (mean ± std over seeds of each seed's mean; "
            "95 % bootstrap CIs over listeners per seed; ✗ = a seed's CI lies wholly on the bad side, "
            "✓ = wholly on the good side); `personalized-offset` is the safe rule's difference from the "
            "offset-only baseline instead:",
            "",
            *_metrics_header("condition"),
        ]
        lines += [f"| {cond} | " + " | ".join(_paired_cells(by_metric)) + " |" for cond, by_metric in paired.items()]
    return "\n".join(lines)


def _metrics_header(first: str, *last: str) -> list[str]:
    """A Markdown table's header and rule: ``first``, one column per metric of ``METRICS``, then ``last``."""
    cols = [first, *(m.replace("_", " ") for m in METRICS), *last]
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]


def _paired_cells(by_metric: dict) -> list[str]:
    """Per metric of ``METRICS``: mean ± std over seeds, ✗ / ✓, and each seed's interval."""
    cells = []
    for m in METRICS:
        g = by_metric.get(m)
        if g is None:
            cells.append("")
            continue
        cis = "; ".join(f"[{lo:+.3f}, {hi:+.3f}]" for lo, hi in g["ci95"].values())
        mark = " ✗" * bool(g["worse_seeds"]) or " ✓" * (len(g["better_seeds"]) == len(g["ci95"]))
        cells.append(f"{format_cell(g['mean'])}{mark} ({cis})")
    return cells


COMPARISONS = (  # (experiment, reference): their generic models, paired per test listener and seed
    ("pdmer.vgmidi.dsaml", "dmer.vgmidi.dsaml"),
    ("pdmer.synthetic.dsaml", "dmer.synthetic.dsaml"),
)


def compare_generic(table: dict, reference: dict) -> dict:
    """The generic model of ``table`` minus that of ``reference``, per test listener, as
    :func:`aggregate_paired` reports a condition (mean over seeds, each seed's bootstrap interval,
    the seeds wholly on either side), from the published per-listener metrics of both.

    Only the seeds both have, and per seed the listeners scored on the same support and query songs
    in both (one split and one support draw per seed: all of them where the two share data and split).
    """
    from pdmer.evaluation.report import gain_summary

    a, b = table.get("generic_per_listener") or {}, reference.get("generic_per_listener") or {}
    per_seed, listeners = {}, {}
    for seed in sorted(set(a) & set(b), key=int):
        same = [w for w in a[seed] if w in b[seed] and a[seed][w]["support"] == b[seed][w]["support"]]
        listeners[seed] = len(same)
        per_seed[seed] = {"paired": {"generic": {}}}
        for m in METRICS:
            diffs = []
            for w in same:
                sa, sb = a[seed][w]["songs"], b[seed][w]["songs"]
                d = [sa[s][m] - sb[s][m] for s in sa if s in sb and np.isfinite(sa[s][m]) and np.isfinite(sb[s][m])]
                if d:
                    diffs.append(float(np.mean(d)))
            per_seed[seed]["paired"]["generic"][m] = gain_summary(np.array(diffs), m)
    if not per_seed:
        return {}
    return {"by_metric": aggregate_paired(per_seed).get("generic", {}), "listeners": listeners}


def comparisons_section(tables: dict[str, dict]) -> list[str]:
    """Markdown lines: each of ``COMPARISONS`` whose two tables carry per-listener metrics."""
    lines = []
    for name, ref in COMPARISONS:
        t = tables.get(f"{name}\0{base_hash(load_config(name))}")
        r = tables.get(f"{ref}\0{base_hash(load_config(ref))}")
        c = compare_generic(t, r) if t is not None and r is not None else {}
        if not c:
            continue
        n = ", ".join(f"seed {s}: {k}" for s, k in c["listeners"].items())
        lines += [
            f"| `{name}` − `{ref}` | " + " | ".join(_paired_cells(c["by_metric"])) + f" | {n} |",
        ]
    if not lines:
        return []
    return [
        "## Generic against generic",
        "",
        "The generic (listener-blind) models of two experiments on the same test listeners, paired per listener "
        "and seed: mean ± std over seeds of each seed's mean difference (first minus second), each seed's 95 % "
        "bootstrap CI over listeners; ✗ = a seed's CI lies wholly on the first model's bad side, ✓ = every seed's "
        "wholly on its good side.",
        "",
        *_metrics_header("models", "listeners"),
        *lines,
        "",
    ]


def _commit(git: dict | None) -> str:
    git = git or {}
    if not git.get("commit"):
        return "unknown"
    return git["commit"][:7] + (" (uncommitted changes)" if git.get("dirty") else "")


def short_commit(table: dict) -> str:
    """The commit(s) the seeds were trained at, e.g. ``085bab3`` or ``085bab3 (seeds 0, 1); cc87c3b (seed 2)``.

    A finished seed is reused by later reproductions, so the seeds of one table may come from
    different commits; the table says so, and names the commit a seed was evaluated at when it
    was re-evaluated later (``run.py evaluate``).
    """
    trained = table["trained_at"]
    evaluated = table.get("evaluated_at") or {}
    groups: dict[str, list[str]] = {}
    for seed, git in trained.items():
        how = _commit(git)
        ev = evaluated.get(seed)
        if ev is None:
            how += ", evaluation commit not recorded"
        elif _commit(ev) != how:
            how += f", evaluated at {_commit(ev)}"
        groups.setdefault(how, []).append(str(seed))
    if len(groups) == 1:
        return next(iter(groups))
    return "; ".join(f"{c} (seed{'s' if len(s) > 1 else ''} {', '.join(s)})" for c, s in groups.items())


class SeedFailed(RuntimeError):
    """A seed trained in its own process (``jobs > 1``) ended with an error."""


def train_in_parallel(
    experiment: str, cfgs: dict[int, ExperimentConfig], overrides: list[str], resume: bool, jobs: int, logs: Path
) -> None:
    """Train the unfinished seeds, each in its own ``python -m pdmer train`` process, at most ``jobs`` at once.

    Each process is the same ``train`` a sequential reproduction calls, so a seed ends with the
    same metrics either way (for the same ``runtime.threads``). Its output goes to
    ``logs/seed-<S>.log``. Every seed is waited for; then :class:`SeedFailed` names the ones that
    failed and their logs (the others are finished and will be reused).
    """
    import os
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    todo = [s for s, cfg in cfgs.items() if not (run_dir_for(cfg) / "results.json").exists()]
    if not todo:
        return
    threads = next(iter(cfgs.values())).runtime.threads
    cores = os.cpu_count() or 1
    if threads <= 0 or threads * min(jobs, len(todo)) > cores:
        log.warning(
            "%d processes with runtime.threads=%s on %d cores: set runtime.threads to at most %d "
            "(results depend on the thread count, so keep it the same for every seed and row)",
            min(jobs, len(todo)),
            threads or "all",
            cores,
            max(1, cores // min(jobs, len(todo))),
        )
    if Path(experiment).exists():  # a YAML path: the processes run in the repository
        experiment = str(Path(experiment).resolve())
    source = paths.source_root()  # a checkout run without installing: the children import the same code
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(source or ""), os.environ.get("PYTHONPATH")]))}

    def seed_log(s: int) -> Path:
        return logs / f"seed-{s}.log"

    def train_seed(s: int) -> bool:
        cmd = [
            sys.executable,
            "-m",
            "pdmer",
            "train",
            experiment,
            *overrides,
            f"train.seed={s}",
            "runtime.progress=false",
            *(["--resume"] if resume else []),
        ]
        path = seed_log(s)
        with open(path, "a") as f:
            f.write("$ " + " ".join(cmd[1:]) + "\n")
            f.flush()
            log.info("seed %d: training %s in its own process (log %s)", s, run_dir_for(cfgs[s]).name, path)
            code = subprocess.run(cmd, cwd=Path.cwd(), env=env, stdout=f, stderr=subprocess.STDOUT).returncode
        if code == 0 and (run_dir_for(cfgs[s]) / "results.json").exists():
            log.info("seed %d: finished", s)
            return True
        log.error("seed %d: failed (exit %d), see %s", s, code, path)
        return False

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        done = dict(zip(todo, pool.map(train_seed, todo)))
    failed = [s for s, ok in done.items() if not ok]
    if failed:
        lines = []
        for s in sorted(failed):
            tail = seed_log(s).read_text().strip().splitlines()[-1:]
            lines.append(f"seed {s}: {tail[0] if tail else 'no output'} (log: {seed_log(s)})")
        raise SeedFailed(f"{experiment}: {len(failed)} of {len(todo)} seeds failed\n  " + "\n  ".join(lines))


def reproduce(
    experiment: str,
    seeds: list[int] | None = None,
    overrides: list[str] | None = None,
    resume: bool = False,
    jobs: int = 1,
) -> Path:
    """Train and evaluate ``experiment`` once per seed; write table.md / table.json; returns their folder.

    Args:
        seeds: training seeds (``train.seed``), default 0 1 2.
        overrides: dotted overrides for every seed (``train.seed`` is set per seed).
        resume: continue an interrupted seed from its last training state (finished seeds are
            always reused, never trained again).
        jobs: seeds trained at once, each in its own process (:func:`train_in_parallel`); 1
            trains them one after the other in this process. Give each process its share of
            the cores with ``runtime.threads``.
    """
    from pdmer.training import train

    seeds = list(DEFAULT_SEEDS if seeds is None else seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be distinct and non-empty, got {seeds}")
    if jobs < 1:
        raise ConfigError(f"jobs must be >= 1, got {jobs}")
    overrides = [o for o in (overrides or [])]
    if any(o.startswith("train.seed=") for o in overrides):
        raise ConfigError("train.seed is set by --seeds, not as an override")
    cfgs = {s: load_config(experiment, overrides + [f"train.seed={s}"]) for s in seeds}
    out = reproduction_dir(cfgs[seeds[0]], seeds)
    out.mkdir(parents=True, exist_ok=True)
    if jobs > 1:
        train_in_parallel(experiment, cfgs, overrides, resume, jobs, out)
    results, runs, trained = {}, {}, {}
    for s, cfg in cfgs.items():
        run = run_dir_for(cfg)
        if (run / "results.json").exists():
            log.info("seed %d: %s has finished, reusing it", s, run.name)
        else:
            log.info("seed %d: training %s%s", s, run.name, " (resuming)" if resume else "")
            run = train(cfg, resume=resume)
        results[s] = json.loads((run / "results.json").read_text())
        try:
            trained[s] = json.loads((run / "run.json").read_text()).get("git")
        except (OSError, json.JSONDecodeError):
            trained[s] = None
        try:
            runs[s] = str(Path(run).relative_to(REPO))
        except ValueError:  # runtime.out_dir outside the repository
            runs[s] = str(run)
    if len({_commit(g) for g in trained.values()}) > 1:
        log.warning(
            "%s: the seeds were trained at different commits: %s",
            experiment,
            ", ".join(f"seed {s} {_commit(g)}" for s, g in trained.items()),
        )
    cfg0 = cfgs[seeds[0]]
    table = {
        "experiment": cfg0.name,
        "config_hash": base_hash(cfg0),
        "problem": cfg0.problem,
        "data": results[seeds[0]]["data"],
        "overrides": overrides,
        "seeds": seeds,
        "runs": {str(s): r for s, r in runs.items()},
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "git": git_info(),  # where the table was written
        "trained_at": {str(s): g for s, g in trained.items()},  # where each seed was trained (reused seeds may differ)
        # where each seed's test results were computed (a run re-evaluated by `run.py evaluate` differs)
        "evaluated_at": {str(s): results[s].get("evaluated_at") for s in seeds},
        "std": "sample standard deviation over seeds (ddof=1)",
        **aggregate(results),
    }
    atomic_write_text(out / "table.json", json.dumps(table, indent=2, default=float))
    atomic_write_text(out / "table.md", format_reproduction(table) + "\n")
    return out


# --- experiments/README.md -------------------------------------------------------------------

README_HEAD = """# Experiments

One file per table row: `<problem>.<dataset>.<variant>.yaml`. Every file is smoke-run by the
test suite (`tests/test_experiments.py`).

**This file is generated**: `python run.py tables` rewrites it from the `table.json` files that
`python run.py reproduce EXPERIMENT` writes under `runs/reproduce/`, after publishing each of them
into `experiments/results/` (committed: the file regenerates on a machine that has no runs). A
row reads "not run yet" until its reproduction (with the experiment's own config: no overrides
but `runtime.*` ones, which are listed with each full table) has finished; no number here is
typed by hand.

Columns: test-set mean CCC (mean of arousal and valence), mean ± std over training seeds
(`train.seed`; data and split fixed; which songs are the support follows the seed). Conditions (`pdmer/evaluation/protocol.py`):

- **generic**: the trained model, no adaptation. In `pdmer.*` rows it is the meta-trained
  model; in `dmer.*` rows it is the plain-DMER model (the *no-adaptation baseline*).
- **personalized**: the safe personalization rule (`pdmer/personalize.py`): the listener's
  offset, movement scale, MAML adaptation, its shape (the adaptation without its level) and their linear response to the
  music (a ridge fit, on the support song, of their residual on directions of the music learned from the training listeners as those their responses carry over; no level of its own), each weighted by a population weight (0 to 1; the response's up to {response_max}, which undoes some of its ridge's shrinkage) chosen on
  validation listeners under the test protocol, per dimension (each listener scored with up to
  {draws} support songs in turn; only weights that make none of CCC, RMSE, PCC worse on average
  and raise the CCC gain plus RMSE reduction, with an RMSE change below {rmse_margin}, at one-sided
  {level} % bounds over those listeners are eligible, each component only for what it adds; the choice is used only if, chosen by each
  half of the listeners and scored on the other half, it passes the same test; among the nested
  families of rules of at most 1, 2, ... components, the one with the best such score), and, in each dimension where that choice keeps
  it, only where a held-out later part of the support sequence confirms it. In `dmer.*` rows the adapted model is the DMER model
  fine-tuned on the support song.
- **maml**: plain MAML, the model after the inner loop on the listener's support song (in `dmer.*`
  rows: the *DMER model fine-tuned on the support song* baseline, same steps and rate).
- **offset**: the *offset-only personalization* baseline: the generic curve shifted by the
  listener's mean error of the generic model on the support song.
- **others**: the leave-one-out average of the other listeners' curves of the song, and
  **ridge**: a linear probe (ridge regression) of the global descriptor fitted to the training
  listeners' average curves; both listener-blind references.
- First- versus second-order MAML: `pdmer.synthetic.dsaml` (first order) against
  `pdmer.synthetic.second_order`.
"""


def _readme_head() -> str:
    from pdmer.personalize import CHOICE_LEVEL, RESPONSE_GRID, RMSE_MARGIN, RULE_DRAWS

    return (
        README_HEAD.replace("{draws}", str(RULE_DRAWS))
        .replace("{level}", f"{100 * CHOICE_LEVEL:g}")
        .replace("{rmse_margin}", f"{RMSE_MARGIN:g}")
        .replace("{response_max}", f"{max(RESPONSE_GRID):g}")
    )


def describe(path: Path) -> str:
    """The first sentence (or the text before the first list) of an experiment file's leading comment."""
    text = ""
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = f"{text} {line.lstrip('#').strip()}".strip()
        if text.endswith(":") or re.search(r"\.(\s|$)", text):
            break
    m = re.match(r"(.+?\.)(\s|$)", text)
    return (m.group(1) if m else text.rstrip(":") + ".").replace("|", "\\|")


RESULTS_DIR = EXPERIMENTS_DIR / "results"  # the published tables (committed): `run.py tables` copies them here


def find_tables(runs_dir: Path, results_dir: Path | None = None) -> dict[str, dict]:
    """The newest reproduction table of each experiment, by (experiment, config hash without overrides).

    From ``runs_dir/reproduce/*/table.json`` (this machine's reproductions) and the published copies in
    ``results_dir`` (committed, so the tables regenerate on a machine that never ran them).
    """
    found: dict[tuple[str, str], dict] = {}
    paths_ = sorted((runs_dir / "reproduce").glob("*/table.json"))
    if results_dir is not None:
        paths_ += sorted(Path(results_dir).glob("*.json"))
    for p in paths_:
        try:
            t = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        t["_path"] = p
        key = (t.get("experiment"), t.get("config_hash"))
        if key not in found or _newness(t) > _newness(found[key]):
            found[key] = t
    return {f"{name}\0{h}": t for (name, h), t in found.items()}


def _newness(t: dict) -> tuple:
    """Which of two tables of one experiment wins: more seeds, then the later date, then the one written
    here (a reproduction on this machine over its published copy), then the later file."""
    published = t["_path"].name != "table.json"
    return len(t["seeds"]), t["date"], not published, t["_path"].stat().st_mtime


def publish_tables(tables: dict[str, dict], results_dir: Path) -> list[Path]:
    """Copy each of ``tables`` found under ``runs/`` (the newest of its experiment) into ``results_dir``
    (``<experiment>-<hash>.json``), with what the README needs of its run folders (per-seed minutes, the
    generic model's per-listener metrics) added to it; the published files are what the tables
    regenerate from elsewhere."""
    written = []
    for t in tables.values():
        if t["_path"].name != "table.json":  # already a published copy
            continue
        t.setdefault("minutes", _run_minutes(t))  # kept in the table itself too, for the README written next
        t.setdefault("generic_per_listener", _generic_per_listener(t))
        out = {k: v for k, v in t.items() if k != "_path"}
        results_dir.mkdir(parents=True, exist_ok=True)
        dest = results_dir / f"{t['experiment']}-{t['config_hash']}.json"
        atomic_write_text(dest, json.dumps(out, indent=1, default=float, sort_keys=True) + "\n")
        written.append(dest)
    return written


def _generic_per_listener(table: dict) -> dict[str, dict]:
    """Per seed and test listener: the support songs and the generic model's metrics per query song
    (from the seed's results.json; what a paired comparison of two experiments needs)."""
    out: dict[str, dict] = {}
    for seed, run in table["runs"].items():
        try:
            per = json.loads((REPO / run / "results.json").read_text()).get("per_listener") or {}
        except (OSError, json.JSONDecodeError):
            continue
        out[seed] = {
            who: {
                "support": r.get("support", []),
                "songs": {
                    song: {m: v for m, v in metrics.items() if m in METRICS}
                    for song, metrics in (r.get("generic") or {}).items()
                },
            }
            for who, r in per.items()
        }
    return out


def _previous_rows(path: Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    """The measured rows and full tables of an earlier ``experiments/README.md``, by experiment."""
    rows: dict[str, str] = {}
    details: dict[str, list[str]] = {}
    if not path.exists():
        return rows, details
    text = path.read_text()
    for line in text.splitlines():
        m = re.match(r"\| `([^`]+)` \|", line)
        if m and "not run yet" not in line:
            rows[m.group(1)] = line
    full = text.split("\n## Full tables\n", 1)
    if len(full) == 2:
        for block in re.split(r"\n(?=### )", "\n" + full[1]):
            if block.startswith("### "):
                name = block.splitlines()[0][4:].strip()
                details[name] = ["", *block.rstrip("\n").splitlines()]
    return rows, details


KEPT_NOTE = (
    "*Kept from the previous `experiments/README.md`: this table's `table.json` is neither under `runs/reproduce/` "
    "nor in `experiments/results/` here (it was measured on a machine whose runs are gone, before tables were "
    "published); its numbers are the ones generated then.*"
)


def write_experiments_readme(
    runs_dir: Path | None = None, path: Path | None = None, results_dir: Path | None = None
) -> tuple[Path, int, int]:
    """Regenerate ``experiments/README.md``; returns (path, experiments, experiments with results).

    The tables found under ``runs_dir`` are first published into ``results_dir`` (default: ``results/``
    beside ``path``, i.e. ``experiments/results/``, committed), and the README is written from both. An
    experiment with no table in either keeps its measured row of the previous README, marked as kept.
    """
    runs_dir = Path(runs_dir) if runs_dir else REPO / "runs"
    path = Path(path) if path else EXPERIMENTS_DIR / "README.md"
    results_dir = Path(results_dir) if results_dir else path.parent / "results"
    tables = find_tables(runs_dir, results_dir)
    publish_tables(tables, results_dir)
    old_rows, old_details = _previous_rows(path)
    rows, details, measured = [], [], 0
    files = sorted(EXPERIMENTS_DIR.glob("*.yaml"))
    for f in files:
        name = f.stem
        cfg = load_config(name)
        t = tables.get(f"{name}\0{base_hash(cfg)}")
        command = f"`python run.py reproduce {name} --seeds 0 1 2`"
        if t is None and name in old_rows and name in old_details:
            measured += 1
            rows.append(old_rows[name])
            kept = old_details[name]
            details += kept if KEPT_NOTE in "\n".join(kept) else [*kept[:4], "", KEPT_NOTE, *kept[4:]]
            continue
        if t is None:
            data = {"deam": "DEAM", "pmemo": "PMEmo", "generic": "dataset", "vgmidi": "VGMIDI"}.get(cfg.data.source)
            needs = f" (needs the {data} data)" if data else ""
            cells = [f"not run yet{needs}"] + [""] * (len(ROW_CONDITIONS) + 3)
        else:
            measured += 1
            test = t["test"]
            cells = [format_cell(test[c]["ccc_mean"]) if c in test else "n/a" for c in ROW_CONDITIONS]
            worse = worse_metrics(t)
            cells += [
                format_cell(t["gain_ccc_mean"]),
                ", ".join(m.replace("_", " ") for m in worse) or "none",
                str(len(t["seeds"])),
                f"{t['date']}, {short_commit(t)}",
            ]
            rel = t["_path"] if t["_path"].name != "table.json" else t["_path"].parent / "table.md"
            try:
                rel = rel.relative_to(REPO)
            except ValueError:
                pass
            details += ["", f"### {name}", "", f"`{rel}`:", "", format_reproduction(t)]
        rows.append(f"| `{name}` | {describe(f)} | {command} | " + " | ".join(cells) + " |")
    data_note = (
        "DEAM / PMEmo rows need the datasets (see the main README, 'Real datasets'); run the listed "
        "command where they are, then `python run.py tables` fills the row."
    )
    notes = path.parent / "NOTES.md"  # hand-written reading of the table (no numbers are generated from it)
    text = "\n".join(
        [
            _readme_head(),
            "## Table",
            "",
            data_note,
            "",
            "| experiment | what it tests | command | "
            + " | ".join(f"{c} CCC" for c in ROW_CONDITIONS)
            + " | gain | personalized worse than generic on | seeds | measured (date, training commit) |",
            "|" + "---|" * (len(ROW_CONDITIONS) + 7),
            *rows,
            "",
            'gain: personalized minus generic mean CCC, per seed, then mean ± std over seeds. "personalized worse than '
            "generic on\": the metrics (CCC, PCC, RMSE of either dimension) on which some seed's paired per-listener 95 % "
            "CI of personalized minus generic lies wholly on the bad side (the full tables list every CI).",
            "",
            "Regenerate: `python run.py tables`.",
            "",
            *comparisons_section(tables),
            *([notes.read_text().strip()] if notes.exists() else []),
            "",
            "## Full tables",
            *(details or ["", "None yet."]),
            "",
        ]
    )
    atomic_write_text(path, text)
    return path, len(files), measured


# --- the main README's results section -------------------------------------------------------

README_MARK = ("<!-- results: generated by `python run.py tables`; do not edit -->", "<!-- /results -->")
HEADLINE = (  # (experiment, what the row shows), in the order the README lists them
    ("pdmer.synthetic.dsaml", "embedded benchmark, one-shot (README command 1's experiment)"),
    ("pdmer.synthetic_carry0.dsaml", "embedded benchmark, control: nothing carries over between songs"),
    ("dmer.vgmidi.dsaml", "VGMIDI round 1, real listeners: plain DMER (fine-tuned as its adaptation)"),
    ("pdmer.vgmidi.dsaml", "VGMIDI round 1, real listeners: DSAML, one piece as support, the other as query"),
    ("pdmer.vgmidi_within_song.dsaml", "VGMIDI round 1: the first 30 s of a piece as support, its rest as query"),
)
HEADLINE_METRICS = ("ccc_mean", "pcc_arousal", "pcc_valence", "rmse_arousal", "rmse_valence")


def _previous_headline(section: str) -> dict[str, list[str]]:
    """The measured rows of an earlier headline section, by experiment (its first row names it)."""
    blocks: dict[str, list[str]] = {}
    name = None
    for line in section.splitlines():
        m = re.match(r"\| `([^`]+)` \|", line)
        if m:
            name = m.group(1)
            blocks[name] = [line]
        elif name and line.startswith("| ") and not line.startswith("| experiment"):
            blocks[name].append(line)
        else:
            name = None
    return blocks


def headline_section(tables: dict[str, dict], previous: str = "") -> str:
    """Markdown of the headline rows (mean ± std over seeds), from the reproductions' tables; an
    experiment with no table keeps its rows of the ``previous`` section."""
    lines = [
        "| experiment | rows | condition | "
        + " | ".join(m.replace("_", " ") for m in HEADLINE_METRICS)
        + " | personalized worse than generic on | seeds, training commit |",
        "|" + "---|" * (len(HEADLINE_METRICS) + 5),
    ]
    missing, kept = [], []
    kept_rows = _previous_headline(previous)
    for name, what in HEADLINE:
        try:
            cfg = load_config(name)
        except ConfigError:
            continue
        t = tables.get(f"{name}\0{base_hash(cfg)}")
        if t is None and name in kept_rows:
            lines += kept_rows[name]
            kept.append(name)
            continue
        if t is None:
            missing.append(name)
            continue
        conds = [c for c in ROW_CONDITIONS if c in t["test"]]
        for i, c in enumerate(conds):
            cells = [format_cell(t["test"][c][m]) if m in t["test"][c] else "" for m in HEADLINE_METRICS]
            first = i == 0
            worse = ", ".join(m.replace("_", " ") for m in worse_metrics(t)) or "none"
            lines.append(
                f"| {'`' + name + '`' if first else ''} | {what if first else ''} | {c} | "
                + " | ".join(cells)
                + f" | {worse if first else ''} | {(str(len(t['seeds'])) + ', ' + short_commit(t)) if first else ''} |"
            )
        gain = (t.get("paired") or {}).get("personalized", {}).get("ccc_mean")
        if gain:
            cis = "; ".join(f"[{lo:+.3f}, {hi:+.3f}]" for lo, hi in gain["ci95"].values())
            lines.append(
                f"| | | *gain, personalized − generic CCC* | {format_cell(gain['mean'])} (per-seed 95 % CIs over "
                f"listeners: {cis}) | | | | | | |"
            )
    if missing:
        lines += [
            "",
            "Not measured yet: "
            + ", ".join(f"`{m}`" for m in missing)
            + " (`python run.py reproduce EXPERIMENT --seeds 0 1 2`, then `python run.py tables`).",
        ]
    if kept:
        lines += [
            "",
            "Kept from the previous version of this section (their tables are not on this machine, nor published in "
            "`experiments/results/`): " + ", ".join(f"`{m}`" for m in kept) + ".",
        ]
    default = tables.get(f"{HEADLINE[0][0]}\0{base_hash(load_config(HEADLINE[0][0]))}")
    if default is not None and (times := _run_minutes(default)):
        lines += [
            "",
            f"Time of `{HEADLINE[0][0]}` per seed (what README command 1 runs after the install: the benchmark's "
            "generation when it is not there yet, features, training, evaluation), as each run measured it: "
            + ", ".join(f"seed {s} {m:.1f} min" for s, m in times.items())
            + f" (`{' '.join(default['overrides']) or 'no overrides'}`; other jobs may have shared the machine).",
        ]
    if (c1 := _command1_figure()) is not None:
        lines += ["", c1]
    return "\n".join(lines)


def _command1_figure() -> str | None:
    """The latest timing of README command 1 in a fresh clone (``benchmarks/command1_time.py``), as a sentence."""
    found = []
    for f in sorted((REPO / "benchmarks" / "results" / "command1").glob("*.json")):
        try:
            d = json.loads(f.read_text())
            found.append((d["date"], d["commit"], d))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    if not found:
        return None
    d = max(found, key=lambda x: x[0])[2]
    lo, hi = d["gain_ci95"]
    dirty = " with uncommitted changes" if d.get("uncommitted_changes") else ""
    return (
        f"README command 1 in a fresh clone (`python benchmarks/command1_time.py`: generation, features, training, "
        f"evaluation; the install not included): {d['minutes']:.1f} min on {d['cores']} cores ({d['date']}, "
        f"{d['commit'][:7]}{dirty}); it printed a gain of {d['gain_ccc_mean']:+.3f} mean CCC "
        f"(95 % CI [{lo:+.3f}, {hi:+.3f}])."
    )


def _run_minutes(table: dict) -> dict[str, float]:
    """Per seed: the run's training plus evaluation time in minutes (its results.json), where recorded
    (a published table keeps them)."""
    if table.get("minutes"):
        return table["minutes"]
    out = {}
    for seed, run in table["runs"].items():
        try:
            r = json.loads((REPO / run / "results.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if "train_seconds" in r:
            out[seed] = (r["train_seconds"] + r.get("eval_seconds", 0.0)) / 60
    return out


CALIBRATION_MARK = ("<!-- calibration: generated by `python run.py tables`; do not edit -->", "<!-- /calibration -->")


def calibration_section() -> str:
    """Markdown: the default benchmark's rater figures beside DEAM 2013's (``pdmer.data.synthetic``)."""
    from pdmer.config import SyntheticConfig
    from pdmer.data.synthetic import REAL_LISTENER_TARGETS, calibration_stats, deam_calibration_stats, simulate

    syn = calibration_stats(simulate(SyntheticConfig()).to_dataset())
    try:
        real = deam_calibration_stats()
    except (OSError, ValueError) as e:  # ../shared/data/deam absent: the benchmark's side only
        real = {}
        log.warning("DEAM figures not computed (%s)", e)

    def pair(d: dict, fig: str) -> str:
        return f"{d[fig]['arousal']:.3f} / {d[fig]['valence']:.3f}" if fig in d else "(DEAM files not found)"

    rows = [
        ("per-frame std across raters", "frame_std"),
        ("spread of averaged curves across songs", "spread"),
        ("std of an averaged curve within a 30 s window", "within"),
    ]
    lines = ["| figure (arousal / valence) | DEAM 2013 | benchmark default |", "|---|---|---|"]
    lines += [f"| {what} | {pair(real, fig)} | {pair(syn, fig)} |" for what, fig in rows]
    lines += [
        f"| listener's mean offset, between-song r | < {REAL_LISTENER_TARGETS['offset_r']:g} (reported) | "
        f"{pair(syn, 'offset_r')} |",
        f"| listener's slider movement, between-song r | about {REAL_LISTENER_TARGETS['slider_r']:g} (reported) | "
        f"{pair(syn, 'slider_r')} |",
    ]
    return "\n".join(lines)


def _write_section(readme: Path, mark: tuple[str, str], body: str) -> bool:
    text = readme.read_text()
    start, end = mark
    if start not in text or end not in text:
        return False
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    atomic_write_text(readme, f"{head}{start}\n{body}\n{end}{tail}")
    return True


def _section(text: str, mark: tuple[str, str]) -> str:
    start, end = mark
    return text.split(start, 1)[1].split(end, 1)[0] if start in text and end in text else ""


def write_readme_results(
    runs_dir: Path | None = None, readme: Path | None = None, results_dir: Path | None = None
) -> bool:
    """Rewrite the main README's generated sections (results between ``README_MARK``, the benchmark's
    calibration between ``CALIBRATION_MARK``); False if it has no results section. The tables come from
    ``runs_dir`` and the published ones in ``results_dir`` (default ``experiments/results/``)."""
    runs_dir = Path(runs_dir) if runs_dir else paths.runs_dir()
    readme = Path(readme) if readme else REPO / "README.md"
    results_dir = Path(results_dir) if results_dir else RESULTS_DIR
    if CALIBRATION_MARK[0] in readme.read_text():
        _write_section(readme, CALIBRATION_MARK, calibration_section())
    previous = _section(readme.read_text(), README_MARK)
    return _write_section(readme, README_MARK, headline_section(find_tables(runs_dir, results_dir), previous))

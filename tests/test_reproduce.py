"""`reproduce` over seeds (mean ± std tables) and the generated experiments/README.md."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_overrides

from pdmer.config import EXPERIMENTS_DIR, load_config
from pdmer.reproduce import base_hash, reproduce, write_experiments_readme

NAME = "pdmer.synthetic.dsaml"


def not_run(readme: str) -> int:
    return sum(line.startswith("| `") and "not run yet" in line for line in readme.splitlines())


@pytest.fixture(scope="module")
def reproduction(session_tmp):
    # one thread in every process: the sequential fixture and the --jobs run must reduce in the same order to
    # give the same floats (torch's default thread count differs between this process and a fresh one)
    ov = tiny_overrides(session_tmp, "reproduce") + [
        "eval.plot=false",
        "runtime.threads=1",
        f"runtime.out_dir={session_tmp / 'runs-reproduce'}",
    ]
    threads = torch.get_num_threads()
    try:
        return reproduce(NAME, [0, 1], ov), ov
    finally:
        torch.set_num_threads(threads)


def test_table_has_mean_and_std_of_every_metric(reproduction):
    out, _ = reproduction
    table = json.loads((out / "table.json").read_text())
    assert table["seeds"] == [0, 1] and table["experiment"] == NAME
    runs = {s: json.loads((Path(r) / "results.json").read_text()) for s, r in table["runs"].items()}
    assert len({r["config_hash"] for r in runs.values()}) == 2  # one run folder per seed
    for cond in ("generic", "personalized", "offset"):
        for metric in ("ccc_arousal", "ccc_valence", "pcc_arousal", "pcc_valence", "rmse_arousal", "rmse_valence"):
            values = [runs[s]["test"][cond][metric] for s in ("0", "1")]
            cell = table["test"][cond][metric]
            assert cell["mean"] == pytest.approx(np.mean(values))
            assert cell["std"] == pytest.approx(np.std(values, ddof=1))
    md = (out / "table.md").read_text()
    assert "| offset |" in md and " ± " in md


def test_reproduce_again_reuses_finished_seeds(reproduction):
    out, ov = reproduction
    table = json.loads((out / "table.json").read_text())
    stamps = {s: (Path(r) / "results.json").stat().st_mtime_ns for s, r in table["runs"].items()}
    assert reproduce(NAME, [0, 1], ov, resume=True) == out
    assert {s: (Path(r) / "results.json").stat().st_mtime_ns for s, r in table["runs"].items()} == stamps


def test_experiments_readme_is_generated_from_the_tables(reproduction, tmp_path):
    out, _ = reproduction
    runs = tmp_path / "runs"
    readme = tmp_path / "README.md"
    # a tiny reproduction has its own config hash: the default experiment's row stays "not run yet"
    shutil.copytree(out, runs / "reproduce" / out.name)
    _, n, measured = write_experiments_readme(runs, readme)
    names = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))
    text = readme.read_text()
    assert n == len(names) and measured == 0
    for name in names:
        assert f"| `{name}` |" in text and f"python run.py reproduce {name}" in text
    assert not_run(text) == len(names)
    # the same table under the experiment's own config hash fills its row, with date and commit
    table = json.loads((out / "table.json").read_text())
    table["config_hash"] = base_hash(load_config(NAME))
    (runs / "reproduce" / out.name / "table.json").write_text(json.dumps(table))
    _, _, measured = write_experiments_readme(runs, readme)
    text = readme.read_text()
    row = next(line for line in text.splitlines() if line.startswith(f"| `{NAME}` |"))
    g = table["test"]["personalized"]["ccc_mean"]
    assert measured == 1 and f"{g['mean']:.3f} ± {g['std']:.3f}" in row and table["date"] in row
    assert not_run(text) == len(names) - 1


def test_cli_seeds_then_overrides(monkeypatch, tmp_path):
    import pdmer.reproduce
    from pdmer.cli import main

    got = {}

    def fake(experiment, seeds, overrides, resume=False, jobs=1):
        got.update(experiment=experiment, seeds=seeds, overrides=overrides, resume=resume, jobs=jobs)
        (tmp_path / "table.md").write_text("table\n")
        return tmp_path

    monkeypatch.setattr(pdmer.reproduce, "reproduce", fake)
    assert (
        main(
            ["reproduce", NAME, "model.hidden=16", "--seeds", "3", "4", "train.iterations=5", "--resume", "--jobs", "2"]
        )
        == 0
    )
    assert got == {
        "experiment": NAME,
        "seeds": [3, 4],
        "overrides": ["model.hidden=16", "train.iterations=5"],
        "resume": True,
        "jobs": 2,
    }
    assert main(["reproduce", NAME, "--seeds", "x"]) == 2


def test_table_has_paired_per_listener_intervals(reproduction):
    """Each seed's paired CI (personalized, maml, offset minus generic) on every metric, and the bad-side seeds."""
    out, _ = reproduction
    table = json.loads((out / "table.json").read_text())
    for cond in ("personalized", "maml", "offset"):
        for metric in ("ccc_mean", "pcc_arousal", "rmse_valence"):
            g = table["paired"][cond][metric]
            assert set(g["ci95"]) == {"0", "1"} and all(lo <= hi for lo, hi in g["ci95"].values())
            assert g["mean"]["n"] == 2
            for s in g["worse_seeds"]:  # a bad-side seed's interval excludes 0 on the bad side
                lo, hi = g["ci95"][str(s)]
                assert (lo > 0) if metric.startswith("rmse") else (hi < 0)
    assert "Paired per-listener differences from generic" in (out / "table.md").read_text()


def test_the_table_names_the_commit_each_seed_was_trained_at(reproduction):
    """A finished seed is reused as it is: a table mixing commits must say which seed came from where."""
    out, ov = reproduction
    table = json.loads((out / "table.json").read_text())
    assert set(table["trained_at"]) == {"0", "1"}
    path = Path(table["runs"]["1"]) / "run.json"
    original = path.read_text()
    try:
        run = json.loads(original)
        run["git"] = {"commit": "f" * 40, "dirty": True}
        path.write_text(json.dumps(run))
        reproduce(NAME, [0, 1], ov)
        table = json.loads((out / "table.json").read_text())
        md = (out / "table.md").read_text()
    finally:
        path.write_text(original)
    assert table["trained_at"]["1"] == {"commit": "f" * 40, "dirty": True}
    # seed 1's results were computed at another commit than its (edited) training one: both are named
    assert "fffffff (uncommitted changes), evaluated at " in md and "(seed 1)" in md and "(seed 0)" in md
    assert (
        table["evaluated_at"]["1"]
        == json.loads((Path(table["runs"]["1"]) / "results.json").read_text())["evaluated_at"]
    )
    reproduce(NAME, [0, 1], ov)
    assert "(seed" not in (out / "table.md").read_text()  # one commit: named once


@pytest.mark.slow
def test_seeds_trained_in_parallel_processes_match_one_process(reproduction, session_tmp):
    """--jobs 2: each seed in its own `run.py train` process, same metrics as the sequential fixture."""
    from pdmer.reproduce import SeedFailed
    from pdmer.runs import lock_run, run_dir_for

    out, ov = reproduction
    ov = [o for o in ov if not o.startswith("runtime.out_dir=")] + [f"runtime.out_dir={session_tmp / 'runs-parallel'}"]
    # a seed whose folder is held by another trainer fails; the others finish and are kept
    with lock_run(run_dir_for(load_config(NAME, ov + ["train.seed=1"]))):
        with pytest.raises(SeedFailed, match=r"1 of 2 seeds failed\n  seed 1: .*being trained by another process"):
            reproduce(NAME, [0, 1], ov, jobs=2)
    parallel = reproduce(NAME, [0, 1], ov, jobs=2)
    assert (parallel / "seed-0.log").exists() and (parallel / "seed-1.log").exists()
    assert "seed-0.log" not in " ".join(p.name for p in out.iterdir())  # the sequential one ran in-process
    a = json.loads((out / "table.json").read_text())
    b = json.loads((parallel / "table.json").read_text())
    assert a["runs"] != b["runs"] and a["test"] == b["test"]


def test_readme_results_section_is_generated_between_its_markers(tmp_path):
    from pdmer.reproduce import README_MARK, write_readme_results

    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{README_MARK[0]}\nstale numbers 0.123\n{README_MARK[1]}\nafter\n")
    assert write_readme_results(tmp_path / "runs", readme, tmp_path / "results")
    text = readme.read_text()
    assert text.startswith("# title\n\nbefore\n") and text.endswith(f"{README_MARK[1]}\nafter\n")
    assert "stale numbers" not in text and "Not measured yet" in text and "`pdmer.vgmidi.dsaml`" in text
    plain = tmp_path / "plain.md"
    plain.write_text("no markers\n")
    assert not write_readme_results(tmp_path / "runs", plain, tmp_path / "results")
    assert plain.read_text() == "no markers\n"


def test_published_tables_regenerate_without_the_runs_and_old_rows_are_kept(reproduction, tmp_path):
    """`tables` publishes each table (with the generic model's per-listener metrics) into results/; with the
    runs gone the README regenerates the same row from it, an experiment with neither keeps its previous
    measured row (marked), and two published tables give a paired generic-against-generic comparison."""
    from pdmer.reproduce import KEPT_NOTE, compare_generic, find_tables, write_readme_results

    out, _ = reproduction
    runs, readme, results = tmp_path / "runs", tmp_path / "README.md", tmp_path / "results"
    table = json.loads((out / "table.json").read_text())
    table["config_hash"] = base_hash(load_config(NAME))
    (runs / "reproduce" / out.name).mkdir(parents=True)
    (runs / "reproduce" / out.name / "table.json").write_text(json.dumps(table))
    write_experiments_readme(runs, readme, results)
    first = readme.read_text()
    published = json.loads((results / f"{NAME}-{table['config_hash']}.json").read_text())
    assert published["test"] == table["test"] and set(published["generic_per_listener"]) == {"0", "1"}
    some = next(iter(published["generic_per_listener"]["0"].values()))
    assert some["support"] and all("ccc_mean" in m for m in some["songs"].values())
    # another experiment's measured row, as an earlier README had it (its table is nowhere here)
    other = "pdmer.synthetic.no_local_branch"
    row = next(line for line in first.splitlines() if line.startswith(f"| `{other}` |"))
    fake = row.replace("not run yet", "0.123 ± 0.004")
    first = first.replace(row, fake) + f"\n### {other}\n\n`runs/reproduce/x/table.md`:\n\n**{other}**: a table\n"
    readme.write_text(first)
    shutil.rmtree(runs)
    write_experiments_readme(runs, readme, results)
    text = readme.read_text()
    ours = next(line for line in text.splitlines() if line.startswith(f"| `{NAME}` |"))
    assert ours == next(line for line in first.splitlines() if line.startswith(f"| `{NAME}` |"))
    assert fake in text and f"**{other}**: a table" in text and text.count(KEPT_NOTE) == 1
    assert f"`{results / (NAME + '-' + table['config_hash'] + '.json')}`:" in text  # where its full table is from

    def full_table(readme_text: str) -> str:  # its full table's rows, in order
        return readme_text.split(f"**{NAME}**: test metrics", 1)[1].split("personalization gain", 1)[0]

    assert full_table(text) == full_table(first)  # the published copy (keys sorted) renders in the same order
    # the same experiment against itself: every paired difference is 0, over the listeners of both seeds
    t = find_tables(runs, results)[f"{NAME}\0{table['config_hash']}"]
    c = compare_generic(t, t)
    assert set(c["listeners"]) == {"0", "1"} and all(k > 0 for k in c["listeners"].values())
    assert all(g["mean"]["mean"] == 0 and not g["worse_seeds"] for g in c["by_metric"].values())
    from pdmer.reproduce import README_MARK

    main = tmp_path / "MAIN.md"
    kept = ["| `pdmer.vgmidi.dsaml` | real listeners | generic | 0.5 | | | | | none | 3, abc |", "|  |  | maml | 0.4 |"]
    main.write_text(f"{README_MARK[0]}\n| experiment | rows |\n|---|---|\n" + "\n".join(kept) + f"\n{README_MARK[1]}\n")
    assert write_readme_results(runs, main, results)
    text = main.read_text()
    g = table["test"]["generic"]["ccc_mean"]
    assert f"| `{NAME}` |" in text and f"{g['mean']:.3f} ± {g['std']:.3f}" in text  # from the published table
    assert "\n".join(kept) in text and "Kept from the previous version of this section" in text


def test_the_readmes_calibration_table_is_the_generated_one():
    """The benchmark's rater figures in README.md come from the code (python run.py tables), not by hand."""
    from pdmer.reproduce import CALIBRATION_MARK, calibration_section

    deam = Path(__file__).resolve().parents[2] / "shared" / "data" / "deam"
    if not deam.exists():
        pytest.skip(f"the DEAM reference figures need {deam}")
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start, end = CALIBRATION_MARK
    assert readme.split(start, 1)[1].split(end, 1)[0].strip() == calibration_section().strip()


def test_an_interval_of_float_error_is_not_a_difference():
    """An offset leaves PCC as it was up to float error: such an interval is neither worse nor better."""
    from pdmer.reproduce import aggregate_paired

    def seed(lo, hi):
        return {"paired": {"personalized": {"pcc_valence": {"mean": (lo + hi) / 2, "ci95": [lo, hi]}}}}

    out = aggregate_paired({0: seed(-3e-17, -1e-18), 1: seed(-0.02, -0.001), 2: seed(1e-18, 2e-17)})
    g = out["personalized"]["pcc_valence"]
    assert g["worse_seeds"] == [1] and g["better_seeds"] == []
    # float32 curves: an offset's PCC interval of a VGMIDI within-song seed (was marked worse)
    out = aggregate_paired({0: seed(-4.9e-8, -1.0e-8), 1: seed(-2e-5, -1e-5), 2: seed(1.0e-8, 4.6e-8)})
    g = out["personalized"]["pcc_valence"]
    assert g["worse_seeds"] == [1] and g["better_seeds"] == []

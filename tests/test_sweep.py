"""Hyperparameter sweeps (pdmer.sweep, ``run.py sweep``): checks before any training, pruning, the
summary and best config, resuming a killed sweep, and two processes sharing one PostgreSQL study."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import tiny_overrides

from pdmer.cli import main
from pdmer.config import load_config
from pdmer.sweep import SWEEPS_DIR, SweepError, load_sweep, open_storage, run_sweep
from pdmer.training.context import build_context

REPO = Path(__file__).resolve().parents[1]
POSTGRES_ENV = "PDMER_TEST_POSTGRES_URL"
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)

# a tiny search space; the median pruner with one completed trial as reference prunes aggressively
TINY_SWEEP = {
    "experiment": "pdmer.synthetic.dsaml",
    "trials": 3,
    "objective": {"metric": "val/personalized_ccc_mean", "direction": "maximize"},
    "sampler": {"name": "tpe", "seed": 0},
    "pruner": {"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
    "params": {
        "meta.inner_lr": {"role": "scientific", "type": "log_float", "low": 1e-4, "high": 0.3},
        "meta.inner_steps": {"role": "scientific", "type": "int", "low": 1, "high": 2},
        "train.outer_lr": {"role": "nuisance", "type": "log_float", "low": 1e-4, "high": 1e-2},
        "train.attention_loss_weight": {"role": "nuisance", "type": "float", "low": 0.0, "high": 2.0},
        "model.dropout": {"role": "nuisance", "type": "categorical", "choices": [0.0, 0.1]},
        "meta.first_order": {"role": "fixed", "value": True},
    },
}


def write_sweep(path: Path, **changes) -> Path:
    spec = json.loads(json.dumps(TINY_SWEEP))
    for k, v in changes.items():
        spec[k] = v
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def tiny(session_tmp) -> list[str]:
    """Tiny overrides for every trial; the data and features are built once here, so trials and
    concurrent sweep processes only read caches."""
    ovs = [o for o in tiny_overrides(session_tmp, "sweep") if not o.startswith("meta.inner_steps")]
    ovs += ["runtime.threads=1", "eval.plot=false"]
    build_context(load_config("pdmer.synthetic.dsaml", ovs))
    return ovs


def sweep_cmd(sweep_file: Path, overrides: list[str], *args: str) -> list[str]:
    return [sys.executable, "run.py", "sweep", str(sweep_file), *overrides, *args]


def load_study(name: str, url: str):
    return optuna.load_study(study_name=name, storage=url)


# --- the sweep files and the checks made before any training ---------------------------------


@pytest.mark.parametrize("path", sorted(SWEEPS_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_sweep_files_are_valid(path):
    sweep = load_sweep(path)
    assert sweep.metric.startswith("val/")
    assert {p.role for p in sweep.params} <= {"scientific", "nuisance", "fixed"} and sweep.searched
    assert sweep.sampler["seed"] is not None


def test_first_sweep_covers_the_issue_parameters():
    sweep = load_sweep("pdmer.synthetic.dsaml")
    types = {p.key: p.type for p in sweep.searched}
    assert types == {
        "meta.inner_lr": "log_float",
        "meta.inner_steps": "int",
        "train.outer_lr": "log_float",
        "train.attention_loss_weight": "float",
    }
    assert (sweep.metric, sweep.direction) == ("val/personalized_ccc_mean", "maximize")
    assert sweep.sampler["name"] == "tpe" and sweep.pruner["name"] == "median"


@pytest.mark.parametrize(
    "change, words",
    [
        ({"trails": 3}, ["unknown key", "'trails'"]),
        (
            {"params": {"meta.inner_lrr": {"role": "scientific", "type": "float", "low": 0.1, "high": 0.2}}},
            ["meta.inner_lrr", "not in the config"],
        ),
        (
            {"params": {"meta.inner_lr": {"role": "scientific", "type": "float", "low": 0.1, "hihg": 0.2}}},
            ["params.meta.inner_lr.", "'hihg'"],
        ),
        (
            {"params": {"meta.inner_lr": {"role": "important", "type": "float", "low": 0.1, "high": 0.2}}},
            ["meta.inner_lr", "role"],
        ),
        (
            {"params": {"meta.inner_steps": {"role": "scientific", "type": "int", "low": 0, "high": 3}}},
            ["meta.inner_steps", "refused"],
        ),
        (
            {"params": {"meta.inner_steps": {"role": "scientific", "type": "float", "low": 1.5, "high": 3}}},
            ["meta.inner_steps", "refused"],
        ),
        (
            {"objective": {"metric": "test/personalized_ccc_mean", "direction": "maximize"}},
            ["test metric", "val/personalized_ccc_mean"],
        ),
        (
            {"objective": {"metric": "val/personalized_ccc", "direction": "maximize"}},
            ["never logged", "val/personalized_ccc_mean"],
        ),
        ({"objective": {"metric": "val/personalized_ccc_mean", "direction": "up"}}, ["objective.direction"]),
        ({"pruner": {"name": "median", "n_warmup_step": 3}}, ["pruner.", "'n_warmup_step'"]),
        ({"sampler": {"name": "grid"}}, ["sampler.name", "tpe"]),
    ],
)
def test_bad_sweep_files_are_errors_naming_the_key(tmp_path, change, words):
    path = write_sweep(tmp_path / "bad.yaml", **change)
    with pytest.raises(SweepError) as e:
        load_sweep(path)
    for w in words:
        assert w in str(e.value)


def test_objective_condition_missing_for_the_data(tmp_path):
    path = write_sweep(tmp_path / "s.yaml", objective={"metric": "val/oracle_ccc_mean", "direction": "maximize"})
    with pytest.raises(SweepError, match="never logged for data.source=pmemo"):
        load_sweep(path, ["data.source=pmemo"])


def test_override_of_a_searched_key_is_an_error(tmp_path):
    with pytest.raises(SweepError, match="meta.inner_lr is searched"):
        load_sweep(write_sweep(tmp_path / "s.yaml"), ["meta.inner_lr=0.1"])


def test_unreachable_storage_fails_before_training(tmp_path, capsys):
    path = write_sweep(tmp_path / "s.yaml")
    ovs = [f"runtime.out_dir={tmp_path / 'runs'}"]
    url = "postgresql+psycopg2://someone:s3cret@127.0.0.1:9/nodb"  # port 9: nothing listens
    t0 = time.time()
    assert main(["sweep", str(path), *ovs, "--storage", url, "--study", "x"]) == 2
    err = capsys.readouterr().err
    assert "cannot open the sweep storage" in err and "127.0.0.1:9" in err and "s3cret" not in err
    assert time.time() - t0 < 30
    assert not (tmp_path / "runs" / "sweeps" / "x" / "trials").exists()  # no trial started
    with pytest.raises(SweepError, match="cannot open the sweep storage"):
        run_sweep(path, storage="sqlite:////nonexistent-dir/sub/study.db", study_name="y", overrides=ovs)
    with pytest.raises(SweepError, match="cannot open the sweep storage"):
        run_sweep(path, storage="nosuchdb://host/db", study_name="z", overrides=ovs)


def test_help_lists_sweep():
    out = subprocess.run(
        [sys.executable, "run.py", "sweep", "--help"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    for word in ("--trials", "--storage", "--study"):
        assert word in out


# --- a tiny sweep end to end ---------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_sweep_prunes_summarizes_and_its_best_config_trains(tiny, session_tmp, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = write_sweep(session_tmp / "tiny_sweep.yaml")
    res = run_sweep(path, trials=4, study_name="tiny", overrides=tiny)
    sweep_dir = res.sweep_dir
    assert sweep_dir == session_tmp / "runs" / "sweeps" / "tiny" and (sweep_dir / "study.db").exists()
    study = load_study("tiny", f"sqlite:///{sweep_dir / 'study.db'}")
    states = [t.state for t in study.trials]
    assert sum(s in FINISHED for s in states) == 4 == len(states)
    assert states.count(optuna.trial.TrialState.PRUNED) >= 1, "the aggressive pruner pruned nothing"
    assert sorted(res.ran) == list(range(4))
    for t in study.trials:
        run = Path(t.user_attrs["run_dir"])
        assert run.parent == sweep_dir / "trials" and f"trial{t.number:04d}" in run.name  # a normal run folder
        assert (run / "config.yaml").exists() and list((run / "tb").glob("events.out.tfevents.*"))
        assert t.intermediate_values  # reported as it trained
        if t.state == optuna.trial.TrialState.PRUNED:
            stopped = json.loads((run / "stopped.json").read_text())
            assert stopped["reason"] == "TrialPruned" and not (run / "results.json").exists()
            assert t.last_step < 2  # stopped early
        else:
            assert (run / "results.json").exists() and not (run / "stopped.json").exists()
            ea = EventAccumulator(str(run / "tb"))
            ea.Reload()
            assert "_hparams_/session_start_info" in ea.PluginTagToContent("hparams")  # tensorboard's HParams view
            assert "best_val/personalized_ccc_mean" in ea.Tags()["scalars"]
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["best"]["trial"] == study.best_trial.number and summary["best"]["value"] == pytest.approx(
        study.best_value
    )
    assert summary["counts"]["complete"] + summary["counts"]["pruned"] == 4
    assert set(summary["params"]["meta.inner_lr"]) >= {"role", "type", "low", "high"}
    md = (sweep_dir / "summary.md").read_text()
    assert "Best trial" in md and "scientific" in md and "nuisance" in md and "fixed" in md
    for png in ("optimization_history.png", "parallel_coordinate.png", "intermediate_values.png"):
        assert (sweep_dir / png).stat().st_size > 1000, png
    assert summary["importances"] is not None or "importances_note" in summary

    # the best configuration is a ready-to-run experiment file: `run.py train best.yaml`
    best = sweep_dir / "best.yaml"
    cfg = load_config(str(best))
    for key, value in study.best_params.items():
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) == value
    assert main(["train", str(best)]) == 0
    out = capsys.readouterr().out
    best_hash = study.best_trial.user_attrs["config_hash"]
    run = session_tmp / "runs" / f"tiny.best-{best_hash}"  # the best trial's exact config
    assert (run / "results.json").exists() and str(run) in out

    # the same command again runs nothing; a larger --trials continues the same study
    again = run_sweep(path, trials=4, study_name="tiny", overrides=tiny)
    assert again.ran == [] and len(load_study("tiny", f"sqlite:///{sweep_dir / 'study.db'}").trials) == 4
    more = run_sweep(path, trials=5, study_name="tiny", overrides=tiny)
    assert more.ran == [4]


@pytest.mark.slow  # resumes the study of the tiny sweep above
def test_resuming_with_another_search_space_is_refused(tiny, session_tmp):
    path = write_sweep(
        session_tmp / "other.yaml",
        params={
            "meta.inner_lr": {"role": "scientific", "type": "log_float", "low": 1e-3, "high": 0.3},
            "meta.inner_steps": {"role": "fixed", "value": 1},
        },
    )
    with pytest.raises(SweepError, match="another params"):
        run_sweep(path, trials=1, study_name="tiny", overrides=tiny)


# --- interrupted sweeps and several processes --------------------------------------------------


def wait_for(predicate, timeout: float, what: str, proc=None) -> None:
    t0 = time.time()
    while not predicate():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the sweep process ended (rc {proc.returncode}) before {what}")
        if time.time() - t0 > timeout:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.slow
def test_killed_sweep_resumes_without_repeating_finished_trials(tiny, session_tmp):
    path = write_sweep(session_tmp / "kill_sweep.yaml")
    name = f"kill-{uuid.uuid4().hex[:6]}"
    sweep_dir = session_tmp / "runs" / "sweeps" / name
    url = f"sqlite:///{sweep_dir / 'study.db'}"
    cmd = sweep_cmd(path, tiny, "--trials", "3", "--study", name)
    log1 = (session_tmp / f"{name}.1.log").open("w")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log1, stderr=subprocess.STDOUT)
    try:  # SIGKILL while trial 1 trains (trial 0 has finished)
        wait_for(lambda: list((sweep_dir / "trials").glob("*.trial0001-*/splits.json")), 180, "trial 1 to start", proc)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        log1.close()
    before = {t.number: t for t in load_study(name, url).trials}
    assert before[0].state == optuna.trial.TrialState.COMPLETE
    assert before[1].state == optuna.trial.TrialState.RUNNING  # left behind by the killed process
    first_results = Path(before[0].user_attrs["run_dir"]) / "results.json"
    mtime = first_results.stat().st_mtime_ns

    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    trials = {t.number: t for t in load_study(name, url).trials}
    finished = [n for n, t in trials.items() if t.state in FINISHED]
    assert len(finished) == 3 and 0 in finished  # the requested number, trial 0 kept
    assert trials[1].state == optuna.trial.TrialState.FAIL and "interrupted" in trials[1].user_attrs["fail_reason"]
    assert sorted(trials) == [0, 1, 2, 3]  # nothing run twice
    assert trials[0].params == before[0].params and trials[0].value == before[0].value
    assert first_results.stat().st_mtime_ns == mtime  # trial 0 was not trained again
    stopped = json.loads((Path(trials[1].user_attrs["run_dir"]) / "stopped.json").read_text())
    assert stopped["reason"] == "interrupted"
    assert len(list((sweep_dir / "trials").iterdir())) == 4
    assert (sweep_dir / "summary.json").exists()
    assert f"{3} of 3 trials finished" in done.stdout


def _postgres_url() -> str:
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        pytest.skip(
            f"no PostgreSQL server: set {POSTGRES_ENV}=postgresql+psycopg2://USER:PASSWORD@127.0.0.1:5432/DB "
            f"(.ci/run does, after .ci/postgres.sh starts a server from Debian's packages)"
        )
    pytest.importorskip("psycopg2", reason="the PostgreSQL driver is missing: pip install psycopg2-binary")
    try:
        open_storage(url)
    except SweepError as e:
        pytest.skip(f"{POSTGRES_ENV} is set but no PostgreSQL server is reachable: {e}")
    return url


def test_two_processes_share_one_postgres_study(request, session_tmp):
    url = _postgres_url()  # skips before the data are built
    tiny = request.getfixturevalue("tiny")
    name = f"pytest-{uuid.uuid4().hex[:8]}"
    path = write_sweep(session_tmp / "pg_sweep.yaml")
    cmd = sweep_cmd(path, tiny, "--trials", "3", "--storage", url, "--study", name)
    logs = [(session_tmp / f"{name}.{i}.log").open("w+") for i in range(2)]
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT) for f in logs]
    try:
        for p in procs:
            p.wait(timeout=300)
        for p, f in zip(procs, logs, strict=True):
            f.seek(0)
            assert p.returncode == 0, f.read()[-3000:]
        trials = load_study(name, url).trials
        finished = [t for t in trials if t.state in FINISHED]
        assert len(finished) == 3  # together, exactly the requested number
        assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
        for t in trials:  # any other trial lost a race for the last slot before training
            if t.state not in FINISHED:
                assert t.user_attrs["fail_reason"].startswith("not run") and not t.params
        assert len({t.user_attrs["process"] for t in finished}) == 2  # both processes ran trials
        assert len({tuple(sorted(t.params.items())) for t in finished}) == 3  # no duplicated draws
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in logs:
            f.close()
        try:
            optuna.delete_study(study_name=name, storage=url)
        except Exception:  # noqa: BLE001 - cleanup only
            pass

"""Every experiments/*.yaml smoke-runs end to end (data, features, training, evaluation)."""

import json

import pytest
import torch
from conftest import tiny_overrides
from official_layouts import official_overrides

from pdmer.config import EXPERIMENTS_DIR, ConfigError, load_config
from pdmer.evaluation import evaluate_run
from pdmer.training import train

EXPERIMENTS = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))


def test_there_are_experiments():
    assert "pdmer.synthetic.dsaml" in EXPERIMENTS


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_smoke_run(name, session_tmp):
    # DEAM / PMEmo experiments run on tiny fixtures written in the official layouts
    ov = tiny_overrides(session_tmp, name) + official_overrides(name, session_tmp)
    # a recipe that pre-trains (train.warmup) does one DMER step, then one meta-step, in the tiny schedule
    if load_config(name, official_overrides(name, session_tmp)).train.warmup:
        ov.append("train.warmup=1")
    cfg = load_config(name, ov)
    run = train(cfg)
    res = json.loads((run / "results.json").read_text())
    assert res["experiment"] == name and res["problem"] == cfg.problem
    conditions = {"deam": ("consensus", "others"), "pmemo": (), "vgmidi": ("others",)}
    for cond in ("generic", "personalized", "maml", "offset", "ridge") + conditions.get(
        cfg.data.source, ("consensus", "oracle", "others")
    ):
        assert res["test"][cond]["n_songs"] > 0, cond
    assert (run / "personalization.json").exists()
    assert set(res["paired"]["personalized"]) >= {"ccc_mean", "rmse_arousal", "pcc_valence"}
    for metric in ("ccc_mean", "rmse_valence"):  # the rule against the offset shift: the two differences from generic
        p, o, po = (res["paired"][c][metric] for c in ("personalized", "offset", "personalized-offset"))
        assert po["mean"] == pytest.approx(p["mean"] - o["mean"], abs=1e-9)
    splits = json.loads((run / "splits.json").read_text())
    if splits["kind"] == "song-disjoint":
        songs = splits["songs"]
        assert not set(songs["train"]) & set(songs["test"]) and not set(songs["val"]) & set(songs["test"])
        assert not set(songs["train"]) & set(songs["val"])
    else:
        assert not set(splits["train"]) & set(splits["test"]) and not set(splits["val"]) & set(splits["test"])
    for name_ in (
        "config.yaml",
        "run.json",
        "checkpoints/best.safetensors",
        "checkpoints/last.safetensors",
        "results.md",
        "curves.png",
    ):
        assert (run / name_).exists(), name_
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert json.loads((run / "run.json").read_text())["config_hash"] in run.name


@pytest.mark.slow
def test_evaluate_command_reproduces_results(session_tmp):
    name = "pdmer.synthetic.dsaml"
    cfg = load_config(name, tiny_overrides(session_tmp, name))
    run = train(cfg)
    first = (run / "results.json").read_bytes()
    before = json.loads(first)["test"]
    after = evaluate_run(run)["test"]
    for cond in before:
        assert after[cond]["ccc_mean"] == pytest.approx(before[cond]["ccc_mean"], abs=1e-6)
    # the earlier evaluation is kept, byte for byte, in history/ (one folder per re-evaluation)
    (kept,) = (run / "history").iterdir()
    assert kept.name.startswith("001-") and (kept / "results.json").read_bytes() == first
    assert {p.name for p in kept.iterdir()} >= {"results.json", "results.md", "personalization.json"}
    evaluate_run(run)
    assert sorted(p.name.split("-")[0] for p in (run / "history").iterdir()) == ["001", "002"]


@pytest.mark.slow
def test_within_song_evaluation_reuses_the_finished_training_twin(session_tmp):
    """Only eval.protocol differs: the weights of the finished songs-protocol run are reused, nothing is trained."""
    from safetensors.torch import load_file

    name = "pdmer.synthetic.dsaml"
    ov = tiny_overrides(session_tmp, "twin") + ["train.seq_len=20", "eval.hop=10"]
    first = train(load_config(name, ov))
    second = train(load_config(name, ov + ["eval.protocol=within_song"]))
    assert second != first
    a, b = load_file(first / "checkpoints" / "best.safetensors"), load_file(second / "checkpoints" / "best.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (
        json.loads((second / "results.json").read_text())["best"]
        == json.loads((first / "results.json").read_text())["best"]
    )
    res = json.loads((second / "results.json").read_text())
    assert res["split"]["protocol"] == "within_song" and res["test"]["personalized"]["n_songs"] > 0


def test_within_song_run_refuses_while_its_twin_is_being_trained(session_tmp):
    """Started while the songs-protocol twin trains, it would silently train the same weights again: refused."""
    from pdmer.runs import RunBusyError, lock_run, run_dir_for
    from pdmer.training.loop import twin_config

    name = "pdmer.synthetic.dsaml"
    ov = tiny_overrides(session_tmp, "twin-busy") + ["train.seq_len=20", "eval.hop=10"]
    cfg = load_config(name, ov + ["eval.protocol=within_song"])
    busy = run_dir_for(twin_config(cfg))
    busy.mkdir(parents=True)
    with lock_run(busy):
        with pytest.raises(RunBusyError, match="being trained by another process"):
            train(cfg)


@pytest.mark.parametrize("problem", ["pdmer", "dmer"])
def test_frozen_skip_path_and_the_start_as_a_selection_candidate(problem, session_tmp):
    """train.skip_lr_scale=0 leaves the skip path at its fitted start while the rest trains;
    train.select_start validates before the first step;
    both enter the hash only when they change something."""
    from pdmer.checkpoint import load_tensors
    from pdmer.config import config_hash
    from pdmer.training.context import build_context, build_model

    ov = tiny_overrides(session_tmp, f"frozen-{problem}") + [f"problem={problem}", "model.linear_skip=true"]
    base = load_config("pdmer.synthetic.dsaml", ov)
    assert config_hash(load_config("pdmer.synthetic.dsaml", ov + ["train.skip_lr_scale=1.0"])) == config_hash(base)
    no_skip = [o for o in ov if o != "model.linear_skip=true"]
    assert config_hash(load_config("pdmer.synthetic.dsaml", no_skip + ["train.skip_lr_scale=0"])) == config_hash(
        load_config("pdmer.synthetic.dsaml", no_skip)
    )
    cfg = load_config("pdmer.synthetic.dsaml", ov + ["train.skip_lr_scale=0", "train.select_start=true"])
    assert config_hash(cfg) != config_hash(base)
    start = build_model(build_context(cfg)).state_dict()
    seen = []
    run = train(cfg, on_validate=lambda it, summary: seen.append(it))
    assert seen == [0, 1, 2]  # the start, then every step (train.eval_every=1)
    last, _ = load_tensors(run / "checkpoints" / "last.safetensors")
    skip = [k for k in start if k.startswith("skip.")]
    assert skip and all(torch.equal(last[k], start[k]) for k in skip)
    trained = [k for k in start if not k.startswith("skip.") and start[k].is_floating_point()]
    assert any(not torch.equal(last[k], start[k]) for k in trained)
    # trained like the rest (the default): the skip path moves
    moved, _ = load_tensors(train(base) / "checkpoints" / "last.safetensors")
    assert any(not torch.equal(moved[k], start[k]) for k in skip)


def test_warmup_steps_are_the_dmer_runs_steps(session_tmp):
    """train.warmup: pdmer's first steps are a DMER run's steps of the same seed (same weights
    after them); meta-training takes over after; the option enters the hash only when on."""
    from pdmer.checkpoint import load_tensors
    from pdmer.config import config_hash

    ov = tiny_overrides(session_tmp, "warmup") + ["model.linear_skip=true", "train.target=consensus"]
    dmer = train(load_config("pdmer.synthetic.dsaml", ov + ["problem=dmer"]))
    warm = load_config("pdmer.synthetic.dsaml", ov + ["train.warmup=2"])
    assert config_hash(warm) != config_hash(load_config("pdmer.synthetic.dsaml", ov))
    assert config_hash(load_config("pdmer.synthetic.dsaml", ov + ["train.warmup=0"])) == config_hash(
        load_config("pdmer.synthetic.dsaml", ov)
    )
    a, _ = load_tensors(dmer / "checkpoints" / "last.safetensors")
    b, _ = load_tensors(train(warm) / "checkpoints" / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # one meta-step after the warm-up moves the weights away from the DMER run's
    c, _ = load_tensors(
        train(load_config("pdmer.synthetic.dsaml", ov + ["train.warmup=2", "train.iterations=3"]))
        / "checkpoints"
        / "last.safetensors"
    )
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


@pytest.mark.parametrize(
    "extra, match",
    [
        (["problem=dmer", "train.warmup=1"], "is for problem=pdmer"),
        (["train.warmup=3"], "must not exceed train.iterations=2"),
        (["train.warmup=-1"], "train.warmup"),
    ],
)
def test_warmup_refuses_what_it_cannot_do(extra, match, session_tmp):
    with pytest.raises(ConfigError, match=match):
        load_config("pdmer.synthetic.dsaml", tiny_overrides(session_tmp, "warmup-bad") + extra)

"""Listener profiles: ``calibrate`` / ``predict`` (pdmer.personal and ``run.py calibrate|predict``).

A tiny DSAML model is meta-trained once per session on a tiny embedded benchmark (conftest's
``calibrated_tiny``, shared with tests/test_batch_calibration.py: 40 iterations, enough for the
machinery); the one test of the gain trains it for 200 iterations on the same benchmark. Its
listeners are *consistent* (carry-over 1 for every personal parameter) and differ by offset, gain,
lag and smoothing only (``weight_scale=0``); the model uses the global branch only (inner learning
rate pinned at 0.05). With the default benchmark
(personal factor weights, carry-over 0.8 / 0.1) a model this small, trained this briefly,
shows no reliable one-shot gain. Here the gain shows in the error (RMSE) averaged over the
8 test listeners' held-out songs; CCC barely moves, because a tiny model's curves hardly
correlate with anyone's ratings, so there is little agreement for a level shift to improve.
The test checks the machinery (profile -> personal curve on other songs), not the paper's number.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import pickle
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import calibration_run
from safetensors import safe_open

from pdmer import personal
from pdmer.checkpoint import save_weights
from pdmer.config import config_hash, from_dict, load_config, to_dict
from pdmer.data.loading import curves_of
from pdmer.data.types import LABELS, DataError
from pdmer.evaluation.protocol import choose_support
from pdmer.io import sha256_file
from pdmer.metrics import average, song_metrics
from pdmer.personal import ProfileError, calibrate, check_name, load_base_model, load_profile, predict

REPO = Path(__file__).resolve().parents[1]
A, V = LABELS.index("arousal"), LABELS.index("valence")


@pytest.fixture(scope="session")
def tiny(calibrated_tiny):
    """A finished tiny run (40 iterations; conftest.calibration_run), its dataset, split and audio."""
    return calibrated_tiny


@pytest.fixture(scope="session")
def base(tiny):
    return tiny.base


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """The same tiny run trained for 200 iterations (the benchmark and its features shared with ``tiny``)."""
    return calibration_run(tmp_path_factory, 200)


def write_ratings(path: Path, curve, layout: str = "single", rate_hz: float = 2.0, annotator: str = "someone") -> Path:
    """A ratings CSV of one curve, at ``rate_hz`` (linear interpolation of the 2 Hz curve)."""
    t = curve.times
    tt = np.round(np.arange(t[0], t[-1] + 1e-9, 1.0 / rate_hz), 6)
    va = np.stack([np.interp(tt, t, curve.values[:, V]), np.interp(tt, t, curve.values[:, A])], axis=1)
    lines = ["time_s,valence,arousal" if layout == "single" else "song_id,annotator_id,time_s,valence,arousal"]
    for ti, (v, a) in zip(tt, va):
        prefix = "" if layout == "single" else f"{curve.song_id},{annotator},"
        lines.append(f"{prefix}{ti:g},{v:.5f},{a:.5f}")
    path.write_text("\n".join(lines) + "\n")
    return path


def song(tiny, sid: str) -> Path:
    return tiny.audio / f"{sid}.wav"


# --------------------------------------------------------------------------------------------
# Calibrate, then predict: the personal curve beats the generic one
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_personal_beats_generic_on_test_listeners(trained, tmp_path):
    """One-shot calibration of each test listener, then whole-song predictions of their other songs."""
    tiny, base = trained, trained.base
    by = curves_of(tiny.ds, tiny.splits["test"])
    per = {"generic": [], "personalized": []}
    rows = []
    for lid, curves in by.items():
        (i,) = choose_support(curves, 1, tiny.cfg.train.seed, lid)  # the evaluation protocol's support song
        sup = curves[i]
        calibrate(
            lid,
            song(tiny, sup.song_id),
            write_ratings(tmp_path / f"{lid}.csv", sup),
            base=base,
            annotators_dir=tmp_path / "ann",
            plot=False,
        )
        queries = [c for j, c in enumerate(curves) if j != i]
        preds = predict(
            [song(tiny, q.song_id) for q in queries], name=lid, base=base, annotators_dir=tmp_path / "ann", write=False
        )
        mine = {"generic": [], "personalized": []}
        for q, p in zip(queries, preds):
            assert p.song_id == q.song_id and p.personal.shape == p.generic.shape == (len(p.times), 2)
            for cond, curve in (("generic", p.generic), ("personalized", p.personal)):
                mine[cond].append(song_metrics(curve[q.start_step : q.end_step], q.values))
        rmse = {c: average(mine[c])["rmse_arousal"] + average(mine[c])["rmse_valence"] for c in mine}
        rows.append((lid, rmse["generic"], rmse["personalized"]))
        for cond in per:
            per[cond] += mine[cond]
    g, p = average(per["generic"]), average(per["personalized"])
    print(
        f"\n{len(by)} test listeners, {g['n_songs']} query songs: CCC mean generic {g['ccc_mean']:.3f} -> personal "
        f"{p['ccc_mean']:.3f}; RMSE a/v generic {g['rmse_arousal']:.3f}/{g['rmse_valence']:.3f} -> personal "
        f"{p['rmse_arousal']:.3f}/{p['rmse_valence']:.3f}; RMSE a+v per listener (generic, personal): "
        + ", ".join(f"{lid} {a:.3f} {b:.3f}" for lid, a, b in rows)
    )
    # the safe rule: personal curves are no worse than generic ones for these listeners (the weights chosen on
    # the run's validation listeners, the held-out check per listener), in the sense the rule promises: no
    # dimension's RMSE worse by more than 0.005 (the validation listeners' means are no worse; these are
    # other listeners), the listeners' paired 95 % interval of the change not wholly on the bad side, no
    # majority of listeners made worse
    from scipy.stats import t as student

    assert p["rmse_arousal"] <= g["rmse_arousal"] + 0.005 and p["rmse_valence"] <= g["rmse_valence"] + 0.005
    change = np.array([b - a for _, a, b in rows])
    if change.std() > 0:
        assert change.mean() - student.ppf(0.975, len(change) - 1) * change.std(ddof=1) / np.sqrt(len(change)) <= 0
    assert sum(b > a + 1e-6 for _, a, b in rows) <= len(rows) / 2


# --------------------------------------------------------------------------------------------
# The profile on disk
# --------------------------------------------------------------------------------------------


def test_calibrate_writes_a_complete_profile(tiny, base, tmp_path):
    lid = tiny.splits["test"][0]
    c = curves_of(tiny.ds, [lid])[lid][0]
    ratings = write_ratings(tmp_path / "r.csv", c, rate_hz=4.0)  # any rate: resampled to 2 Hz
    prof = calibrate("P017", song(tiny, c.song_id), ratings, tiny.run, annotators_dir=tmp_path / "ann")
    d = tmp_path / "ann" / "P017"
    assert prof.path == d
    assert sorted(p.name for p in d.iterdir()) == [
        "MANIFEST.json",
        "fit.png",
        "profile.json",
        "ratings.csv",
        "weights.safetensors",
    ]
    assert (d / "ratings.csv").read_bytes() == ratings.read_bytes()
    assert (d / "fit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    info = json.loads((d / "profile.json").read_text())
    rule = info["personalization"]  # how much it personalized, and why
    assert set(rule["use"]) == {"arousal", "valence"} and rule["summary"] and "weights" in rule
    assert isinstance(rule["personalized"], bool) and len(rule["support"]["offset"]) == 2
    assert info["name"] == "P017" and info["created"]
    assert info["base"]["config_hash"] == config_hash(tiny.cfg) == base.config_hash
    assert info["base"]["features_hash"] == personal.features_hash(tiny.cfg)
    assert info["adaptation"]["inner_steps"] == tiny.cfg.meta.inner_steps
    assert info["adaptation"]["inner_lr"] == tiny.cfg.meta.inner_lr
    assert [s["song_id"] for s in info["songs"]] == [c.song_id]
    assert info["songs"][0]["rated_steps"] == c.n_steps
    assert set(info["fit"]["mean"]) == {"generic", "personalized", "maml"}  # metrics on the support song
    loss = info["adaptation"]["support_loss"]
    assert len(loss) == tiny.cfg.meta.inner_steps and loss[-1] < loss[0]
    with safe_open(str(d / "weights.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["pdmer"])
        names = set(f.keys())
    assert meta["base_config_hash"] == base.config_hash and meta["base_features_hash"] == base.features_hash
    assert names and names <= dict(base.model.named_parameters()).keys()
    loaded = load_profile("P017", tmp_path / "ann", base=base)
    assert loaded.params.keys() == names
    # the 4 Hz file was resampled to the 2 Hz curve it was made from
    curve = personal.read_ratings(ratings, [c.song_id], "P017")[0]
    assert curve.start_step == c.start_step
    np.testing.assert_allclose(curve.values, c.values, atol=1e-4)


def test_k_shot_uses_every_song(tiny, base, tmp_path):
    lid = tiny.splits["test"][1]
    c1, c2 = curves_of(tiny.ds, [lid])[lid][:2]
    r1 = write_ratings(tmp_path / "a.csv", c1, layout="generic", annotator=lid)
    r2 = write_ratings(tmp_path / "b.csv", c2, layout="generic", annotator=lid)
    both = tmp_path / "both.csv"
    both.write_text(r1.read_text() + "".join(r2.read_text().splitlines(True)[1:]))
    prof = calibrate(
        "two", [song(tiny, c1.song_id), song(tiny, c2.song_id)], both, base=base, annotators_dir=tmp_path, plot=False
    )
    assert [s["song_id"] for s in prof.info["songs"]] == [c1.song_id, c2.song_id]
    assert prof.info["adaptation"]["support_windows"] == 2
    assert prof.info["ratings"]["annotator_id"] == lid
    one = calibrate("one", song(tiny, c1.song_id), r1, base=base, annotators_dir=tmp_path, plot=False)
    assert any(not torch.equal(prof.params[k], one.params[k]) for k in prof.params)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("short", r"rated over 8\.0 s only .* at least 10 s"),
        ("nan", r"valence='nan' is not finite"),
        ("range", r"arousal=1\.5 is outside \[-1\.05, 1\.05\]"),
        ("beyond", r"go beyond the audio:\n  - .*clip_000\.wav: audio is 45\.0 s .* rated until 50\.0 s"),
        ("columns", r"header is 'time,valence,arousal'"),
        ("two_listeners", r"ratings of 2 annotators \(A1, A2\)"),
        ("other_song", r"song 'clip_999' is rated but no audio was given"),
        ("decreasing", r"time_s=15\.0 is not after time_s=16\.0"),
    ],
)
def test_bad_ratings_are_clear_errors(tiny, tmp_path, case, expected):
    sid = "clip_000"
    t = np.arange(15.0, 45.0, 0.5)
    rows = [f"{x:g},0.1,-0.2" for x in t]
    header = "time_s,valence,arousal"
    if case == "short":
        rows = rows[:16]  # 15.0 .. 22.5 s: 16 steps = 8 s
    elif case == "nan":
        rows[5] = "17.5,nan,0.1"
    elif case == "range":
        rows[7] = "18.5,0.2,1.5"
    elif case == "beyond":
        rows += [f"{x:g},0.1,-0.2" for x in np.arange(45.0, 50.0, 0.5)]
    elif case == "columns":
        header = "time,valence,arousal"
    elif case == "two_listeners":
        header = "song_id,annotator_id,time_s,valence,arousal"
        rows = [f"{sid},A1,{r}" for r in rows] + [f"{sid},A2,{r}" for r in rows]
    elif case == "other_song":
        header = "song_id,annotator_id,time_s,valence,arousal"
        rows = [f"{sid},A1,{r}" for r in rows] + [f"clip_999,A1,{r}" for r in rows]
    elif case == "decreasing":
        rows[3] = "15.0,0.1,0.1"
        rows[2] = "16.0,0.1,0.1"
    path = tmp_path / "ratings.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    with pytest.raises(DataError, match=expected) as e:
        calibrate("L", song(tiny, sid), path, tiny.run, annotators_dir=tmp_path / "ann")
    assert str(path) in str(e.value) or "ratings.csv" in str(e.value)
    assert not (tmp_path / "ann" / "L").exists()


def test_a_last_rating_at_the_end_of_the_audio_costs_one_step(tiny, base, tmp_path):
    """As for datasets: the step starting at the audio's end is cut (and recorded), not an error."""
    path = tmp_path / "r.csv"
    path.write_text("time_s,valence,arousal\n" + "".join(f"{x:g},0.1,-0.2\n" for x in np.arange(15.0, 45.01, 0.5)))
    prof = calibrate("edge", song(tiny, "clip_000"), path, base=base, annotators_dir=tmp_path, plot=False)
    assert prof.info["songs"][0]["rated_to_s"] == 44.5 and prof.info["songs"][0]["rated_steps"] == 60
    assert len(prof.info["trimmed"]) == 1


# --------------------------------------------------------------------------------------------
# Safety: names, pickles, mismatched base models
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad", ["", "..", "../evil", "a/b", "a\\b", ".hidden", "x y", "é", "a" * 65, "/abs", "nul\x00", "example", "~root"]
)
def test_names_are_checked(tiny, tmp_path, bad):
    ann = tmp_path / "ann"
    with pytest.raises(ProfileError, match="invalid listener name|reserved"):
        check_name(bad)
    with pytest.raises(ProfileError):
        calibrate(
            bad, song(tiny, "clip_000"), REPO / "annotators" / "example" / "ratings.csv", tiny.run, annotators_dir=ann
        )
    with pytest.raises(ProfileError):
        predict(song(tiny, "clip_000"), name=bad, model=tiny.run, annotators_dir=ann, out_dir=tmp_path / "out")
    assert not ann.exists() and not (tmp_path / "out").exists() and not (tmp_path / "evil").exists()


@pytest.mark.parametrize("good", ["P017", "alice", "a-b_c", "X" * 64])
def test_good_names(good):
    assert check_name(good) == good


def test_pickled_weights_are_refused_never_unpickled(tiny, base, tmp_path, capsys):
    ann = tmp_path / "ann"
    ex = REPO / "annotators" / "example" / "ratings.csv"
    prof = calibrate("mallory", song(tiny, "clip_000"), ex, base=base, annotators_dir=ann, plot=False)
    w = prof.weights_path

    torch.save(prof.params, w)  # a torch.save zip archive (holds a pickle)
    with pytest.raises(ProfileError, match=r"refused, not a safetensors file \(it looks like a torch\.save"):
        load_profile("mallory", ann)

    marker = tmp_path / "code-ran"

    class Payload:  # unpickling this would create the marker file
        def __reduce__(self):
            return (Path.touch, (marker,))

    w.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ProfileError, match=r"never unpickled"):
        load_profile("mallory", ann, base=base)
    from pdmer.cli import main

    assert (
        main(
            [
                "predict",
                "--name",
                "mallory",
                "--annotators",
                str(ann),
                "--model",
                str(tiny.run),
                "--out",
                str(tmp_path / "out"),
                str(song(tiny, "clip_001")),
            ]
        )
        == 2
    )
    assert "not a safetensors file" in capsys.readouterr().err
    assert not marker.exists()


def clone_run(run: Path, dest_root: Path, overrides: dict) -> Path:
    """A copy of ``run`` with changed config entries (weights re-saved under the new hash)."""

    d = json.loads((run / "config.json").read_text())
    for key, value in overrides.items():
        node = d
        *path, last = key.split(".")
        for k in path:
            node = node[k]
        node[last] = value
    cfg = from_dict(d)
    m = load_base_model(run).model
    new = dest_root / f"{cfg.name}-{config_hash(cfg)}"
    (new / "checkpoints").mkdir(parents=True)
    (new / "config.json").write_text(json.dumps(to_dict(cfg)))
    (new / "results.json").write_text("{}")
    save_weights(
        new / "checkpoints" / "best.safetensors", m, {"config_hash": config_hash(cfg), "global_dim": m.global_dim}
    )
    return new


@pytest.mark.parametrize(
    "overrides, perturb, what",
    [
        ({"train.seed": 7}, False, "model config"),
        ({"features.log_eps": 1e-5}, False, "feature configuration"),
        ({}, True, "checkpoint"),
    ],
)
def test_profile_from_another_base_model_is_refused(tiny, base, tmp_path, overrides, perturb, what):
    ann = tmp_path / "ann"
    calibrate(
        "bob",
        song(tiny, "clip_000"),
        REPO / "annotators" / "example" / "ratings.csv",
        base=base,
        annotators_dir=ann,
        plot=False,
    )
    other_root = tmp_path / "other"
    other_root.mkdir()
    if perturb:  # same config, other weights: the run folder is a copy with a retrained checkpoint
        other = other_root / tiny.run.name
        shutil.copytree(tiny.run, other)
        m = load_base_model(other).model
        with torch.no_grad():
            next(m.parameters()).add_(0.01)
        save_weights(
            other / "checkpoints" / "best.safetensors", m, {"config_hash": base.config_hash, "global_dim": m.global_dim}
        )
    else:
        other = clone_run(tiny.run, other_root, overrides)
    other_base = load_base_model(other)
    with pytest.raises(ProfileError, match=re.escape(what)) as e:
        load_profile("bob", ann, base=other_base)
    msg = str(e.value)
    assert base.config_hash in msg and other_base.config_hash in msg  # names both models
    assert tiny.run.name in msg
    if "feature" in what:
        assert base.features_hash in msg and other_base.features_hash in msg
    with pytest.raises(ProfileError, match="different base model"):
        predict(song(tiny, "clip_001"), name="bob", model=other, annotators_dir=ann, out_dir=tmp_path / "out")
    # with the right model it still works
    assert load_profile("bob", ann, base=base).name == "bob"


# --------------------------------------------------------------------------------------------
# Crash safety and history
# --------------------------------------------------------------------------------------------


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_a_crash_during_calibration_leaves_the_old_profile(tiny, base, tmp_path, monkeypatch):
    ann = tmp_path / "ann"
    lid = tiny.splits["test"][0]
    c1, c2 = curves_of(tiny.ds, [lid])[lid][:2]
    calibrate(
        "carol",
        song(tiny, c1.song_id),
        write_ratings(tmp_path / "1.csv", c1),
        base=base,
        annotators_dir=ann,
        plot=False,
    )
    before = _snapshot(ann / "carol")
    r2 = write_ratings(tmp_path / "2.csv", c2)

    def boom(*a, **k):
        raise OSError("disk full (simulated)")

    # crash while writing the new profile (the weights are already written, the plot fails)
    monkeypatch.setattr(personal.calibration, "_plot_fit", boom)
    with pytest.raises(OSError, match="simulated"):
        calibrate("carol", song(tiny, c2.song_id), r2, base=base, annotators_dir=ann)
    monkeypatch.undo()
    assert _snapshot(ann / "carol") == before
    assert sorted(p.name for p in ann.iterdir()) == ["carol"]  # no temporary folder left

    # crash on the final rename: the old profile is put back
    real_rename = os.rename
    failed = []

    def rename(src, dst):  # the rename of the new profile into place fails, once
        if Path(dst) == ann / "carol" and not failed:
            failed.append(src)
            raise OSError("rename failed (simulated)")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        calibrate("carol", song(tiny, c2.song_id), r2, base=base, annotators_dir=ann, plot=False)
    monkeypatch.undo()
    assert failed
    assert _snapshot(ann / "carol") == before
    assert sorted(p.name for p in ann.iterdir()) == ["carol"]

    # killed between the two renames: the profile set aside is restored on next use
    os.rename(ann / "carol", ann / ".carol.old-1-2")
    assert load_profile("carol", ann, base=base).info["songs"][0]["song_id"] == c1.song_id
    assert _snapshot(ann / "carol") == before

    # a successful calibration replaces it; --keep-history keeps the old one
    calibrate("carol", song(tiny, c2.song_id), r2, base=base, annotators_dir=ann, plot=False, keep_history=True)
    assert load_profile("carol", ann, base=base).info["songs"][0]["song_id"] == c2.song_id
    (kept,) = (ann / ".history" / "carol").iterdir()
    assert _snapshot(kept) == before
    calibrate(
        "carol",
        song(tiny, c1.song_id),
        write_ratings(tmp_path / "1.csv", c1),
        base=base,
        annotators_dir=ann,
        plot=False,
    )
    assert len(list((ann / ".history" / "carol").iterdir())) == 1  # without --keep-history: replaced, not kept
    assert sorted(p.name for p in ann.iterdir()) == [".history", "carol"]  # and no lock file left


# --------------------------------------------------------------------------------------------
# Issue 18: nothing lost, nothing absurd (one test per numbered failure, and fault injection)
# --------------------------------------------------------------------------------------------

EXAMPLE = REPO / "annotators" / "example" / "ratings.csv"  # rates clip_000


def _errors(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("error:")]


def _left(ann: Path) -> list[str]:
    """Temporary or set-aside folders under ``ann``."""
    return sorted(p.name for p in ann.iterdir() if ".tmp-" in p.name or ".old-" in p.name or ".keep-" in p.name)


def _rewrite_weights(profile_dir: Path, change) -> None:
    """Change a profile's weights in place and re-sign its manifest (a profile as an older pdmer could write it)."""
    from safetensors.torch import save_file

    from pdmer import store

    w = profile_dir / "weights.safetensors"
    with safe_open(str(w), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(change(tensors), str(w), metadata=meta)
    m = json.loads((profile_dir / store.MANIFEST).read_text())
    m["files"]["weights.safetensors"] = {"sha256": sha256_file(w), "bytes": w.stat().st_size}
    (profile_dir / store.MANIFEST).write_text(json.dumps(m))


def test_1_the_base_runs_own_inner_loop_diverging_falls_back_to_the_generic_model(tiny, base, tmp_path, caplog):
    """With the base run's own inner loop (no --inner-lr / --inner-steps), a diverged adaptation is the safe
    rule's fallback: a profile that predicts the generic curve, saying why; the user's own settings are refused."""
    import dataclasses

    cfg = dataclasses.replace(base.cfg, meta=dataclasses.replace(base.cfg.meta, inner_lr=1e6))
    wild = dataclasses.replace(base, cfg=cfg)
    ann = tmp_path / "ann"
    with caplog.at_level("WARNING", logger="pdmer"):
        prof = calibrate("x", song(tiny, "clip_000"), EXAMPLE, base=wild, annotators_dir=ann, plot=False)
    assert any(
        "diverged" in r.getMessage() and "falls back to the generic model" in r.getMessage() for r in caplog.records
    )
    rule = prof.info["personalization"]
    assert "diverged" in rule["fallback"] and not rule["personalized"] and rule["weights"]["maml"] == [0.0, 0.0]
    text = (ann / "x" / "profile.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in profile.json"))  # valid JSON
    (p,) = predict([song(tiny, "clip_012")], name="x", base=base, annotators_dir=ann, write=False)
    np.testing.assert_array_equal(p.personal, p.generic)
    assert _left(ann) == []


def test_1_a_diverged_calibration_is_refused_and_never_saved(tiny, base, tmp_path, capsys):
    from pdmer.cli import main

    ann = tmp_path / "ann"
    calibrate("x", song(tiny, "clip_000"), EXAMPLE, base=base, annotators_dir=ann, plot=False)
    before = _snapshot(ann / "x")
    with pytest.raises(
        personal.AdaptationError,
        match=r"calibration of 'x' diverged: the support loss became non-finite "
        r".*Nothing was saved \(the existing profile is unchanged\); lower the inner learning rate \(--inner-lr, 1e\+06",
    ):
        calibrate("x", song(tiny, "clip_000"), EXAMPLE, base=base, annotators_dir=ann, plot=False, inner_lr=1e6)
    assert _snapshot(ann / "x") == before and _left(ann) == []
    args = [
        "calibrate",
        "--name",
        "y",
        "--audio",
        str(song(tiny, "clip_000")),
        "--ratings",
        str(EXAMPLE),
        "--model",
        str(tiny.run),
        "--annotators",
        str(ann),
        "--inner-lr",
        "1e6",
    ]
    assert main(args) == 2
    (line,) = _errors(capsys.readouterr().err)
    assert "diverged" in line and not (ann / "y").exists()
    # every profile.json is valid JSON: a non-finite metric is written as null, never Infinity
    text = (ann / "x" / "profile.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in profile.json"))

    # a profile whose weights hold a NaN (or an infinity) is refused, never predicted with
    from pdmer.store import MANIFEST

    saved = {f: (ann / "x" / f).read_bytes() for f in ("weights.safetensors", MANIFEST)}
    _rewrite_weights(
        ann / "x", lambda t: {k: (v.clone().fill_(float("nan")) if i == 0 else v) for i, (k, v) in enumerate(t.items())}
    )
    with pytest.raises(
        ProfileError,
        match=r"weights\.safetensors: tensor '.*' holds \d+ NaN or infinite value\(s\): this "
        r"profile is unusable",
    ):
        load_profile("x", ann)
    out = tmp_path / "out"
    assert (
        main(
            [
                "predict",
                "--name",
                "x",
                "--annotators",
                str(ann),
                "--model",
                str(tiny.run),
                "--out",
                str(out),
                str(song(tiny, "clip_012")),
            ]
        )
        == 2
    )
    (line,) = _errors(capsys.readouterr().err)
    assert "NaN or infinite" in line and not out.exists()
    # finite but absurd weights: predict refuses the curve instead of writing valence 4e22
    for f, data in saved.items():
        (ann / "x" / f).write_bytes(data)
    _rewrite_weights(
        ann / "x", lambda t: {k: v + 1e3 if k == "head.2.bias" else v for k, v in t.items()}
    )  # the output layer
    with pytest.raises(personal.AdaptationError, match=r"profile 'x' diverged: the personal curve of clip_012 reaches"):
        predict(song(tiny, "clip_012"), name="x", base=base, annotators_dir=ann, out_dir=out)
    assert not out.exists()
    # a profile.json holding Infinity (written before this check) is refused with its file named
    (ann / "x" / "profile.json").write_text(
        text.replace('"support_loss_after": ', '"support_loss_after": Infinity, "was": ')
    )
    with pytest.raises(ProfileError, match=r"profile\.json: not valid JSON \(Infinity is not a JSON number"):
        load_profile("x", ann)


def test_adaptation_problem_names_what_is_wrong():
    ok = {"w": torch.zeros(3)}
    assert personal.adaptation_problem([0.7, 0.6], ok, {"s": np.zeros((4, 2))}, final_loss=0.5) is None
    assert "non-finite" in personal.adaptation_problem([0.7, float("inf")])
    assert "'w' holds 1 NaN" in personal.adaptation_problem(params={"w": torch.tensor([0.0, float("nan")])})
    assert "reaches 4e+22" in personal.adaptation_problem(curves={"s": np.full((3, 2), 4e22)})
    assert "grew from 0.5 to 1.2" in personal.adaptation_problem([0.5, 0.6], final_loss=1.2)


def test_3_no_temporary_folder_survives_the_next_calibration(tiny, base, tmp_path):
    ann = tmp_path / "ann"
    calibrate("eve", song(tiny, "clip_000"), EXAMPLE, base=base, annotators_dir=ann, plot=False)
    for leftover in (".eve.tmp-123-456", ".eve.tmp-1-2", ".bob.tmp-9-9"):  # as kill -9 during a write leaves them
        (ann / leftover).mkdir()
        shutil.copyfile(EXAMPLE, ann / leftover / "ratings.csv")  # a copy of a listener's ratings: personal data
    load_profile("eve", ann)  # a read cleans its own name's leftovers
    assert _left(ann) == [".bob.tmp-9-9"]
    calibrate("eve", song(tiny, "clip_000"), EXAMPLE, base=base, annotators_dir=ann, plot=False)
    assert _left(ann) == []  # any calibration cleans what no one is writing now, of every name


def test_4_recovery_restores_the_complete_copy_not_the_newest(tiny, base, tmp_path):
    """The issue's steps: a half-deleted copy (newer mtime, newer name) beside a complete one set aside."""
    ann = tmp_path / "ann"
    calibrate("A", song(tiny, "clip_000"), EXAMPLE, base=base, annotators_dir=ann, plot=False)
    before = _snapshot(ann / "A")
    shutil.copytree(ann / "A", ann / ".A.old-9-9")
    (ann / ".A.old-9-9" / "weights.safetensors").unlink()
    os.rename(ann / "A", ann / ".A.old-2-2")
    os.utime(ann / ".A.old-9-9")
    prof = load_profile("A", ann, base=base)
    assert _snapshot(ann / "A") == before and prof.path == ann / "A" and _left(ann) == []


def test_5_the_calibrate_again_hint_names_the_folder_not_the_copy(tiny, base, tmp_path):
    ann = tmp_path / "ann"
    calibrate("A", song(tiny, "clip_000"), EXAMPLE, base=base, annotators_dir=ann, plot=False)
    shutil.copytree(ann / "A", ann / "B")
    other = clone_run(tiny.run, tmp_path / "other", {"train.seed": 7})
    with pytest.raises(ProfileError, match="different base model") as e:
        predict(song(tiny, "clip_001"), name="B", model=other, annotators_dir=ann, write=False)
    assert "calibrate --name B " in str(e.value) and "--name A" not in str(e.value)
    assert "annotators/B/ratings.csv" in str(e.value).replace(str(ann), "annotators")
    assert load_profile("B", ann).name == "B"


def test_6_two_calibrations_of_one_name_never_both_succeed(tiny, base, tmp_path):
    """A calibration holds the name's lock from its first write to its last: a second one is refused at once."""
    ann = tmp_path / "ann"
    calibrate("dana", song(tiny, "clip_000"), EXAMPLE, base=base, annotators_dir=ann, plot=False)
    before = _snapshot(ann / "dana")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; from pathlib import Path; from pdmer import store\n"
                "with store.locked(Path(sys.argv[1]), 'dana', what='calibrated'):\n    print('locked', flush=True); time.sleep(60)"
            ),
            str(ann),
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(
            ProfileError,
            match=rf"being calibrated by another process \(pid {holder.pid}\).*another "
            r"calibration of 'dana' is running; nothing was changed",
        ):
            calibrate(
                "dana",
                song(tiny, "clip_001"),
                EXAMPLE.parent / "ratings.csv",
                base=base,
                annotators_dir=ann,
                plot=False,
            )
        assert load_profile("dana", ann).info["songs"][0]["song_id"] == "clip_000"  # reading is not blocked
        calibrate(
            "other", song(tiny, "clip_000"), EXAMPLE, base=base, annotators_dir=ann, plot=False
        )  # nor another name
    finally:
        holder.kill()
        holder.wait()
    assert _snapshot(ann / "dana") == before
    calibrate(
        "dana", song(tiny, "clip_000"), EXAMPLE, base=base, annotators_dir=ann, plot=False
    )  # the lock died with it


@pytest.mark.parametrize("keep_history", [False, True])
def test_a_calibration_crashing_at_any_stage_leaves_the_old_or_the_new_profile(
    tiny, base, tmp_path, monkeypatch, keep_history
):
    """Fault injection through calibrate: raise at every stage of the write (``pdmer.store._fault``: after each
    file, before and after each rename, while deleting the old profile), then the next command (predict's read of
    the profile, then a calibration) finds the complete old profile or the complete new one, and no leftover
    survives it. tests/test_store.py does the same with SIGKILL of a child process."""
    from pdmer import store

    lid = tiny.splits["test"][0]
    c1, c2 = curves_of(tiny.ds, [lid])[lid][:2]
    r1, r2 = write_ratings(tmp_path / "1.csv", c1), write_ratings(tmp_path / "2.csv", c2)
    template = tmp_path / "template"
    calibrate("kim", song(tiny, c1.song_id), r1, base=base, annotators_dir=template, plot=False)
    shutil.copytree(template, tmp_path / "dry")
    seen: list[str] = []
    monkeypatch.setattr(store, "_fault", seen.append)
    calibrate(
        "kim",
        song(tiny, c2.song_id),
        r2,
        base=base,
        annotators_dir=tmp_path / "dry",
        plot=False,
        keep_history=keep_history,
    )
    monkeypatch.undo()
    installed = seen.index("renamed the new entry into place")
    assert seen[:installed] == [
        "wrote weights.safetensors",
        "wrote ratings.csv",
        "wrote profile.json",
        "wrote manifest",
        "before setting the old entry aside",
        "set the old entry aside",
    ]
    for k, stage in enumerate(seen):
        ann = tmp_path / f"crash{k}"
        shutil.copytree(template, ann)
        calls = iter(range(len(seen)))

        def fault(s, calls=calls, k=k):  # bound now: each crash point has its own counter
            if next(calls) == k:
                raise KeyboardInterrupt(f"killed at {s!r}")

        monkeypatch.setattr(store, "_fault", fault)
        with pytest.raises(KeyboardInterrupt):
            calibrate(
                "kim", song(tiny, c2.song_id), r2, base=base, annotators_dir=ann, plot=False, keep_history=keep_history
            )
        monkeypatch.undo()
        prof = load_profile("kim", ann, base=base)  # the next command
        got = prof.info["songs"][0]["song_id"]
        assert got == (c1.song_id if k < installed else c2.song_id), stage
        assert store.check_complete(ann / "kim") is None and _left(ann) == [], stage
        if keep_history and k >= installed:
            (kept,) = (ann / ".history" / "kim").iterdir()
            assert json.loads((kept / "profile.json").read_text())["songs"][0]["song_id"] == c1.song_id, stage
    os.rename(ann / "kim", ann / ".kim.old-7-7")  # and a calibration after a crash between the renames
    (ann / ".kim.tmp-8-8").mkdir()
    calibrate("kim", song(tiny, c1.song_id), r1, base=base, annotators_dir=ann, plot=False)
    assert _left(ann) == [] and load_profile("kim", ann).info["songs"][0]["song_id"] == c1.song_id


def test_8_dense_ratings_are_averaged_over_each_step(tmp_path):
    """A slider logged at 100 Hz: each 2 Hz step is the mean of what falls in it, [0.5 k, 0.5 k + 0.5), not one sample."""
    t = np.round(np.arange(15.0, 45.0, 0.01), 4)
    rng = np.random.default_rng(0)
    v = 0.3 * np.sin(t / 3) + 0.2 * rng.standard_normal(len(t))  # a jittery hand
    a = np.clip(-0.2 + 0.1 * rng.standard_normal(len(t)), -1, 1)
    v = np.clip(v, -1, 1)
    path = tmp_path / "r.csv"
    path.write_text("time_s,valence,arousal\n" + "".join(f"{x:.2f},{y:.5f},{z:.5f}\n" for x, y, z in zip(t, v, a)))
    (c,) = personal.read_ratings(path, ["clip_000"], "me")
    assert c.start_step == 30 and c.n_steps == 60  # 15.0 .. 44.5 s
    k = 40  # 20.0 s: the ratings in [20.0, 20.5)
    inside = (t >= k * 0.5 - 1e-9) & (t < k * 0.5 + 0.5 - 1e-9)
    np.testing.assert_allclose(c.values[k - 30, V], v[inside].mean(), atol=1e-4)
    np.testing.assert_allclose(c.values[k - 30, A], a[inside].mean(), atol=1e-4)
    assert np.std(c.values[:, A]) < 0.05  # averaged: far less jitter than one sample per step (0.1)
    _, notes = personal._read_ratings(path, ["clip_000"], "me")
    assert notes["clip_000"] == {"rate_hz": 100.0, "resampling": "averaged per step"}


# --------------------------------------------------------------------------------------------
# predict: files, model choice, the command line
# --------------------------------------------------------------------------------------------


def test_predict_writes_csv_and_png_and_says_which_model(tiny, tmp_path, monkeypatch, capsys):
    from pdmer.cli import main

    # an unfinished run (no results.json) is newer but never picked
    (tiny.runs / "pdmer.unfinished-00000000" / "checkpoints").mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(personal.base, "DEFAULT_RUNS_DIR", tiny.runs)
    out = tmp_path / "out"
    s = song(tiny, "clip_003")
    assert main(["predict", str(s), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"model: {tiny.run}" in printed and "the latest trained run" in printed
    lines = (out / "clip_003.csv").read_text().splitlines()
    assert lines[0] == "time_s,valence,arousal"
    assert len(lines) - 1 == 90  # 45 s at 2 Hz, the whole song
    assert lines[1].startswith("0.0,") and lines[2].startswith("0.5,") and lines[-1].startswith("44.5,")
    assert (out / "clip_003.png").read_bytes()[:4] == b"\x89PNG"
    (p,) = predict(s, model=tiny.run, write=False)
    got = np.loadtxt(out / "clip_003.csv", delimiter=",", skiprows=1)
    np.testing.assert_allclose(got[:, 1], p.generic[:, V], atol=1e-4)
    np.testing.assert_allclose(got[:, 2], p.generic[:, A], atol=1e-4)

    ann = tmp_path / "ann"
    ex = REPO / "annotators" / "example" / "ratings.csv"
    assert (
        main(
            [
                "calibrate",
                "--name",
                "dave",
                "--audio",
                str(song(tiny, "clip_000")),
                "--ratings",
                str(ex),
                "--annotators",
                str(ann),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "the latest trained run" in printed and "wrote" in printed and "weights.safetensors" in printed
    assert main(["predict", "--name", "dave", str(s), "--out", str(out), "--annotators", str(ann)]) == 0
    assert "base run of profile 'dave'" in capsys.readouterr().out
    head = (out / "clip_003.dave.csv").read_text().splitlines()[0]
    assert head == "time_s,valence,arousal,generic_valence,generic_arousal"
    both = np.loadtxt(out / "clip_003.dave.csv", delimiter=",", skiprows=1)
    np.testing.assert_allclose(both[:, 3:], got[:, 1:], atol=1e-4)  # the generic curve beside the personal one
    personalized = json.loads((ann / "dave" / "profile.json").read_text())["personalization"]["personalized"]
    assert (np.abs(both[:, 1:3] - both[:, 3:]).max() > 1e-3) == personalized  # the safe rule kept or left the curve
    assert (out / "clip_003.dave.png").is_file()
    assert main(["predict", "--name", "nobody", str(s), "--annotators", str(ann)]) == 2
    assert "no profile 'nobody'" in capsys.readouterr().err
    shutil.rmtree(tiny.runs / "pdmer.unfinished-00000000")


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Calibrate to a new listener", 1)[1].split("\n## ", 1)[0]
    # the block that calibrates from a ratings file (the section's `rate` example serves a page until stopped)
    block = next(b.split("```", 1)[0] for b in section.split("```bash")[1:] if "run.py calibrate" in b)
    return [ln.strip() for ln in block.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def test_readme_example_commands_work(tiny, tmp_path, monkeypatch, capsys):
    """The README's calibrate / predict example, as written, on the tiny benchmark's audio."""
    from pdmer.cli import main

    monkeypatch.setattr(personal.base, "DEFAULT_RUNS_DIR", tiny.runs)
    monkeypatch.setattr(personal.names, "DEFAULT_ANNOTATORS_DIR", tmp_path / "annotators")
    monkeypatch.setattr(personal.prediction, "DEFAULT_PREDICTIONS_DIR", tmp_path / "predictions")
    monkeypatch.chdir(REPO)  # the README's paths are relative to the repository
    songs = None
    ran = []
    for cmd in _readme_commands():
        if cmd.startswith("SONGS="):
            songs = str(tiny.audio)  # the README finds data/synthetic-*/audio; here the tiny benchmark's
            continue
        argv = shlex.split(cmd.replace("$SONGS", songs or "$SONGS"))
        assert argv[:2] == [".venv/bin/python", "run.py"], cmd
        assert main(argv[2:]) == 0, cmd
        ran.append(argv[2])
        capsys.readouterr()
    assert ran[:2] == ["calibrate", "predict"]
    name = argv[argv.index("--name") + 1]
    assert (tmp_path / "annotators" / name / "profile.json").is_file()
    assert list((tmp_path / "predictions").glob(f"*.{name}.csv"))


# --------------------------------------------------------------------------------------------
# Long songs: segment-wise features, flat memory
# --------------------------------------------------------------------------------------------


def _concat_clips(tiny, path: Path, n: int) -> Path:
    parts = [sf.read(str(song(tiny, f"clip_{i:03d}")), dtype="float32")[0] for i in range(n)]
    sf.write(str(path), np.concatenate(parts), 44100, subtype="PCM_16")
    return path


@pytest.mark.parametrize("cqt", ["exact", "multirate"])
def test_segment_features_equal_whole_song_features(tiny, tmp_path, cqt):
    """Segments of 30 s with the default context: the patches and the descriptors (each a 30 s window's,
    straddling segments) equal the whole song's; with too little context the descriptors differ (the
    comparison can fail)."""
    from pdmer.features import FeatureExtractor
    from pdmer.features.streaming import STREAM_MARGIN_S

    path = _concat_clips(tiny, tmp_path / "medley.wav", 3)  # 135 s of benchmark music
    fx = FeatureExtractor(dataclasses.replace(tiny.cfg.features, cqt=cqt), use_cache=False)
    whole = fx(path)
    seg = personal.song_features(path, fx, stream_min_s=0.0, core_s=30.0, margin_s=STREAM_MARGIN_S)  # 5 segments
    assert seg.n_steps == whole.n_steps == 270
    torch.testing.assert_close(seg.local.float(), whole.local.float(), atol=1e-2, rtol=0)  # float16 patches
    torch.testing.assert_close(seg.global_, whole.global_, atol=1e-4, rtol=1e-4)
    short = personal.song_features(path, fx, stream_min_s=0.0, core_s=30.0, margin_s=0.5)
    assert (short.global_ - whole.global_).abs().max() > 1e-3  # the onset filters and tempo lags need the margin


def test_segment_features_of_a_48_khz_song(tiny, tmp_path):
    """A song at another rate is resampled segment by segment: still the whole song's features."""
    from pdmer.features import FeatureExtractor, resample

    x = sf.read(str(_concat_clips(tiny, tmp_path / "medley.wav", 2)), dtype="float32")[0]
    path = tmp_path / "medley48.wav"
    sf.write(str(path), resample(x, 44100, 48000), 48000, subtype="FLOAT")
    fx = FeatureExtractor(tiny.cfg.features, use_cache=False)
    whole = fx(path)
    seg = personal.song_features(path, fx, stream_min_s=0.0, core_s=25.0)
    assert seg.n_steps == whole.n_steps == 180
    torch.testing.assert_close(seg.local.float(), whole.local.float(), atol=1e-2, rtol=0)
    torch.testing.assert_close(seg.global_, whole.global_, atol=1e-4, rtol=1e-4)


def _wav(path: Path, minutes: float) -> Path:
    sr, n = 44100, int(minutes * 60 * 44100)
    rng = np.random.default_rng(0)
    with sf.SoundFile(str(path), "w", sr, 1, "PCM_16") as f:
        for s in range(0, n, sr * 10):
            t = np.arange(s, min(s + sr * 10, n)) / sr
            f0 = 220 * 2 ** np.sin(2 * np.pi * t / 37.0)
            x = 0.3 * np.sin(2 * np.pi * np.cumsum(f0) / sr) * (
                0.6 + 0.4 * np.sin(4 * np.pi * t)
            ) + 0.02 * rng.standard_normal(len(t))
            f.write(x.astype(np.float32))
    return path


CHILD = textwrap.dedent(
    """
    import json, sys
    import torch
    torch.set_num_threads(1)
    from pdmer.personal import load_base_model, predict

    def mb(key):  # from /proc/self/status, in MB
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) / 1024

    base = load_base_model(sys.argv[1], device="cpu")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS: ru_maxrss would include the parent's
    r0 = mb("VmRSS:")
    (p,) = predict(sys.argv[2], base=base, out_dir=sys.argv[3], plot=False)
    print(json.dumps({"steps": len(p.times), "growth_mb": mb("VmHWM:") - r0, "base_mb": r0}))
    """
)


@pytest.mark.slow
def test_predict_on_a_10_minute_file_has_flat_memory(tmp_path):
    """Peak memory of predict grows with the song only by its features (about 13 KB per step).

    A model with the local (spectrogram) branch, untrained: memory, not accuracy, is measured,
    in a fresh process per song. The 4- and 10-minute songs are both longer than one feature
    segment; whole-song featurisation would need about 280 MB more for the 10-minute one.
    """
    from pdmer.features import descriptor_dim
    from pdmer.models.dsaml import DSAML

    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to measure a process's peak memory")
    cfg = load_config(
        "pdmer.synthetic.dsaml", [f"runtime.out_dir={tmp_path / 'runs'}", f"features.cache_dir={tmp_path / 'features'}"]
    )
    torch.manual_seed(0)
    m = DSAML(cfg.model, descriptor_dim(cfg.features))
    run = tmp_path / "runs" / f"{cfg.name}-{config_hash(cfg)}"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(to_dict(cfg)))
    save_weights(
        run / "checkpoints" / "best.safetensors", m, {"config_hash": config_hash(cfg), "global_dim": m.global_dim}
    )
    (run / "results.json").write_text("{}")  # a finished run (an unfinished one is refused as a base model)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "MALLOC_MMAP_THRESHOLD_": "1048576",
    }  # freed buffers go back to the OS
    res = {}
    for minutes in (4, 10):
        wav = _wav(tmp_path / f"song_{minutes}min.wav", minutes)
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(run), str(wav), str(tmp_path / "pred")],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        res[minutes] = json.loads(out.stdout.strip().splitlines()[-1])
        wav.unlink()
    print(
        f"\npeak RSS growth of predict: 4 min {res[4]['growth_mb']:.0f} MB, 10 min {res[10]['growth_mb']:.0f} MB "
        f"(over {res[4]['base_mb']:.0f} / {res[10]['base_mb']:.0f} MB with the model loaded)"
    )
    assert res[4]["steps"] == 480 and res[10]["steps"] == 1200
    assert len((tmp_path / "pred" / "song_10min.csv").read_text().splitlines()) == 1201
    features_mb = (1200 - 480) * (51 * 128 * 2 + 4 * descriptor_dim(cfg.features)) / 2**20  # about 9.6 MB
    assert res[10]["growth_mb"] - res[4]["growth_mb"] < features_mb + 70


def test_a_synthetic_only_model_warns_on_audio_that_is_not_the_benchmarks(base, tiny, tmp_path):
    """The synthetic benchmark's model knows nothing of real music: say so for other audio, not for its own."""
    own = sorted(tiny.audio.glob("*.wav"))[:2]
    assert own and base.synthetic_warning(own) is None
    elsewhere = tmp_path / "my_song.wav"
    shutil.copyfile(own[0], elsewhere)
    warning = base.synthetic_warning([own[0], elsewhere])
    assert warning and "my_song.wav" in warning and "synthetic benchmark only" in warning
    real = copy.copy(base)
    real.cfg = dataclasses.replace(base.cfg, data=dataclasses.replace(base.cfg.data, source="vgmidi"))
    assert real.synthetic_warning([elsewhere]) is None


def test_the_response_component_is_recorded_and_applied_by_predict(tiny, tmp_path):
    """A base run whose rule uses the response component (set by hand here): calibrate records the
    listener's response and its basis in profile.json, and predict's personal curve on another song
    is the generic one plus that response on the song's spectra (pdmer.response), as evaluation adds it."""
    from pdmer import response as R
    from pdmer.evaluation.split import RULE_FILE
    from pdmer.personalize import Weights

    run = tmp_path / tiny.run.name
    shutil.copytree(tiny.run, run)
    rule = json.loads((run / RULE_FILE).read_text())
    assert "response" in rule  # written by evaluation: the basis learned on the training listeners
    # the tiny run's listeners carry nothing over (its learned directions are zero): directions by hand
    learned = R.ResponseBasis.from_json(rule["response"])
    axes = np.random.default_rng(0).standard_normal(learned.axes.shape) / np.sqrt(learned.axes.shape[-1])
    rule["response"] = R.ResponseBasis(learned.mean, axes, learned.views, {"learned": "by hand (test)"}).to_json()
    rule["weights"] = Weights(response=[1.0, 1.0], gate=False, chosen_on="by hand (test)").to_json()
    (run / RULE_FILE).write_text(json.dumps(rule))
    lid = tiny.splits["test"][0]
    c = curves_of(tiny.ds, [lid])[lid][0]
    ratings = write_ratings(tmp_path / "r.csv", c)
    calibrate("resp", song(tiny, c.song_id), ratings, run, annotators_dir=tmp_path / "ann")
    rec = json.loads((tmp_path / "ann" / "resp" / "profile.json").read_text())["personalization"]
    beta = np.asarray(rec["response"]["beta"])
    basis = R.ResponseBasis.from_json(rec["response"]["basis"])  # the run's, learned on its training listeners
    assert beta.shape == (basis.axes.shape[-2] * len(R.LAGS), 2) and np.abs(beta).max() > 0
    assert rec["personalized"] and "response 1" in rec["summary"]

    other = next(s for s in ("clip_003", "clip_004", "clip_005") if s != c.song_id)
    base = load_base_model(run)
    (p,) = predict(song(tiny, other), model=run, name="resp", annotators_dir=tmp_path / "ann", write=False)
    feats = base.features(song(tiny, other))
    want = p.generic + R.curve(basis.design(feats.local), beta)
    np.testing.assert_allclose(p.personal, want, atol=1e-5)
    assert np.abs(p.personal - p.generic).max() > 1e-4

    # a profile written before the component (no response record, no response weight) reads as none
    from types import SimpleNamespace

    from pdmer.personal.adaptation import _apply_profile_rule

    old = copy.deepcopy(rec)
    del old["response"]
    old["weights"].pop("response")
    fake = SimpleNamespace(info={"personalization": old}, name="resp", path=tmp_path)
    np.testing.assert_allclose(_apply_profile_rule(fake, p.generic, p.generic, feats.local), p.generic, atol=1e-6)
    broken = copy.deepcopy(rec)
    broken["response"]["beta"] = beta[:-1].tolist()
    with pytest.raises(ProfileError, match="response beta"):
        _apply_profile_rule(
            SimpleNamespace(info={"personalization": broken}, name="resp", path=tmp_path),
            p.generic,
            p.generic,
            feats.local,
        )

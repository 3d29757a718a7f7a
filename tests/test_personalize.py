"""The safe personalization rule: components, the held-out check, weights chosen on listeners."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pdmer.personalize import Check, Parts, Support, Weights, choose_weights, combine, gate

ALL = Weights(offset=[1.0, 1.0], scale=[1.0, 1.0], maml=[1.0, 1.0])


def generic_curve(n: int, seed: int) -> np.ndarray:
    t = np.arange(n)
    return np.stack([0.3 * np.sin(t / 7 + seed), 0.2 * np.cos(t / 5 + seed) + 0.1], 1)


def listener_curve(g: np.ndarray, offset, scale) -> np.ndarray:
    m = g.mean(0)
    return m + np.asarray(scale) * (g - m) + np.asarray(offset)


def test_zero_weights_are_the_generic_curve():
    g = generic_curve(50, 0)
    a = g + 0.3
    s = Support.fit(listener_curve(g, [0.4, -0.2], [2, 2]), g)
    np.testing.assert_allclose(combine(g, a, s, Weights()), g)
    np.testing.assert_allclose(combine(g, a, s, ALL, use=np.array([False, False])), g)


def test_components_recover_a_consistent_listener():
    g = generic_curve(60, 1)
    y = listener_curve(g, [0.4, -0.3], [1.8, 0.6])
    s = Support.fit(y, g)
    np.testing.assert_allclose(s.offset, [0.4, -0.3], atol=1e-9)
    np.testing.assert_allclose(s.scale, [1.8, 0.6], rtol=1e-9)
    w = Weights(offset=[1, 1], scale=[1, 1], maml=[0, 0])
    g2 = generic_curve(80, 2)  # another song: the same listener's response carries over
    np.testing.assert_allclose(combine(g2, g2, s, w), listener_curve(g2, [0.4, -0.3], [1.8, 0.6]), atol=1e-9)


def check_for(ratings_fit, ratings_held, g_fit, g_held, a_held) -> Check:
    return Check(ratings_held, g_held, a_held, Support.fit(ratings_fit, g_fit))


def test_gate_falls_back_on_pure_noise():
    """Ratings that are the generic curve plus white noise: nothing personal to learn."""
    rng = np.random.default_rng(0)
    passed = 0
    for trial in range(40):
        g = generic_curve(60, trial)
        y = g + rng.normal(0, 0.3, g.shape)
        a = g + rng.normal(0, 0.1, g.shape)  # an adaptation that fitted the noise
        c = check_for(y[:40], y[40:], g[:40], g[40:], a[40:])
        passed += int(gate(c, ALL).sum())
        passed += int(gate(c, Weights(offset=[1, 1])).sum())
    assert passed <= 0.1 * 160  # a one-sided 2.5 % test per dimension, a little slack


def test_gate_follows_a_strong_consistent_response():
    rng = np.random.default_rng(1)
    for trial in range(20):
        g = generic_curve(60, trial)
        y = listener_curve(g, [0.5, -0.4], [2.0, 1.5]) + rng.normal(0, 0.05, g.shape)
        c = check_for(y[:40], y[40:], g[:40], g[40:], g[40:])
        assert gate(c, Weights(offset=[1, 1], scale=[1, 1])).all()


def parts_population(carry: float, n: int = 60, seed: int = 0) -> list[Parts]:
    """Listeners whose offset on the query song is ``carry`` x their support offset plus a new one."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        off = rng.normal(0, 0.4, 2)
        g_s, g_q = generic_curve(60, i), generic_curve(80, i + 100)
        y_s = listener_curve(g_s, off, [1, 1]) + rng.normal(0, 0.05, g_s.shape)
        q_off = carry * off + np.sqrt(1 - carry**2) * rng.normal(0, 0.4, 2)
        y_q = listener_curve(g_q, q_off, [1, 1]) + rng.normal(0, 0.05, g_q.shape)
        check = check_for(y_s[:40], y_s[40:], g_s[:40], g_s[40:], g_s[40:])
        out.append(Parts(Support.fit(y_s, g_s), check, {"q": (y_q, g_q, g_q)}))
    return out


def test_weights_follow_what_carries_over():
    w, report = choose_weights(parts_population(carry=0.0))
    assert w.offset == [0.0, 0.0]  # offsets that do not carry over are not applied
    assert report["arousal"]["rmse_change"] <= 0
    w, _ = choose_weights(parts_population(carry=0.95))
    assert min(w.offset) >= 0.75  # offsets that carry over are


def test_weights_never_worsen_rmse_or_pcc_on_the_listeners_they_are_chosen_on():
    for carry in (0.0, 0.3, 0.9):
        w, report = choose_weights(parts_population(carry, seed=3))
        for label in ("arousal", "valence"):
            assert report[label]["rmse_change"] <= 1e-9 and report[label]["pcc_change"] >= -1e-9


def test_evaluate_listener_end_to_end_noise_and_response():
    """Through the evaluation: noise around the generic curve stays generic; a strong response is followed."""
    from pdmer.config import ModelConfig
    from pdmer.data.types import Curve, Dataset
    from pdmer.evaluation.inference import predict_steps
    from pdmer.evaluation.protocol import Adaptation, apply_weights, evaluate_listener
    from pdmer.meta.maml import call
    from pdmer.models.dsaml import DSAML

    torch.manual_seed(0)
    model = DSAML(ModelConfig(hidden=16, layers=1, heads=2, ff=16, dropout=0.0, lstm_hidden=4, head_hidden=8), 4).eval()

    class Feats:
        def __init__(self, n, seed):
            g = torch.Generator().manual_seed(seed)
            self.local = torch.randn(n, 51, 128, generator=g).half()
            self.global_ = torch.randn(n, 4, generator=g)
            self.n_steps = n

    feats = {"s1": Feats(60, 1), "s2": Feats(80, 2)}
    gen = {s: predict_steps(model, f, 0, f.n_steps, 60, 30) for s, f in feats.items()}

    def loss_fn(model_, params, buffers, batch):
        local, glob, target = batch
        return ((call(model_, params, buffers, local, glob).pred - target) ** 2).mean()

    how = Adaptation(loss_fn, 3, 0.05, 60, 30, 1, 0)
    rng = np.random.default_rng(0)
    for kind in ("noise", "response"):
        if kind == "noise":
            sup = gen["s1"] + rng.normal(0, 0.3, gen["s1"].shape)
            qry = gen["s2"] + rng.normal(0, 0.3, gen["s2"].shape)
        else:
            sup, qry = gen["s1"] + [0.5, -0.5], gen["s2"] + [0.5, -0.5]
        curves = [Curve("s1", "L", 0, sup.astype(np.float32)), Curve("s2", "L", 0, qry.astype(np.float32))]
        ds = Dataset("t", Path("."), {}, curves)
        r = evaluate_listener(model, ds, feats, "L", [curves[0]], how, True, [curves[1]])
        apply_weights([r], Weights(offset=[1, 1], scale=[0, 0], maml=[0, 0]), keep_curves=True)
        p = r.curves["personalized"]["s2"]
        if kind == "noise":
            assert r.use == [[False, False]]
            np.testing.assert_allclose(p, gen["s2"], atol=1e-6)
        else:
            assert r.use == [[True, True]]
            np.testing.assert_allclose(p, qry, atol=0.02)


def test_where_levels_carry_over_the_rule_is_at_least_as_good_as_the_offset_shift():
    """Within a song a listener's level carries over: the chosen rule must not trail the plain offset
    shift (weight 1, no check) in RMSE or CCC on the listeners it is chosen on, beyond what choosing
    on half of them costs (a neighbouring weight that the halves preferred)."""
    from pdmer.personalize import _dim_scores, _summary

    parts = parts_population(carry=0.9, seed=5)
    w, report = choose_weights(parts)
    for d, label in enumerate(("arousal", "valence")):
        (ccc, rmse, _), _ = _summary(_dim_scores(parts, d, (1.0, 0.0, 0.0, 0.0, 0.0), False))
        assert rmse < 0  # the shift helps here
        chosen = report[label]
        assert chosen["ccc_gain"] - chosen["rmse_change"] >= ccc - rmse - 0.01
        assert chosen["rmse_change"] <= rmse + 0.01
        assert chosen["weights"]["offset"] >= 0.75
    assert all("with_check" in report[label] or "without_check" in report[label] for label in ("arousal", "valence"))
    assert report["gate"] == w.gate == [report[label]["check"] for label in ("arousal", "valence")]


def maml_population(n: int, rmse_shift: float, seed: int = 0, copies: int = 1) -> list[Parts]:
    """Listeners whose adapted curve moves toward their query ratings by a fixed share (a CCC gain),
    plus a level error of random sign whose mean is ``rmse_shift`` (RMSE then changes by about that)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        g = generic_curve(80, i)
        bend = 0.3 * np.stack(
            [np.sin(np.arange(80) / 3 + i), np.cos(np.arange(80) / 4 + i)], 1
        )  # what the generic misses
        y = g + bend + rng.normal(0, 0.05, g.shape)
        err = rmse_shift + rng.normal(0, 0.02)
        a = g + 0.5 * bend + err
        for _ in range(copies):
            out.append(Parts(Support(np.zeros(2), np.ones(2)), None, {"q": (y, g, a)}, f"L{i}"))
    return out


def test_choice_takes_a_gain_that_leaves_rmse_unchanged():
    """Non-inferiority: a component whose RMSE change is about zero is not turned away for it."""
    w, report = choose_weights(maml_population(40, rmse_shift=0.0), use_gate=False)
    assert min(w.maml) > 0
    assert report["arousal"]["ccc_gain"] > 0


def test_choice_refuses_a_gain_that_costs_rmse():
    w, _ = choose_weights(maml_population(40, rmse_shift=0.3, seed=1), use_gate=False)
    assert max(w.maml) < 1.0  # the full adaptation's level error costs more RMSE than the margin allows
    for d in range(2):
        parts = maml_population(40, rmse_shift=0.3, seed=1)
        from pdmer.personalize import _dim_scores

        assert _dim_scores(parts, d, w.of(d), False)[:, 1].mean() <= 1e-9


def test_a_listener_counts_once_however_many_parts():
    """Copies of one listener's part are one vote: 2 listeners x 50 copies are not 100 listeners."""
    from pdmer.personalize import by_listener

    ch = np.arange(12, dtype=float).reshape(6, 2)
    np.testing.assert_allclose(by_listener(ch, ["a", "b", "a", "", "b", ""]), [[2, 3], [5, 6], [6, 7], [10, 11]])
    for n, shift in ((3, 0.05), (3, 0.0), (12, 0.1)):
        few, r_few = choose_weights(maml_population(n, rmse_shift=shift, seed=n), use_gate=False)
        many, r_many = choose_weights(maml_population(n, rmse_shift=shift, seed=n, copies=20), use_gate=False)
        assert few == many  # copies change neither the means nor the test
        assert r_few["listeners"] == r_many["listeners"] == n
        for label in ("arousal", "valence"):
            assert r_few[label]["ccc_gain"] == pytest.approx(r_many[label]["ccc_gain"], abs=1e-12)


def test_grid_scores_equal_one_point_at_a_time():
    """The vectorized scoring of all grid points equals the rule applied to one point at a time
    (written out here from the docstrings, with :func:`pdmer.metrics.song_metrics`).

    Includes what the one-point rule treats specially: a query song rated flat (PCC undefined), a
    held-out check of one step, a listener with no check, and a mixture of gated and kept points.
    """
    import itertools

    from pdmer.metrics import song_metrics
    from pdmer.personalize import GATE_Z, _grid_scores

    def metrics(pred, target):  # (RMSE, PCC, CCC) of one dimension, by the project's song metrics
        m = song_metrics(np.c_[pred, pred], np.c_[target, target])
        return m["rmse_arousal"], m["pcc_arousal"], m["ccc_arousal"]

    def personal(g, a, offset, scale, w, r=0.0):  # the module docstring's formula
        shape = (a - g) - (a - g).mean()
        return g.mean() + scale ** w[1] * (g - g.mean()) + w[2] * (a - g) + w[3] * shape + w[0] * offset + w[4] * r

    def keeps(c, d, w):  # gate()'s docstring: a clear fall of the squared error, no fall of the CCC
        g, y = c.generic[:, d], c.ratings[:, d]
        r = 0.0 if c.response is None else c.response[:, d]
        pc = personal(g, c.adapted[:, d], c.support.offset[d], c.support.scale[d], w, r)
        diff = (pc - y) ** 2 - (g - y) ** 2
        if len(y) < 2 or not diff.mean() + GATE_Z * diff.std(ddof=1) / np.sqrt(len(y)) < 0:
            return False
        ccc_p, ccc_g = metrics(pc, y)[2], metrics(g, y)[2]
        return bool(np.isfinite(ccc_p) and (not np.isfinite(ccc_g) or ccc_p >= ccc_g))

    rng = np.random.default_rng(3)
    parts = []
    for i in range(7):
        g_s = generic_curve(40, i)
        y_s = listener_curve(g_s, rng.normal(0, 0.3, 2), [1.5, 0.7]) + rng.normal(0, 0.1, g_s.shape)
        held = 1 if i == 1 else 15
        check = None if i == 2 else check_for(y_s[:25], y_s[-held:], g_s[:25], g_s[-held:], g_s[-held:] + 0.05)
        with_response = i % 2 == 0  # queries with and without the response curve (older parts have none)
        if check is not None and with_response:
            check.response = rng.normal(0, 0.1, check.ratings.shape)
        queries = {}
        for j in range(2):
            g = generic_curve(50, 10 * i + j)
            y = np.full_like(g, 0.2) if (i, j) == (3, 0) else g + rng.normal(0.2, 0.2, g.shape)
            queries[f"s{j}"] = (y, g, g + rng.normal(0, 0.1, g.shape))
            if with_response:
                queries[f"s{j}"] += (y - g - 0.2 + rng.normal(0, 0.05, g.shape),)
        parts.append(Parts(Support.fit(y_s, g_s), check, queries, f"l{i % 5}"))
    points = [w for w in itertools.product((0.0, 0.5, 1.0), repeat=5) if any(w)]
    kept_any, gated_any = False, False
    for d in range(2):
        got = _grid_scores(parts, d, np.array(points), use_gate=True)
        for k, w in enumerate(points):
            for i, p in enumerate(parts):
                kept = p.check is None or keeps(p.check, d, w)
                kept_any, gated_any = kept_any or kept, gated_any or not kept
                want = np.zeros(3)
                if kept:
                    c, r, q = [], [], []
                    for y, g, a, *resp in p.queries.values():
                        rg, pg, cg = metrics(g[:, d], y[:, d])
                        resp_d = resp[0][:, d] if resp else 0.0
                        rp, pp, cp = metrics(
                            personal(g[:, d], a[:, d], p.support.offset[d], p.support.scale[d], w, resp_d), y[:, d]
                        )
                        c.append(cp - cg)
                        r.append(rp - rg)
                        if np.isfinite(pp) and np.isfinite(pg):
                            q.append(pp - pg)
                    want = [np.nanmean(c) if np.isfinite(c).any() else 0.0, np.mean(r), np.mean(q) if q else 0.0]
                np.testing.assert_allclose(
                    got[k, i], want, rtol=1e-9, atol=1e-12, err_msg=f"point {w}, part {i}, dim {d}"
                )
    assert kept_any and gated_any  # both branches were exercised


def test_a_component_is_kept_only_if_it_costs_nothing_the_simpler_rule_had():
    """The listener's level carries over (offset: far lower RMSE); their support moves more than the
    generic curve only through noise, so a scale component raises CCC a little (more variance) but
    gives back RMSE the offset alone had. Against generic both pass, and offset + scale scores the
    higher objective; against the offset-only rule it is worse in RMSE, so the rule keeps the offset alone."""
    from pdmer.personalize import _dim_scores, _summary, objective

    rng = np.random.default_rng(0)
    parts = []
    for i in range(80):
        off = rng.normal(0, 0.4, 2)
        g_s, g_q = generic_curve(60, i), generic_curve(80, i + 100)
        y_s = listener_curve(g_s, off, [0.5, 0.5]) + rng.normal(0, 0.3, g_s.shape)
        y_q = listener_curve(g_q, off, [0.5, 0.5]) + rng.normal(0, 0.3, g_q.shape)
        parts.append(Parts(Support.fit(y_s, g_s), None, {"q": (y_q, g_q, g_q)}, listener=str(i)))
    w, report = choose_weights(parts, use_gate=False)
    assert w.offset == [1.0, 1.0] and w.scale == [0.0, 0.0] and w.maml == [0.0, 0.0]
    for d in range(2):
        offset_only, safe = _summary(_dim_scores(parts, d, (1.0, 0.0, 0.0, 0.0, 0.0), False))
        assert safe
        with_scale = [_summary(_dim_scores(parts, d, (1.0, s, 0.0, 0.0, 0.0), False)) for s in (0.25, 0.5)]
        assert all(ok for _, ok in with_scale)  # no worse than generic ...
        assert max(objective(s) for s, _ in with_scale) > objective(offset_only)  # ... and a higher objective
        assert all(s[1] > offset_only[1] for s, _ in with_scale)  # but worse RMSE than the offset alone


def test_cross_fitted_choice_is_not_fooled_by_the_best_of_many_candidates():
    """Every candidate raises CCC and PCC but costs RMSE 0.005 (worse: its mean must not be):
    choosing the best-looking of many on the same listeners passes one in most trials (the winner's
    curse); scored out of sample (each half by the other half's choice), the choosing procedure
    passes in few. Where the gain is real and RMSE unchanged, it is taken."""
    from pdmer.personalize import _summary, best_qualifying, cross_fit_choice

    rng = np.random.default_rng(0)
    n, trials = 60, 150
    points = [(0.0, 0.0, w) for w in np.linspace(0.025, 1.0, 40)]
    in_sample = cross_fit = 0
    for _ in range(trials):
        changes = rng.normal(0, 0.05, (len(points), n, 3)) + [0.05, 0.005, 0.05]
        in_sample += best_qualifying(changes, points) is not None
        cross_fit += any(cross_fit_choice(changes, points)[0])
    assert in_sample > 0.6 * trials
    assert cross_fit < 0.12 * trials
    real = rng.normal(0, 0.03, (len(points), n, 3)) + [0.05, -0.03, 0.05]
    w, report = cross_fit_choice(real, points)
    assert any(w) and report["cross_fitted"]["passed"] and all(any(f["weights"].values()) for f in report["folds"])
    assert _summary(real[points.index(w)])[1]


def test_repeated_splits_score_each_listener_by_the_mean_over_splits(monkeypatch):
    """``CV_REPEATS`` splits: every split scores every listener once, a listener's out-of-fold change
    is the mean over the splits; one split is the plain halves (the report unchanged)."""
    from pdmer import personalize as P

    rng = np.random.default_rng(3)
    points = [(0.0, 0.0, 0.0, 0.0, w) for w in (0.5, 1.0)]
    real = rng.normal(0, 0.03, (len(points), 30, 3)) + [0.05, -0.03, 0.05]
    _, one = P.cross_fit_choice(real, points)
    assert len(one["folds"]) == 2 and all("split" not in f for f in one["folds"])
    monkeypatch.setattr(P, "CV_REPEATS", 3)
    w, rep = P.cross_fit_choice(real, points)
    assert [f["split"] for f in rep["folds"]] == [0, 0, 1, 1, 2, 2]
    assert rep["folds"][:2] == [dict(f, split=0) for f in one["folds"]]
    expect = np.zeros((30, 3))
    for r in range(3):
        parts = P.folds(30, 2, seed=r)
        for j in range(2):  # fold j is chosen on the others and scores the next one
            check = parts[(j + 1) % 2]
            chosen = tuple(rep["folds"][2 * r + j]["weights"].values())
            if any(chosen):
                expect[check] += real[points.index(chosen)][check] / 3
    assert np.allclose(rep["cross_fitted"]["ccc_gain"], expect[:, 0].mean())
    assert any(w) and rep["cross_fitted"]["passed"]


def test_the_check_is_chosen_per_dimension_and_old_profiles_still_read():
    """Arousal levels carry over (the shift helps every listener: the check only turns some away),
    valence is noise around the generic curve: arousal goes without the check, recorded per dimension;
    weights written with one check flag for both dimensions read as before."""
    rng = np.random.default_rng(2)
    parts = []
    for i in range(80):
        g_s, g_q = generic_curve(60, i), generic_curve(80, i + 100)
        off = np.array([rng.normal(0, 0.4), 0.0])
        y_s = listener_curve(g_s, off, [1, 1]) + rng.normal(0, [0.05, 0.3], g_s.shape)
        y_q = listener_curve(g_q, off, [1, 1]) + rng.normal(0, [0.05, 0.3], g_q.shape)
        check = check_for(y_s[:40], y_s[40:], g_s[:40], g_s[40:], g_s[40:])
        parts.append(Parts(Support.fit(y_s, g_s), check, {"q": (y_q, g_q, g_q)}, listener=str(i)))
    w, report = choose_weights(parts)
    assert w.offset[0] >= 0.75 and w.gate[0] is False and report["arousal"]["check"] is False
    assert w.offset[1] == 0.0
    assert Weights.from_json({"offset": [1, 0], "gate": True}).gate == [True, True]
    assert Weights(gate=False).gate == [False, False] and Weights.from_json(w.to_json()) == w


def test_with_or_without_the_check_is_decided_out_of_sample(monkeypatch):
    """The check's choice compares the two procedures' cross-fitted objectives, not their in-sample
    scores (there the choice made with the check flattered itself more); a tie keeps the check, and
    a procedure whose audit failed counts as the generic curve (0)."""
    import pdmer.personalize as personalize

    def dim(w, in_sample, cross, passed=True):
        return {
            "weights": {"offset": w, "scale": 0.0, "maml": 0.0, "shape": 0.0, "response": 0.0},
            "ccc_gain": in_sample,
            "rmse_change": 0.0,
            "pcc_change": 0.0,
            "cross_fitted": {"ccc_gain": cross, "rmse_change": 0.0, "pcc_change": 0.0, "passed": passed},
        }

    fake = {
        True: {"arousal": dim(0.5, 0.09, 0.01), "valence": dim(0.5, 0.03, 0.02, passed=False)},
        False: {"arousal": dim(1.0, 0.05, 0.04), "valence": dim(0.0, 0.0, 0.0, passed=False)},
    }
    monkeypatch.setattr(personalize, "_choose", lambda parts, grid, gated: fake[gated])
    from types import SimpleNamespace

    parts = [SimpleNamespace(listener="a")]  # counted only: _choose is replaced
    w, report = personalize.choose_weights(parts)
    assert w.gate == [False, True] and w.offset == [1.0, 0.5]  # valence: both 0 out of sample, the check kept
    assert report["arousal"]["check"] is False and report["arousal"]["with_check"]["ccc_gain"] == 0.09


def test_the_shape_component_keeps_what_carries_over_and_drops_the_level():
    """Each listener bends the curve their own way on every song (a response that carries over), and
    their level is new on every song. The adapted model learned the bend and the support song's
    level: its full change (``maml``) moves every query by a level that is wrong there, its change
    without the level (``shape``) follows the listener. The rule takes the shape, not the level."""
    from pdmer.personalize import _dim_scores, _summary

    def bend(n, j):  # a shape of the music, the same for every listener; each scales it their own way
        return np.stack([0.15 * np.sin(np.arange(n) / 4 + j), 0.15 * np.cos(np.arange(n) / 6 + j)], 1)

    rng = np.random.default_rng(4)
    parts = []
    for i in range(80):
        k = rng.normal(0, 1, 2)  # the listener's own response, carried over
        g_s, g_q = generic_curve(60, i), generic_curve(80, i + 100)
        level_s, level_q = rng.normal(0, 0.25, 2), rng.normal(0, 0.25, 2)  # new on every song
        y_s = g_s + k * bend(60, i) + level_s + rng.normal(0, 0.05, g_s.shape)
        y_q = g_q + k * bend(80, i + 100) + level_q + rng.normal(0, 0.05, g_q.shape)
        a_q = g_q + k * bend(80, i + 100) + level_s  # what the support taught: the bend and that song's level
        parts.append(Parts(Support.fit(y_s, g_s), None, {"q": (y_q, g_q, a_q)}, listener=str(i)))
    w, report = choose_weights(parts, use_gate=False)
    for d in range(2):
        assert w.shape[d] >= 0.75 and w.maml[d] == 0.0 and w.offset[d] == 0.0, report
        (ccc, rmse, _), _ = _summary(_dim_scores(parts, d, w.of(d), False))
        full, _ = _summary(_dim_scores(parts, d, (0.0, 0.0, 1.0, 0.0, 0.0), False))
        assert ccc > 0 and rmse < 0 and full[1] > 0  # the full change raises RMSE; the shape lowers it
    assert Weights.from_json({"offset": [1, 0], "maml": [0, 1]}).shape == [0.0, 0.0]  # profiles from before it


def test_a_simpler_family_is_used_where_the_full_choice_fails_its_audit():
    """A level shift lowers everyone's RMSE; adding a shape helps one half of the listeners' PCC and
    hurts the other's. Choosing over all rules fails the cross-fitted audit (the half that gained
    picks the shape, the other half pays for it), which sent the whole dimension back to generic;
    the family of one-component rules passes, and its level shift is used."""
    from pdmer.personalize import cross_fit_choice, halves, nested_choice

    rng = np.random.default_rng(5)
    n = 60
    a, b = halves(n)
    points = [(1.0, 0.0, 0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.5, 0.0)]
    changes = np.zeros((2, n, 3))
    changes[:, :, 0] = 0.01 + rng.normal(0, 0.005, (2, n))
    changes[:, :, 1] = -0.1 + rng.normal(0, 0.01, (2, n))
    changes[1, :, 0] = changes[0, :, 0] + 0.02 + rng.normal(0, 0.002, n)
    changes[1, :, 1] = changes[0, :, 1] - 0.002  # the shape costs no RMSE
    changes[1, a, 2], changes[1, b, 2] = 0.05, -0.05
    full, report = cross_fit_choice(changes, points)
    assert not any(full) and not report["cross_fitted"]["passed"]
    w, report = nested_choice(changes, points)
    assert w == points[0] and report["components_at_most"] == 1 and report["cross_fitted"]["passed"]
    assert report["families"]["2"]["passed"] is False


def test_the_response_weight_may_undo_the_ridges_shrinkage_and_no_more():
    """The response is a prediction of its own, shrunk by its ridge: where it follows the listener at
    half their amplitude, the rule takes it past 1 (up to ``RESPONSE_GRID``'s end); where it has
    their amplitude, it takes it at 1; the other components never go past ``GRID``'s 1."""
    from pdmer.personalize import GRID, RESPONSE_GRID

    def population(amplitude: float, seed: int) -> list[Parts]:
        rng = np.random.default_rng(seed)
        parts = []
        for i in range(60):
            g_s, g_q = generic_curve(60, i), generic_curve(80, i + 100)
            t = np.arange(80)
            own = rng.normal(0, 1, 2) * np.stack([0.15 * np.sin(t / 4 + i), 0.15 * np.cos(t / 6 + i)], 1)
            y_s = g_s + rng.normal(0, 0.05, g_s.shape)
            y_q = g_q + own + rng.normal(0, 0.05, g_q.shape)
            parts.append(Parts(Support.fit(y_s, g_s), None, {"q": (y_q, g_q, g_q, amplitude * own)}, listener=str(i)))
        return parts

    shrunk, report = choose_weights(population(0.5, 0), use_gate=False)
    assert shrunk.response == [max(RESPONSE_GRID)] * 2, report
    assert report["grid"]["response"] == list(RESPONSE_GRID) and report["grid"]["offset"] == list(GRID)
    full, report = choose_weights(population(1.0, 1), use_gate=False)
    assert full.response == [1.0, 1.0], report
    for w in (shrunk, full):
        assert max(w.offset + w.scale + w.maml + w.shape) <= max(GRID)
    same, report = choose_weights(population(0.5, 0), use_gate=False, grid=GRID)  # one grid for all: as before
    assert same.response == [1.0, 1.0] and report["grid"]["response"] == list(GRID)

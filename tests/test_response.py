"""The listener's linear response to the music (pdmer.response): the safe rule's fifth component."""

import numpy as np
import pytest
import torch

from pdmer import response as R


def _song(rng, n_steps, bright):
    """Log-Mel-like patches (T, 51, 128) whose spectral tilt follows ``bright`` (T,)."""
    bands = np.linspace(-1, 1, 128)
    spec = -3 + bright[:, None] * bands[None] + 0.05 * rng.standard_normal((n_steps, 128))
    return torch.tensor(np.repeat(spec[:, None], 51, 1), dtype=torch.float16)


def test_fit_recovers_a_linear_response_and_ignores_the_level():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 3))
    beta = np.array([[0.3, -0.2], [0.0, 0.5], [-0.4, 0.1]])
    r = x @ beta + [0.7, -0.3] + 0.01 * rng.standard_normal((200, 2))  # a level of its own
    got = R.fit(x, r, lam=1e-6)
    np.testing.assert_allclose(got, beta, atol=0.01)
    assert np.abs(R.curve(x, got).mean(0)).max() < 1e-12  # the response has no level: the offset's to carry
    # shrinkage: a larger penalty pulls beta toward 0
    assert np.linalg.norm(R.fit(x, r, lam=10.0)) < 0.2 * np.linalg.norm(got)


def test_too_short_or_broken_support_fits_nothing():
    x = np.ones((R.MIN_SUPPORT_STEPS - 1, 4))
    assert not R.fit(x, np.ones((len(x), 2))).any()
    x = np.random.default_rng(1).standard_normal((30, 4))
    r = np.zeros((30, 2))
    r[3, 0] = np.nan
    assert not R.fit(x, r).any()
    with pytest.raises(ValueError, match="steps"):
        R.fit(x, np.zeros((29, 2)))
    with pytest.raises(ValueError, match="outside"):
        R.span(x, 20, 31)


def test_smoothing_is_causal_and_starts_at_the_first_value():
    x = np.zeros((20, 1))
    x[10:] = 1.0
    y = R._smooth(x, 3.0)
    assert (y[:10] == 0).all() and 0 < y[10, 0] < y[15, 0] < 1  # nothing before the step, then a rise
    np.testing.assert_allclose(R._smooth(np.full((5, 2), 2.0), 3.0), 2.0)
    lagged = R._lag(np.arange(6.0)[:, None], 2)
    np.testing.assert_array_equal(lagged[:, 0], [0, 0, 0, 1, 2, 3])


def test_a_listener_who_follows_the_timbre_is_followed_on_another_song():
    """A listener whose valence rises with brightness (the generic curve knows nothing of it): the
    response fitted on one song predicts their curve's shape on another song, with the spectra only."""
    rng = np.random.default_rng(2)
    train = [_song(rng, 120, np.sin(np.arange(120) / (5 + i))) for i in range(6)]
    basis = R.ResponseBasis.fit([R.step_spectra(s) for s in train])
    b_sup, b_query = np.sin(np.arange(90) / 6.0), np.cos(np.arange(90) / 9.0)
    sup, query = _song(rng, 90, b_sup), _song(rng, 90, b_query)
    lagged = np.r_[np.zeros(1), b_sup[:-1]]  # the listener reacts a step late

    ratings = np.c_[0.05 * rng.standard_normal(90), 0.4 * lagged + 0.2 + 0.05 * rng.standard_normal(90)]
    beta = R.fit_songs([basis.design(sup)], [ratings])  # the generic curve: 0
    pred = R.curve(basis.design(query), beta)
    truth = 0.4 * np.r_[np.zeros(1), b_query[:-1]]
    assert np.corrcoef(pred[:, 1], truth)[0, 1] > 0.8
    assert np.abs(pred[:, 0]).max() < 0.2 * np.abs(pred[:, 1]).max()  # arousal did not follow: little there

    # a listener whose ratings are noise: a far weaker response (the safe rule's weight decides the rest)
    noise = R.fit_songs([basis.design(sup)], [0.05 * rng.standard_normal((90, 2))])
    assert np.abs(R.curve(basis.design(query), noise)).max() < 0.3 * np.abs(pred[:, 1]).max()


def test_basis_round_trips_and_rejects_a_broken_record():
    rng = np.random.default_rng(3)
    basis = R.ResponseBasis.fit([rng.standard_normal((50, 16)) for _ in range(3)])
    assert basis.axes.shape == (R.K, 16)
    z = (np.concatenate([rng.standard_normal((50, 16))]) - basis.mean) @ basis.axes.T
    assert z.shape == (50, R.K)
    again = R.ResponseBasis.from_json(basis.to_json())
    np.testing.assert_array_equal(again.axes, basis.axes)
    song = torch.tensor(rng.standard_normal((40, 51, 16)), dtype=torch.float16)
    np.testing.assert_array_equal(again.design(song), basis.design(song))
    assert basis.design(song) is basis.design(song)  # cached per song
    bad = basis.to_json()
    bad["axes"] = [row[:-1] for row in bad["axes"]]
    with pytest.raises(ValueError, match="axes"):
        R.ResponseBasis.from_json(bad)
    bad = basis.to_json()
    bad["axes"][0][0] = float("nan")
    with pytest.raises(ValueError):
        R.ResponseBasis.from_json(bad)


def _listening_study(rng, carry: bool, n_listeners: int = 40, n_songs: int = 12, songs_each: int = 4):
    """Songs whose timbre (spectral tilt) and register (a band's bump) move independently, and listeners
    whose residual follows them with personal weights: the same on every song (``carry``) or fresh per
    song. Returns (song id -> log-Mel patches, curves)."""
    from pdmer.data.types import Curve

    bands = np.linspace(-1, 1, 128)
    bump = np.exp(-0.5 * ((bands - 0.3) / 0.1) ** 2)
    local, drive = {}, {}
    for s in range(n_songs):
        t = np.arange(90)
        tilt, reg = np.sin(t / (4 + s) + s), np.cos(t / (7 + 0.5 * s) + 2 * s)
        spec = -3 + tilt[:, None] * bands + reg[:, None] * bump + 0.05 * rng.standard_normal((90, 128))
        local[f"s{s}"] = torch.tensor(np.repeat(spec[:, None], 51, 1), dtype=torch.float16)
        drive[f"s{s}"] = np.c_[tilt, reg]
    curves = []
    for a in range(n_listeners):
        w = rng.standard_normal(2) * 0.3
        for s in rng.choice(n_songs, songs_each, replace=False):
            ws = w if carry else rng.standard_normal(2) * 0.3
            y = drive[f"s{s}"] * ws + rng.uniform(-0.3, 0.3, 2) + 0.05 * rng.standard_normal((90, 2))
            curves.append(Curve(f"s{s}", f"a{a}", 0, y))
    return local, curves


def test_learned_directions_follow_what_carries_over_between_songs(monkeypatch):
    """Listeners' arousal follows the timbre and their valence the register, each with a weight of their
    own that carries over: the learned basis finds it, and the response fitted on one song of a new
    listener predicts their curve's shape on another song; where the weights are fresh on every song,
    nothing is learned and the component adds nothing."""
    monkeypatch.setattr(R, "LEARN_STEPS", 150)
    rng = np.random.default_rng(4)
    local, curves = _listening_study(rng, carry=True)
    basis = R.ResponseBasis.learn(local, curves, seed=0)
    assert basis.carries and basis.report["learned"] == "yes" and basis.report["held_out_change"] < 0
    assert basis.design(local["s0"]).shape == (90, 2, R.K_LEARN * len(R.LAGS))
    # a new listener: arousal against the timbre, valence with the register
    sup, query = local["s1"], local["s5"]
    tilt = lambda x: np.polyfit(np.linspace(-1, 1, 128), x.float().numpy().mean(1).T, 1)[0]  # noqa: E731
    bands = np.linspace(-1, 1, 128)
    bump = np.exp(-0.5 * ((bands - 0.3) / 0.1) ** 2)
    reg = lambda x: (x.float().numpy().mean(1) - (-3)) @ bump / (bump @ bump)  # noqa: E731
    truth_s = np.c_[-0.4 * tilt(sup), 0.4 * reg(sup)]
    beta = R.fit_songs([basis.design(sup)], [truth_s + 0.02 * rng.standard_normal((90, 2))])
    pred = R.curve(basis.design(query), beta)
    truth_q = np.c_[-0.4 * tilt(query), 0.4 * reg(query)]
    for d in range(2):
        assert np.corrcoef(pred[:, d], truth_q[:, d])[0, 1] > 0.7

    fresh = R.ResponseBasis.learn(*_listening_study(np.random.default_rng(5), carry=False), seed=0)
    assert not fresh.carries and fresh.report["learned"].startswith("no")
    assert not R.curve(fresh.design(query), R.fit_songs([fresh.design(sup)], [truth_s])).any()


def test_too_few_listeners_keep_the_unlearned_axes_and_records_round_trip(monkeypatch):
    monkeypatch.setattr(R, "LEARN_STEPS", 25)
    local, curves = _listening_study(np.random.default_rng(6), carry=True, n_listeners=R.MIN_LEARN_LISTENERS - 1)
    basis = R.ResponseBasis.learn(local, curves)
    assert basis.report["learned"].startswith("no:") and basis.carries  # the first axes, unlearned
    again = R.ResponseBasis.from_json(basis.to_json())
    np.testing.assert_array_equal(again.design(local["s0"]), basis.design(local["s0"]))
    assert again.report == basis.report
    # a record of the earlier form (one set of axes of the mean log-Mel) still loads and applies
    old = R.ResponseBasis.fit([R.step_spectra(x) for x in local.values()]).to_json()
    for key in ("views", "report"):
        old.pop(key)
    design = R.ResponseBasis.from_json(old).design(local["s0"])
    assert design.shape == (90, R.K * len(R.LAGS))
    with pytest.raises(ValueError, match="features per step"):  # a song of another Mel resolution
        basis.design(local["s0"][:, :, :64])
    bad = basis.to_json()
    bad["views"] = "chroma"
    with pytest.raises(ValueError, match="views"):
        R.ResponseBasis.from_json(bad)


def test_fit_per_dimension_uses_each_dimensions_own_design():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((200, 2, 3))
    beta = np.array([[0.3, -0.2], [0.0, 0.5], [-0.4, 0.1]])
    r = np.einsum("tdp,pd->td", x, beta) + [0.7, -0.3] + 0.01 * rng.standard_normal((200, 2))
    got = R.fit(x, r, lam=1e-6)
    np.testing.assert_allclose(got, beta, atol=0.01)
    assert np.abs(R.curve(x, got).mean(0)).max() < 1e-12
    # the same design for both dimensions gives the shared fit
    shared = rng.standard_normal((200, 3))
    np.testing.assert_allclose(R.fit(np.stack([shared, shared], 1), r), R.fit(shared, r), atol=1e-12)

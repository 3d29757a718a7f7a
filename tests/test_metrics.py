"""Metrics against numpy/scipy, and the training loss against the metric definitions."""

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr

from pdmer.metrics import attention_loss, average, batch_terms, emotion_loss, song_metrics


def ccc_reference(p, t):
    # Lin (1989), population moments
    return 2 * np.cov(p, t, bias=True)[0, 1] / (p.var() + t.var() + (p.mean() - t.mean()) ** 2)


def test_song_metrics_against_numpy_scipy():
    rng = np.random.default_rng(0)
    t = rng.normal(size=(80, 2))
    p = 0.6 * t + rng.normal(scale=0.5, size=(80, 2)) + 0.2
    m = song_metrics(p, t)
    for c, label in enumerate(("arousal", "valence")):
        assert m[f"rmse_{label}"] == pytest.approx(np.sqrt(np.mean((p[:, c] - t[:, c]) ** 2)))
        assert m[f"pcc_{label}"] == pytest.approx(pearsonr(p[:, c], t[:, c])[0])
        assert m[f"ccc_{label}"] == pytest.approx(ccc_reference(p[:, c], t[:, c]))


def test_perfect_and_constant_predictions():
    t = np.stack([np.linspace(-1, 1, 30), np.sin(np.arange(30))], 1)
    m = song_metrics(t, t)
    assert m["ccc_arousal"] == pytest.approx(1) and m["rmse_valence"] == pytest.approx(0)
    m = song_metrics(np.zeros_like(t), t)
    assert np.isnan(m["pcc_arousal"]) and m["ccc_arousal"] == pytest.approx(0)


def test_average_is_per_song_not_pooled():
    a = song_metrics(np.c_[[0.0, 1, 0, 1], [0.0, 1, 0, 1]], np.c_[[0.0, 1, 0, 1], [0.0, 1, 0, 1]])
    b = song_metrics(np.c_[[0.0, 1, 0, 1], [0.0, 1, 0, 1]], np.c_[[1.0, 0, 1, 0], [1.0, 0, 1, 0]])
    avg = average([a, b])
    assert avg["pcc_arousal"] == pytest.approx(0.0)  # (1 + -1) / 2
    assert avg["n_songs"] == 2 and avg["ccc_mean"] == pytest.approx((avg["ccc_arousal"] + avg["ccc_valence"]) / 2)


def test_batch_terms_match_song_metrics():
    rng = np.random.default_rng(1)
    t = rng.normal(size=(3, 40, 2))
    p = t + rng.normal(scale=0.7, size=t.shape)
    terms = batch_terms(torch.tensor(p), torch.tensor(t), eps=0)
    for b in range(3):
        m = song_metrics(p[b], t[b])
        for c, label in enumerate(("arousal", "valence")):
            for k in ("rmse", "pcc", "ccc"):
                assert terms[k][b, c].item() == pytest.approx(m[f"{k}_{label}"], rel=1e-6)


def test_emotion_loss_definition():
    rng = np.random.default_rng(2)
    t = torch.tensor(rng.normal(size=(2, 30, 2)))
    p = torch.tensor(rng.normal(size=(2, 30, 2)))
    terms = batch_terms(p, t)
    expected = 1 - torch.stack([terms["ccc"], terms["pcc"], 1 - terms["rmse"]]).mean()
    torch.testing.assert_close(emotion_loss(p, t), expected)
    assert emotion_loss(t, t).item() == pytest.approx(0, abs=1e-4)  # eps inside the RMSE square root


def test_attention_loss_targets():
    T = 5
    local = torch.eye(T).expand(2, T, T) * 0.9
    glob = torch.eye(T).expand(2, T, T) * 0.1
    assert attention_loss(local, glob).item() == pytest.approx(0)
    assert attention_loss(torch.zeros(1, T, T), None).item() == pytest.approx(0.81)

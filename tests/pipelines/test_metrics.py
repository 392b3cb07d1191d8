"""Evaluation metrics and early stopping."""

import math

import numpy as np
import pytest

from pipelines.metrics import EarlyStopping, MetricAccumulator


def test_classifier_metrics_match_hand_computed_macro_averages():
    acc = MetricAccumulator("mlp_classifier", n_classes=3)
    y = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    logits = np.eye(3, dtype=np.float32)[pred]
    # split over two batches: the result is of the whole split
    acc.add({"loss": 1.0, "logits": logits[:4]}, {"y": y[:4]})
    acc.add({"loss": 2.0, "logits": logits[4:]}, {"y": y[4:]})
    r = acc.result()
    assert r["loss"] == pytest.approx((4 * 1.0 + 2 * 2.0) / 6)
    assert r["accuracy"] == pytest.approx(4 / 6)
    prec = [1 / 2, 2 / 3, 1.0]
    rec = [1 / 2, 1.0, 1 / 2]
    f1 = [2 * p * q / (p + q) for p, q in zip(prec, rec, strict=True)]
    assert r["precision"] == pytest.approx(np.mean(prec))
    assert r["recall"] == pytest.approx(np.mean(rec))
    assert r["macro_f1"] == pytest.approx(np.mean(f1))


def test_language_model_perplexity_is_exp_of_the_token_loss():
    acc = MetricAccumulator("char_transformer")
    y = np.array([[1, 2], [0, 1]])
    logits = np.zeros((2, 2, 3), np.float32)
    logits[0, 0, 1] = logits[0, 1, 0] = logits[1, 0, 0] = logits[1, 1, 1] = 5.0
    acc.add({"loss": 0.5, "logits": logits}, {"y": y})
    r = acc.result()
    assert r["perplexity"] == pytest.approx(math.exp(0.5))
    assert r["accuracy"] == pytest.approx(3 / 4)


def test_regression_metrics():
    # errors 0, 0.5, 0, 2 (so MSE != MAE) in two batches; the loss passed in is the
    # model's own (it may carry regularisation), not the metric
    acc = MetricAccumulator("mlp_regressor")
    y = np.array([[1.0], [2.0], [3.0], [4.0]], np.float32)
    p = np.array([[1.0], [2.5], [3.0], [6.0]], np.float32)
    acc.add({"loss": 0.7, "predictions": p[:2]}, {"y": y[:2]})
    acc.add({"loss": 0.7, "predictions": p[2:]}, {"y": y[2:]})
    r = acc.result()
    assert r["mse"] == pytest.approx((0.25 + 4.0) / 4) and r["mae"] == pytest.approx(2.5 / 4)
    assert r["r2"] == pytest.approx(1 - 4.25 / 5.0)  # 5.0: sum of (y - mean y)^2


def test_triplet_accuracy_counts_positives_closer_than_negatives():
    acc = MetricAccumulator("triplet_embedder")
    a = np.zeros((2, 2))
    acc.add(
        {
            "loss": 0.1,
            "anchor": a,
            "positive": np.array([[0.1, 0], [2, 0]]),
            "negative": np.array([[1.0, 0], [1, 0]]),
        },
        {},
    )
    assert acc.result()["accuracy"] == 0.5


def test_early_stopping_waits_patience_evaluations_without_improvement():
    es = EarlyStopping("loss", patience=2, mode="min", min_delta=0.01)
    assert [es.update(v) for v in (1.0, 0.9, 0.895, 0.95)] == [False, False, False, True]
    assert es.best == 0.9
    up = EarlyStopping("accuracy", patience=1, mode="max")
    assert [up.update(v) for v in (0.5, 0.6, 0.6)] == [False, False, True]
    never = EarlyStopping("loss", patience=0)
    assert not any(never.update(1.0) for _ in range(10))

"""Each GLUE metric against values worked out by hand."""

import math

import numpy as np
import pytest

from mlm.eval.metrics import METRICS, compute_metrics


def test_accuracy():
    assert METRICS["accuracy"](np.array([1, 0, 1, 1]), np.array([1, 0, 0, 1])) == 0.75


def test_f1_is_binary_f1_of_class_1():
    # TP=2, FP=1, FN=0 -> precision 2/3, recall 1 -> F1 = 0.8
    assert METRICS["f1"](np.array([1, 0, 1, 1]), np.array([1, 0, 0, 1])) == pytest.approx(0.8)
    # class 0 is not the positive class: all-zero predictions have F1 0, not 1
    assert METRICS["f1"](np.array([0, 0]), np.array([0, 0])) == 0.0


def test_macro_f1():
    # class 0: F1 1; class 1: P 1, R 1/2 -> 2/3; class 2: P 1/2, R 1 -> 2/3
    assert METRICS["macro_f1"](np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2])) == pytest.approx((1 + 4 / 3) / 3)


def test_mcc():
    # TP=2, TN=1, FP=1, FN=0 -> (2*1 - 1*0) / sqrt(3*2*2*1)
    assert METRICS["mcc"](np.array([1, 0, 1, 1]), np.array([1, 0, 0, 1])) == pytest.approx(2 / math.sqrt(12))
    assert METRICS["mcc"](np.array([1, 1, 1, 1]), np.array([1, 0, 0, 1])) == 0.0  # one class predicted


def test_pearson():
    # dx = (-1.5, -.5, .5, 1.5), dy = (-3.25, -1.25, .75, 3.75): r = 11.5 / sqrt(5 * 26.75)
    r = METRICS["pearson"](np.array([1.0, 2, 3, 4]), np.array([2.0, 4, 6, 9]))
    assert r == pytest.approx(11.5 / math.sqrt(5 * 26.75))


def test_spearman():
    # rank differences (-3, -1, 2, 2): rho = 1 - 6 * 18 / (4 * 15) = -0.8
    assert METRICS["spearman"](np.array([1.0, 2, 3, 4]), np.array([4.0, 3, 1, 2])) == pytest.approx(-0.8)


def test_constant_predictions_have_zero_correlation_not_nan():
    assert METRICS["pearson"](np.array([2.0, 2, 2]), np.array([1.0, 2, 3])) == 0.0
    assert METRICS["spearman"](np.array([2.0, 2, 2]), np.array([1.0, 2, 3])) == 0.0


def test_compute_metrics_names():
    out = compute_metrics(("f1", "accuracy"), [1, 0], [1, 1])
    assert list(out) == ["f1", "accuracy"] and out["accuracy"] == 0.5 and out["f1"] == pytest.approx(2 / 3)

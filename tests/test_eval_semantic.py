"""Semantic mIoU against a hand-worked confusion matrix."""

import math

import numpy as np
import pytest

from dknet_jax.eval import SemanticEvaluator, confusion_matrix, iou_from_confusion


def test_hand_worked_miou_over_two_scenes():
    ev = SemanticEvaluator(num_classes=3, class_names=["a", "b", "c"])
    # scene 1: the ignored point (GT -100, predicted 0) counts nowhere
    ev.add(pred=[0, 1, 1, 1, 0], gt=[0, 0, 1, 1, -100])
    # scene 2: one more point of class 1 predicted right
    ev.add(pred=np.array([1]), gt=np.array([1]))
    # class a: TP 1, FN 1 (-> b), FP 0 -> 1/2; class b: TP 3, FP 1 -> 3/4; class c: absent
    # -> NaN, left out: mIoU = (1/2 + 3/4) / 2 = 5/8; accuracy 4/5
    res = ev.compute()
    assert res["classes"]["a"] == pytest.approx(0.5)
    assert res["classes"]["b"] == pytest.approx(0.75)
    assert math.isnan(res["classes"]["c"])
    assert res["miou"] == pytest.approx(5 / 8)
    assert res["acc"] == pytest.approx(4 / 5)


def test_confusion_layout_and_absent_class():
    conf = confusion_matrix([2, 2, 0], [0, 2, 0], num_classes=3)
    np.testing.assert_array_equal(conf, [[1, 0, 1], [0, 0, 0], [0, 0, 1]])
    # class 2: TP 1, FP 1 -> 1/2; class 0: TP 1, FN 1 -> 1/2; class 1 NaN
    iou = iou_from_confusion(conf)
    np.testing.assert_allclose(iou[[0, 2]], [0.5, 0.5])
    assert math.isnan(iou[1])
    # a class only predicted (never in GT) has IoU 0, not NaN
    assert iou_from_confusion(confusion_matrix([1], [0], 2))[1] == 0.0


def test_scannet_default_and_bad_labels():
    ev = SemanticEvaluator()
    assert ev.class_names[0] == "wall" and len(ev.class_names) == 20
    with pytest.raises(ValueError, match="pred labels must be 0..19"):
        ev.add([20], [1])
    with pytest.raises(ValueError, match="one label per point"):
        ev.add([1, 2], [1])

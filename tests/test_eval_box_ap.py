"""Box AP from masks against hand-worked VOC-style examples (VoteNet protocol)."""

import math

import numpy as np
import pytest

from dknet_jax.eval import BoxAPEvaluator, box_iou_3d, boxes_from_masks, voc_ap
from dknet_jax.eval.box_ap import instance_boxes

A = [0, 0, 0, 1, 1, 1]
B = [5, 5, 5, 6, 6, 6]


def test_boxes_from_masks_and_iou():
    xyz = np.array([[0, 0, 0], [1, 2, 3], [-1, 5, 0.5], [9, 9, 9]], np.float32)
    boxes = boxes_from_masks(xyz, [[1, 1, 1, 0], [0, 0, 0, 1]])
    np.testing.assert_allclose(boxes, [[-1, 0, 0, 1, 5, 3], [9, 9, 9, 9, 9, 9]])
    with pytest.raises(ValueError, match="empty"):
        boxes_from_masks(xyz, [[0, 0, 0, 0]])
    # unit cube vs [0.5,1.5]x[0,1]x[0,1]: inter 0.5, union 1.5 -> 1/3; disjoint -> 0
    np.testing.assert_allclose(box_iou_3d([A], [[0.5, 0, 0, 1.5, 1, 1], B]), [[1 / 3, 0]])
    b, lab = instance_boxes(xyz, [3, 3, -100, 7], [2, 2, 0, 4])
    np.testing.assert_allclose(b, [[0, 0, 0, 1, 2, 3], [9, 9, 9, 9, 9, 9]])
    np.testing.assert_array_equal(lab, [2, 4])


def test_voc_ap_envelope():
    # recall .5 .5 1, precision 1 .5 2/3 -> envelope 1, 2/3: .5*1 + .5*2/3
    assert voc_ap([0.5, 0.5, 1.0], [1.0, 0.5, 2 / 3]) == pytest.approx(0.5 + 1 / 3)


def test_hand_worked_box_ap():
    ev = BoxAPEvaluator(num_classes=3, class_names=["x", "y", "z"])
    # class x: GT A and B. p1 = A (0.9) TP; p3 = A again (0.85) -> its best GT A is taken:
    # FP; p2 = B stretched to z in [5, 7] (0.8): IoU 1/2 -> TP at 0.25 and at 0.5 (>=).
    # Ranked tp = 1 0 1 -> recall .5 .5 1, precision 1 .5 2/3 -> AP = .5 + .5 * 2/3 = 5/6
    # class y: predicted, no GT -> NaN; class z: GT, no prediction -> 0
    ev.add_scene(
        gt_boxes=[A, B, A],
        gt_labels=[0, 0, 2],
        pred_boxes=[A, [5, 5, 5, 6, 6, 7], A, B],
        pred_labels=[0, 0, 0, 1],
        pred_scores=[0.9, 0.8, 0.85, 0.99],
    )
    res = ev.compute()
    assert res["classes"]["x"]["ap_25"] == pytest.approx(5 / 6)
    assert res["classes"]["x"]["ap_50"] == pytest.approx(5 / 6)
    assert math.isnan(res["classes"]["y"]["ap_50"])
    assert res["classes"]["z"]["ap_25"] == 0.0
    assert res["map_25"] == pytest.approx(5 / 12) and res["map_50"] == pytest.approx(5 / 12)


def test_matching_is_per_scene_and_below_threshold_is_fp():
    ev = BoxAPEvaluator(num_classes=1)
    # scene 1: GT A; scene 2: prediction A (0.9) has no GT in its scene -> FP;
    # scene 1: prediction [0,0,0,1,1,3] (0.5): IoU 1/3 -> TP at 0.25, FP at 0.5
    ev.add_scene([A], [0], [[0, 0, 0, 1, 1, 3]], [0], [0.5])
    ev.add_scene(np.zeros((0, 6)), [], [A], [0], [0.9])
    res = ev.compute()
    # 0.25: tp = 0 1 -> recall 0 1, precision 0 1/2 -> envelope .5 on (0, 1]: AP 0.5
    assert res["classes"]["0"]["ap_25"] == pytest.approx(0.5)
    assert res["classes"]["0"]["ap_50"] == 0.0


def test_add_scene_from_masks():
    xyz = np.array([[0, 0, 0], [1, 1, 1], [5, 5, 5], [6, 6, 6]], float)
    ev = BoxAPEvaluator(num_classes=1)
    ev.add_scene_from_masks(xyz, [[1, 1, 0, 0], [0, 0, 1, 1]], [0, 0], [[1, 1, 0, 0]], [0], [0.7])
    # one of two GT found at precision 1: AP 0.5
    assert ev.compute()["map_50"] == pytest.approx(0.5)

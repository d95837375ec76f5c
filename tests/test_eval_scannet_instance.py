"""ScanNet instance AP against hand-worked examples of the benchmark protocol.

Every expected number is worked out by hand in the comments from the protocol text
(docs/contracts.md section 6): AP = sum_i P_i * (R_{i-1} - R_{i+1}) / 2 over the distinct
scores in ascending order plus an artificial point (R=0, P=1), R_{-1} := R_0, R past the
end := 0.
"""

import math

import numpy as np
import pytest

from dknet_jax.eval import (
    ScanNetInstanceEvaluator,
    format_table,
    gt_ids_from_labels,
    instance_class_to_nyu40,
    results_to_json,
    semantic_to_nyu40,
)
from dknet_jax.eval.scannet_instance import MAP_OVERLAPS, OVERLAPS, ap_from_curve

CHAIR, SOFA, TABLE = 5, 6, 7  # nyu40 ids
N = 1000


def gt_scene():
    """chair 5001 on [0, 200), table 7001 on [200, 400), unannotated (0) on [400, 1000)."""
    gt = np.zeros(N, np.int64)
    gt[0:200] = CHAIR * 1000 + 1
    gt[200:400] = TABLE * 1000 + 1
    return gt


def mask(*ranges):
    m = np.zeros(N, bool)
    for a, b in ranges:
        m[a:b] = True
    return m


def evaluate(gt, preds):
    """preds: list of (mask, nyu40 label, score). Returns (results, ap matrix [18, 10])."""
    ev = ScanNetInstanceEvaluator()
    ev.add_scene(
        gt,
        np.array([p[0] for p in preds]).reshape(len(preds), len(gt)),
        [p[1] for p in preds],
        [p[2] for p in preds],
    )
    return ev.compute(), ev.compute_ap_matrix()


def test_thresholds_are_the_scripts_floats():
    assert OVERLAPS.size == 10 and MAP_OVERLAPS.size == 9
    np.testing.assert_array_equal(OVERLAPS[:9], np.arange(0.5, 0.95, 0.05))
    assert OVERLAPS[-1] == 0.25 and MAP_OVERLAPS[-1] < 0.95


def test_ap_from_curve_hand_cases():
    # one TP (0.9): point (P=1, R=1) + (1, 0): AP = 1*(1-0)/2 + 1*(1-0)/2 = 1
    assert ap_from_curve([1], [0.9], 0) == pytest.approx(1.0)
    # TP 0.9, FP 0.5: points u=0.5 (P=.5,R=1), u=0.9 (1,1), (1,0); steps 0, .5, .5 -> 1.0
    assert ap_from_curve([1, 0], [0.9, 0.5], 0) == pytest.approx(1.0)
    # FP above TP: u=0.9 (P=.5,R=1), u=0.95 (0,0), (1,0); steps .5, .5, 0 -> 0.25
    # (no precision envelope: VOC would say 0.5)
    assert ap_from_curve([1, 0], [0.9, 0.95], 0) == pytest.approx(0.25)
    # one TP, one missed GT: (P=1, R=.5), (1, 0); steps .25, .25 -> 0.5
    assert ap_from_curve([1], [0.8], 1) == pytest.approx(0.5)
    # tie TP/FP at 0.5: one point (P=.5, R=1), (1, 0): .5*.5 + 1*.5 = 0.75, either order
    assert ap_from_curve([1, 0], [0.5, 0.5], 0) == pytest.approx(0.75)
    assert ap_from_curve([0, 1], [0.5, 0.5], 0) == pytest.approx(0.75)
    assert ap_from_curve([], [], 3) == 0.0  # empty curve guarded


def test_perfect_prediction_and_nan_for_classes_without_gt():
    res, ap = evaluate(gt_scene(), [(mask((0, 200)), CHAIR, 0.9), (mask((200, 400)), TABLE, 0.8)])
    assert res["classes"]["chair"] == {"ap": 1.0, "ap50%": 1.0, "ap25%": 1.0}
    assert res["classes"]["table"]["ap"] == 1.0
    assert math.isnan(res["classes"]["sofa"]["ap"]) and math.isnan(res["classes"]["bed"]["ap50%"])
    assert res["all_ap"] == 1.0 and res["all_ap_50%"] == 1.0 and res["all_ap_25%"] == 1.0
    assert np.isnan(ap).sum() == 16 * 10


def test_no_predictions_gives_zero():
    res, _ = evaluate(gt_scene(), [])
    assert res["classes"]["chair"]["ap"] == 0.0 and res["classes"]["table"]["ap25%"] == 0.0
    assert res["all_ap"] == 0.0
    assert math.isnan(res["classes"]["sofa"]["ap"])


def test_prediction_of_class_without_gt_is_nan_and_left_out_of_mean():
    # sofa predicted, no sofa GT anywhere: NaN; mean over chair (1) and table (0)
    res, _ = evaluate(gt_scene(), [(mask((0, 200)), CHAIR, 0.9), (mask((400, 600)), SOFA, 0.99)])
    assert math.isnan(res["classes"]["sofa"]["ap"])
    assert res["all_ap"] == pytest.approx(0.5)  # chair 1, table 0 (GT, no prediction)


def test_tiny_gt_and_tiny_predictions():
    gt = gt_scene()
    gt[600:699] = SOFA * 1000 + 1  # 99 vertices: ignored GT -> sofa has no GT -> NaN
    res, _ = evaluate(gt, [(mask((600, 699)), SOFA, 0.9)])
    assert math.isnan(res["classes"]["sofa"]["ap"])
    # a 99-vertex chair prediction on table area (conf 0.95 > the TP's 0.9) is dropped: AP 1
    res, _ = evaluate(gt, [(mask((0, 200)), CHAIR, 0.9), (mask((200, 299)), CHAIR, 0.95)])
    assert res["classes"]["chair"]["ap"] == 1.0
    # with 100 vertices it counts, and other-class area is not ignored: FP above TP -> 0.25
    res, _ = evaluate(gt, [(mask((0, 200)), CHAIR, 0.9), (mask((200, 300)), CHAIR, 0.95)])
    assert res["classes"]["chair"]["ap"] == pytest.approx(0.25)


def test_duplicate_predictions_tp_takes_the_highest_score():
    # p1 (0.6) is first in file order and used; duplicate p2 (0.9) becomes the FP but the
    # TP takes max(0.6, 0.9) and the FP min: TP 0.9, FP 0.6 -> AP 1.0 (not 0.25)
    res, _ = evaluate(gt_scene(), [(mask((0, 200)), CHAIR, 0.6), (mask((0, 200)), CHAIR, 0.9)])
    assert res["classes"]["chair"] == {"ap": 1.0, "ap50%": 1.0, "ap25%": 1.0}


@pytest.mark.parametrize("order", [0, 1])
def test_confidence_ties(order):
    # TP and an FP (100 vertices on table) with equal scores: AP 0.75 in either file order
    preds = [(mask((0, 200)), CHAIR, 0.5), (mask((200, 300)), CHAIR, 0.5)]
    res, _ = evaluate(gt_scene(), preds[::-1] if order else preds)
    assert res["classes"]["chair"]["ap"] == pytest.approx(0.75)


def test_strict_iou_boundary():
    # 100 of the chair's 200 vertices: IoU exactly 0.5 -> no match at 0.50 (the prediction
    # is a FP there, the GT missed: AP 0), a match at 0.25 (AP 1)
    res, ap = evaluate(gt_scene(), [(mask((0, 100)), CHAIR, 0.9)])
    assert res["classes"]["chair"] == {"ap": 0.0, "ap50%": 0.0, "ap25%": 1.0}
    # GT of 250, prediction 150 inside: IoU 0.6 matches at 0.50 and 0.55 only -> AP 2/9
    gt = gt_scene()
    gt[400:450] = CHAIR * 1000 + 1
    res, ap = evaluate(gt, [(mask((0, 150)), CHAIR, 0.9)])
    np.testing.assert_array_equal(ap[2, :9], [1, 1, 0, 0, 0, 0, 0, 0, 0])
    assert res["classes"]["chair"]["ap"] == pytest.approx(2 / 9)


def test_void_share_ignores_unmatched_predictions_with_tie_as_false_positive():
    gt = gt_scene()
    tp = (mask((0, 200)), CHAIR, 0.9)
    # FP candidate (0.95): 120 unannotated + 80 table vertices -> void share 0.6.
    # Ignored where 0.6 > th: 0.50, 0.55 and 0.25 (AP 1); FP from 0.6000000000000001 on
    # (0.6 <= th) above the TP: AP 0.25. mAP = (2 * 1 + 7 * 0.25) / 9.
    res, _ = evaluate(gt, [tp, (mask((400, 520), (300, 380)), CHAIR, 0.95)])
    assert res["classes"]["chair"]["ap"] == pytest.approx((2 + 7 * 0.25) / 9)
    assert res["classes"]["chair"]["ap50%"] == 1.0 and res["classes"]["chair"]["ap25%"] == 1.0
    # void share exactly 0.5 (100 unannotated + 100 table): a tie at 0.50 is a FP -> 0.25
    res, _ = evaluate(gt, [tp, (mask((400, 500), (300, 400)), CHAIR, 0.95)])
    assert res["classes"]["chair"] == {"ap": 0.25, "ap50%": 0.25, "ap25%": 1.0}
    # small same-class GT counts as ignorable: 60 void + 50 on a 50-vertex chair + 90 on
    # table = share 0.55 (IoU with the small chair 50/200 = 0.25, never > th). Ignored at
    # 0.50 and 0.25, a tie (FP) at 0.55 and FP above: AP (1 + 8 * 0.25) / 9.
    gt[600:650] = CHAIR * 1000 + 2
    res, ap = evaluate(gt, [tp, (mask((400, 460), (600, 650), (300, 390)), CHAIR, 0.95)])
    np.testing.assert_allclose(ap[2], [1] + [0.25] * 8 + [1])
    # the same prediction on other-class area instead of the small chair: share 0.3 -> FP
    # at every mAP threshold, ignored at 0.25
    gt[600:650] = TABLE * 1000 + 2
    res, ap = evaluate(gt, [tp, (mask((400, 460), (600, 650), (300, 390)), CHAIR, 0.95)])
    np.testing.assert_allclose(ap[2], [0.25] * 9 + [1])


def test_gt_first_greedy_matching_order():
    gt = gt_scene()
    gt[400:600] = CHAIR * 1000 + 2  # second chair g2
    # P (0.9): 100 of g1 + 100 of g2 -> IoU 1/3 with each; Q (0.5): all of g1, after P.
    preds = [(mask((0, 100), (400, 500)), CHAIR, 0.9), (mask((0, 200)), CHAIR, 0.5)]
    res, ap = evaluate(gt, preds)
    # at 0.25: g1 takes P (first unused above th) with Q as its duplicate (TP 0.9, FP 0.5);
    # g2 only overlaps the used P -> missed. Points u=.5 (P=.5, R=.5), u=.9 (1, .5), (1, 0):
    # steps 0, .25, .25 -> AP25 = 0.5 (an optimal assignment would give 1)
    assert res["classes"]["chair"]["ap25%"] == pytest.approx(0.5)
    # at 0.50+: Q matches g1 (TP 0.5), g2 missed, P is an FP (0.9): u=.5 (P=.5, R=.5),
    # u=.9 (0, 0), (1, 0): steps .25, .25, 0 -> 0.125
    assert res["classes"]["chair"]["ap50%"] == pytest.approx(0.125)
    assert res["classes"]["chair"]["ap"] == pytest.approx(0.125)


def test_empty_curve_gives_zero():
    # chair GT, one chair prediction entirely on unannotated area: ignored at every
    # threshold, nothing matched -> no curve (the official script crashes) -> AP 0
    res, _ = evaluate(gt_scene(), [(mask((400, 600)), CHAIR, 0.9)])
    assert res["classes"]["chair"] == {"ap": 0.0, "ap50%": 0.0, "ap25%": 0.0}


def test_scenes_accumulate_over_the_set():
    ev = ScanNetInstanceEvaluator()
    ev.add_scene(gt_scene(), mask((0, 200))[None], [CHAIR], [0.9])  # TP 0.9
    ev.add_scene(gt_scene(), mask((200, 300))[None], [CHAIR], [0.95])  # FP 0.95, GT missed
    # u=.9 (P=.5, R=.5), u=.95 (0, 0), (1, 0): AP 0.125
    assert ev.compute()["classes"]["chair"]["ap"] == pytest.approx(0.125)
    assert ev.num_scenes == 2


def test_label_times_1000_is_a_gt_instance_and_other_labels_are_skipped():
    gt = np.zeros(N, np.int64)
    gt[0:150] = CHAIR * 1000  # labelled, instance 0: the script treats id 5000 as instance
    gt[150:400] = 1 * 1000 + 3  # wall: void for instances
    res, _ = evaluate(gt, [(mask((0, 150)), CHAIR, 0.9), (mask((150, 400)), 1, 0.99)])
    assert res["classes"]["chair"]["ap"] == 1.0 and res["all_ap"] == 1.0


def test_bad_inputs_have_clear_messages():
    ev = ScanNetInstanceEvaluator()
    with pytest.raises(ValueError, match="pred_masks must be"):
        ev.add_scene(gt_scene(), np.zeros((2, 10), bool), [5, 5], [0.1, 0.2])
    with pytest.raises(ValueError, match="one entry per mask"):
        ev.add_scene(gt_scene(), np.zeros((2, N), bool), [5], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN.*ill-defined"):
        ev.add_scene(gt_scene(), np.zeros((1, N), bool), [5], [np.nan])
    with pytest.raises(ValueError, match="gt_ids"):
        ev.add_scene(gt_scene().astype(float), np.zeros((0, N), bool), [], [])


def test_adapters_and_output_formats():
    np.testing.assert_array_equal(semantic_to_nyu40([0, 1, 2, 19, -100]), [1, 2, 3, 39, 0])
    np.testing.assert_array_equal(instance_class_to_nyu40([0, 2, 17]), [3, 5, 39])
    with pytest.raises(ValueError, match="0..19"):
        semantic_to_nyu40([20])
    # semantic chair (4 -> nyu 5) instance 0 -> 5001; wall without instance -> 1000;
    # ignored -> 0; chair without instance -> 5000 (ScanNet's own export)
    ids = gt_ids_from_labels([4, 0, -100, 4], [0, -100, -100, -100])
    np.testing.assert_array_equal(ids, [5001, 1000, 0, 5000])
    res, _ = evaluate(gt_scene(), [(mask((0, 200)), CHAIR, 0.9)])
    js = results_to_json(res)
    assert js["classes"]["sofa"]["ap"] is None and js["classes"]["chair"]["ap"] == 1.0
    table = format_table(res)
    assert "chair" in table and "average" in table and "shower curtain" in table

"""S3DIS mCov / mWCov / mPrec / mRec against a hand-worked two-room example."""

import math

import numpy as np
import pytest

from dknet_jax.eval import s3dis_instance_metrics

TABLE, CHAIR, SOFA = 7, 8, 9


def masks(n, *members):
    m = np.zeros((len(members), n), bool)
    for k, idx in enumerate(members):
        m[k, list(idx)] = True
    return m


def rooms():
    # room 1 (10 points): chair g0 = 0..3, chair g1 = 4..5, table g2 = 6..9
    sem1 = np.array([CHAIR] * 6 + [TABLE] * 4)
    ins1 = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    # p0 chair 0..2: IoU g0 3/4; p1 chair 3..5: IoU g0 1/6, g1 2/3;
    # p2 table 6..7: IoU g2 2/4 = 0.5 (>= 0.5 counts); p3 sofa 8..9: no sofa GT
    r1 = dict(
        gt_semantic=sem1,
        gt_instance=ins1,
        pred_masks=masks(10, range(0, 3), range(3, 6), range(6, 8), range(8, 10)),
        pred_labels=np.array([CHAIR, CHAIR, TABLE, SOFA]),
        pred_scores=np.ones(4),
    )
    # room 2 (6 points): chair g = 0..4, point 5 ignored; no predictions
    r2 = dict(
        gt_semantic=np.array([CHAIR] * 5 + [-100]),
        gt_instance=np.array([4] * 5 + [-100]),
        pred_masks=np.zeros((0, 6), bool),
        pred_labels=np.zeros(0, int),
        pred_scores=np.zeros(0),
    )
    return [r1, r2]


def test_hand_worked_two_rooms():
    res = s3dis_instance_metrics(rooms())
    # chair room 1: coverages 3/4 (g0) and 2/3 (g1): Cov 17/24, WCov (3/4*4 + 2/3*2)/6 = 13/18
    # chair room 2: 0 and 0 -> chair Cov 17/48, WCov 13/36; table (room 1 only): 1/2, 1/2
    assert res["mCov"] == pytest.approx((17 / 48 + 0.5) / 2)
    assert res["mWCov"] == pytest.approx((13 / 36 + 0.5) / 2)
    # precision: chair 2/2, table 1/1, sofa 0/1 -> 2/3; recall: chair 2/3, table 1/1 -> 5/6
    assert res["mPrec"] == pytest.approx(2 / 3)
    assert res["mRec"] == pytest.approx(5 / 6)


def test_no_one_to_one_matching_and_empty_input():
    # two identical predictions of one GT: both true positives (precision 1, recall 1)
    room = dict(
        gt_semantic=np.full(4, CHAIR),
        gt_instance=np.zeros(4, int),
        pred_masks=masks(4, range(4), range(4)),
        pred_labels=[CHAIR, CHAIR],
        pred_scores=[0.1, 0.2],
    )
    res = s3dis_instance_metrics([room])
    assert res == {"mCov": 1.0, "mWCov": 1.0, "mPrec": 1.0, "mRec": 1.0}
    assert all(math.isnan(v) for v in s3dis_instance_metrics([]).values())


def test_bad_input():
    r = rooms()[0]
    r["pred_labels"] = np.array([CHAIR, CHAIR, TABLE, 13])
    with pytest.raises(ValueError, match="pred_labels must be 0..12"):
        s3dis_instance_metrics([r])
    with pytest.raises(ValueError, match="lacks"):
        s3dis_instance_metrics([{"gt_semantic": [0]}])

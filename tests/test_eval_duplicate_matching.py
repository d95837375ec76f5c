"""ScanNet AP: a duplicate prediction stays available to the next GT instance.

The benchmark's greedy GT-first matching marks only the *first* unused prediction above
the threshold as used by a GT instance; a second candidate of the same GT becomes a false
positive (with the lower of the two scores) but is *not* marked used, so a later GT
instance can still match it. Scene: chairs A = [0, 200) and B = [200, 400) (nyu40 5),
600 unannotated vertices. P1 = A exactly (0.9); P2 = 100 vertices of A + 150 of B (0.6),
so IoU(P2, A) = 100/350 = 0.286 and IoU(P2, B) = 150/300 = 0.5.

At IoU 0.25, P1 listed first: A takes P1, P2 is A's duplicate (FP 0.6, A keeps 0.9), B
takes P2 (TP 0.6). Entries TP .9, FP .6, TP .6, none missed; operating points u=.6
(P=2/3, R=1), u=.9 (P=1, R=.5), artificial (1, 0); steps .25, .5, .25:
AP25 = 2/3 * .25 + 1 * .5 + 1 * .25 = 11/12. Marking P2 used would leave B missed:
u=.6 (P=.5, R=.5), u=.9 (1, .5), (1, 0) -> AP25 = 0.5.
P2 listed first: A takes P2 (0.6) and P1 is the duplicate (FP 0.6, A's score 0.9); B only
overlaps the used P2 -> missed: AP25 = 0.5.
At 0.50 and above P2 matches nothing (0.5 is not > 0.5) and is an FP, B is missed: AP 0.5.

Our evaluator must give these numbers, and (when the official script is available) the
official script run on the same files must too.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

from dknet_jax.eval import ScanNetInstanceEvaluator, evaluate_dirs, write_gt_ids, write_prediction
from dknet_jax.eval.scannet_instance import CLASS_NAMES, OVERLAPS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF = os.environ.get(
    "DKNET_SCANNET_EVAL_REF",
    os.path.join(ROOT, "..", "shared", "reference", "scannet_official_eval"),
)
HAVE_REF = os.path.isdir(os.path.join(REF, "BenchmarkScripts"))
CHAIR = 5
N = 1000
I_CHAIR = CLASS_NAMES.index("chair")
I25 = int(np.flatnonzero(OVERLAPS == 0.25)[0])


def _scene(p2_first: bool):
    gt = np.zeros(N, np.int64)
    gt[0:200] = CHAIR * 1000 + 1  # chair A
    gt[200:400] = CHAIR * 1000 + 2  # chair B
    p1 = np.zeros(N, bool)
    p1[0:200] = True
    p2 = np.zeros(N, bool)
    p2[100:350] = True
    masks, scores = np.stack([p1, p2]), np.array([0.9, 0.6])
    if p2_first:
        masks, scores = masks[::-1], scores[::-1]
    return gt, masks, np.array([CHAIR, CHAIR]), scores


def _load_official():
    spec = importlib.util.spec_from_file_location(
        "crosscheck_official_eval", os.path.join(ROOT, "scripts", "crosscheck_official_eval.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("p2_first,ap25", [(False, 11 / 12), (True, 0.5)])
def test_duplicate_stays_available_for_the_next_gt(p2_first, ap25, tmp_path):
    gt, masks, labels, scores = _scene(p2_first)
    iou_a = 100 / (200 + 250 - 100)
    assert 0.25 < iou_a < 0.5 and masks.sum(1).tolist() in ([200, 250], [250, 200])

    ev = ScanNetInstanceEvaluator()
    ev.add_scene(gt, masks, labels, scores)
    ap = ev.compute_ap_matrix()
    res = ev.compute()
    assert ap[I_CHAIR, I25] == pytest.approx(ap25, abs=1e-12)
    np.testing.assert_allclose(ap[I_CHAIR, :I25], 0.5, atol=1e-12)  # 0.50 ... 0.90
    assert res["all_ap_25%"] == pytest.approx(ap25, abs=1e-12)
    assert res["all_ap_50%"] == pytest.approx(0.5) and res["all_ap"] == pytest.approx(0.5)
    assert np.isnan(np.delete(ap, I_CHAIR, axis=0)).all()

    # the same set as benchmark files, read back by our reader
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    write_gt_ids(str(gt_dir / "scene0000_00.txt"), gt)
    write_prediction(str(pred_dir), "scene0000_00", masks, labels, scores)
    from_files, skipped = evaluate_dirs(str(gt_dir), str(pred_dir), progress=False)
    assert skipped == []
    assert from_files["all_ap_25%"] == pytest.approx(ap25, abs=1e-12)

    if not HAVE_REF:
        pytest.skip("official ScanNet evaluation scripts not available")
    cc = _load_official()
    official, crashes = cc.official_ap(cc.load_official(REF), str(gt_dir), str(pred_dir))
    assert crashes == 0
    assert official[I_CHAIR, I25] == pytest.approx(ap25, abs=1e-12)
    np.testing.assert_array_equal(np.isnan(official), np.isnan(ap))
    np.testing.assert_allclose(np.nan_to_num(official), np.nan_to_num(ap), atol=1e-12)

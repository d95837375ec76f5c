"""Per-stage diagnostics against hand-worked counts and plain numpy loops, and the
post-processing removal reasons (one slot lost at each filter)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from dknet_jax.inference import diagnostics as dg
from dknet_jax.inference import postprocess as pp
from dknet_jax.io_atomic import clean_json
from dknet_jax.model.dknet import DKNetOutputs
from dknet_jax.types import PointBatch
from tests.test_postprocess import postprocess_reference

N, G, B, K, S = 28, 6, 2, 4, 9
FIRST_INSTANCE_CLASS = 2
MIN_GT = 3


def _batch(rng):
    """Scene 0: rows 0..11, scene 1: rows 12..25, padding 26, 27.

    GT slots: 0 = rows 0..4 (5 pts), 1 = rows 5..7 (3), 2 = rows 12..17 (6), 3 = rows 18..19
    (2: too small), 4 = rows 20..22 (class 1: stuff), 5 = empty. Big (>= 3 points, class
    >= 2): slots 0, 1, 2."""
    instance = np.full(N, -100, np.int32)
    for slot, rows in enumerate(
        [range(0, 5), range(5, 8), range(12, 18), range(18, 20), range(20, 23)]
    ):
        instance[list(rows)] = slot
    batch_id = np.array([0] * 12 + [1] * 14 + [2] * 2, np.int32)
    valid = batch_id < 2
    semantic = rng.integers(0, S, N).astype(np.int32)
    semantic[[3, 9, 20]] = -100
    semantic[26] = 4  # a label on a padding row must not count
    return PointBatch(
        xyz=rng.normal(size=(N, 3)).astype(np.float32),
        feats=np.zeros((N, 6), np.float32),
        vox=np.zeros((N, 3), np.int32),
        batch_id=batch_id,
        valid=valid,
        semantic=semantic,
        instance=instance,
        superpoint=np.arange(N, dtype=np.int32),
        instance_class=np.array([5, 6, 7, 8, 1, -100], np.int32),
        instance_batch=np.array([0, 0, 1, 1, 1, 2], np.int32),
        instance_valid=np.array([1, 1, 1, 1, 1, 0], bool),
        scene_valid=np.ones(B, bool),
    )


def _outputs(rng):
    """Slots 0..3 (scene 0): candidates on rows 1, 3, 4 (GT 0) and 9 (none), leads
    [0, 0, 2, 2]; slots 4..7 (scene 1): rows 13 (GT 2), 18 (GT 3, small), two empty slots,
    leads [4, 4, -1, -1]. Instance slots (lead == own index): 0, 2, 4."""
    cand_idx = np.array([1, 3, 4, 9, 13, 18, N, N], np.int32)
    cand_ok = cand_idx < N
    lead = np.array([0, 0, 2, 2, 4, 4, -1, -1], np.int32)
    logits = np.full((B * K, N), -3.0, np.float32)
    logits[0, [0, 1, 3]] = 3.0
    logits[0, 2] = 0.0  # sigmoid = 0.5: not > 0.5
    logits[2, 4:8] = 3.0  # GT 0: 1/8, GT 1: 3/4
    logits[4, [12, 13]] = 3.0  # GT 2: 2/6
    logits[4, [0, 26]] = 3.0  # another scene's row and a padding row: outside slot 4's scene
    logits[1, 12:18] = 3.0  # not an instance slot: ignored
    heads = SimpleNamespace(
        semantic_logits=rng.normal(size=(N, S)).astype(np.float32),
        offset=rng.normal(scale=0.3, size=(N, 3)).astype(np.float32),
    )
    return SimpleNamespace(
        heads=heads,
        cand_idx=cand_idx,
        cand_ok=cand_ok,
        cand_batch=np.repeat(np.arange(B, dtype=np.int32), K),
        lead=lead,
        inst_ok=lead == np.arange(B * K),
        instance_batch=np.repeat(np.arange(B, dtype=np.int32), K),
        mask_logits=logits,
        pool_exhausted=np.array([True, False]),
        instance_overflow=np.array([False, True]),
    )


def _post():
    """Kept: slot 0 (rows 0..4 = GT 0 exactly) and slot 4 (rows 12..16: GT 2 at 5/6); slot 2
    removed by size (its mask rows 5..7 must not count since keep is False)."""
    masks = np.zeros((B, K, N), bool)
    masks[0, 0, 0:5] = True
    masks[0, 2, 5:8] = True
    masks[1, 0, 12:17] = True
    keep = np.zeros((B, K), bool)
    keep[0, 0] = keep[1, 0] = True
    removed = np.zeros((B, K), np.int32)
    removed[0, 2] = pp.REMOVED_SIZE
    return {"masks": masks, "keep": keep, "removed_by": removed}


def _reference_semantic_offsets(batch, out):
    """Plain loops: (sem_points, sem_correct, offset_points, error sum, zero sum)."""
    pred = out.heads.semantic_logits.argmax(1)
    sem_points = sem_correct = 0
    for i in range(N):
        if batch.valid[i] and batch.semantic[i] != -100:
            sem_points += 1
            sem_correct += int(pred[i] == batch.semantic[i])
    n_on, err, zero = 0, 0.0, 0.0
    for g in range(G):
        rows = [i for i in range(N) if batch.valid[i] and batch.instance[i] == g]
        if not rows:
            continue
        centre = np.mean([batch.xyz[i].astype(np.float64) for i in rows], axis=0)
        for i in rows:
            n_on += 1
            err += np.linalg.norm(batch.xyz[i] + out.heads.offset[i] - centre)
            zero += np.linalg.norm(batch.xyz[i] - centre)
    return sem_points, sem_correct, n_on, err, zero


def test_stage_counts_hand_built():
    rng = np.random.default_rng(0)
    batch, out, post = _batch(rng), _outputs(rng), _post()
    fn = jax.jit(
        lambda: dg.stage_counts(
            batch, out, post, first_instance_class=FIRST_INSTANCE_CLASS, min_gt_points=MIN_GT
        )
    )
    got = {k: v.item() for k, v in jax.device_get(fn()).items()}
    assert set(got) == set(dg.COUNT_KEYS)
    sem_points, sem_correct, n_on, err, zero = _reference_semantic_offsets(batch, out)
    assert (got["sem_points"], got["sem_correct"]) == (sem_points, sem_correct)
    assert got["offset_points"] == n_on == 19
    assert got["offset_error_sum"] == pytest.approx(err, rel=1e-5)
    assert got["offset_zero_sum"] == pytest.approx(zero, rel=1e-5)
    mask_iou = 3 / 5 + 3 / 4 + 2 / 6  # slot 0 on GT 0, slot 2 on GT 1, slot 4 on GT 2
    final_iou = 1.0 + 0.0 + 5 / 6
    want = {
        "scenes": 2, "pool_exhausted": 1, "instance_overflow": 1,
        "gt_big": 3, "gt_big_with_candidate": 2, "cand_total": 6, "cand_on_big": 4,
        "cand_on_none": 1,
        # pairs: (0,1) both; (0,2), (1,2) GT only; (2,3) and (4,5) predicted only
        "merge_tp": 1, "merge_pred_pos": 3, "merge_gt_pos": 3,
        "mask_iou50": 2, "mask_iou25": 3, "final_iou50": 2,
        "post_slots": 3, "post_removed_otsu": 0, "post_removed_superpoint": 0,
        "post_removed_class": 0, "post_removed_size": 1, "post_removed_score": 0,
        "post_kept": 2,
    }  # fmt: skip
    assert {k: got[k] for k in want} == want
    assert got["mask_iou_sum"] == pytest.approx(mask_iou, rel=1e-6)
    assert got["final_iou_sum"] == pytest.approx(final_iou, rel=1e-6)


def test_stage_counts_reads_real_output_fields():
    used = {
        "heads",
        "cand_idx",
        "cand_ok",
        "cand_batch",
        "lead",
        "inst_ok",
        "mask_logits",
        "pool_exhausted",
        "instance_overflow",
    }
    assert used <= set(DKNetOutputs.__dataclass_fields__)
    assert isinstance(DKNetOutputs.instance_batch, property)


def test_accumulator_summary_and_format():
    rng = np.random.default_rng(0)
    batch, out, post = _batch(rng), _outputs(rng), _post()
    counts = dg.stage_counts(
        batch, out, post, first_instance_class=FIRST_INSTANCE_CLASS, min_gt_points=MIN_GT
    )
    acc = dg.StageDiagnostics(min_gt_points=MIN_GT)
    acc.add(counts)
    acc.add(counts)  # sums double, ratios stay
    s = acc.summary(miou=0.5)
    assert s["counts"]["gt_big"] == 6 and s["counts"]["merge_tp"] == 2
    assert s["candidate_recall"] == pytest.approx(2 / 3)
    assert s["candidates_per_gt"] == pytest.approx(4 / 3)
    assert s["candidates_off_instance"] == pytest.approx(1 / 6)
    assert s["merge_precision"] == pytest.approx(1 / 3)
    assert s["merge_recall"] == pytest.approx(1 / 3)
    assert s["mask_best_iou"] == pytest.approx((3 / 5 + 3 / 4 + 2 / 6) / 3, rel=1e-6)
    assert s["mask_recall_50"] == pytest.approx(2 / 3)
    assert s["final_recall_50"] == pytest.approx(2 / 3)
    assert s["offset_error_ratio"] == pytest.approx(
        s["offset_error_m"] / s["offset_error_zero_m"], rel=1e-6
    )
    assert (s["post_slots"], s["post_removed_size"], s["post_kept"]) == (6, 2, 4)
    assert s["semantic_miou"] == 0.5 and s["pool_exhausted_scenes"] == 2
    assert s["instance_overflow_scenes"] == 2
    text = dg.format_summary(json.loads(json.dumps(clean_json(s))))
    assert "merge P 0.33 R 0.33" in text
    assert "post: 6 in, -0 otsu, -0 superpoint, -0 class, -2 size, -0 score, 4 kept" in text
    assert "GT instances >= 3 pts: 6 -> with a candidate 4 -> mask IoU >= 0.5 4" in text

    empty = dg.StageDiagnostics()
    s = clean_json(empty.summary())
    assert s["candidate_recall"] is None and s["post_slots"] == 0
    assert "recall n/a" in dg.format_summary(s)
    assert math.isnan(empty.summary()["merge_precision"])


# --- post-processing: one slot lost at each filter -----------------------------------


def _filter_scene():
    """48 points, 8 slots: A kept; B score; C size; D class (ignored class 0); E Otsu /
    coverage (A outbids it on every point); F superpoint vote (background wins its
    superpoint, emptied); G invalid slot; H superpoint vote (5 -> 2 points < min_points)."""
    n, k = 48, 8
    masks = np.full((k, n), 0.05, np.float32)
    sem = np.tile(np.array([0.8, 0.1, 0.1], np.float32), (n, 1))
    rows = {
        0: range(0, 8),
        1: range(8, 16),
        2: range(16, 19),
        3: range(19, 24),
        4: range(0, 8),
        5: range(24, 28),
        6: range(40, 44),
        7: range(34, 39),
    }
    for slot, value in zip(range(k), [0.95, 0.55, 0.95, 0.95, 0.9, 0.95, 0.95, 0.95], strict=True):
        masks[slot, list(rows[slot])] = value
    sem[0:8] = [0.05, 0.9, 0.05]
    sem[8:16] = [0.2, 0.6, 0.2]
    sem[16:19] = [0.05, 0.05, 0.9]
    sem[24:28] = [0.05, 0.9, 0.05]
    sem[34:39] = [0.05, 0.05, 0.9]
    superpoint = np.arange(n, dtype=np.int32)
    superpoint[24:34] = 100  # F's 4 points + 6 background points
    superpoint[36:43] = 101  # H's last 3 points + 4 background points
    _, superpoint = np.unique(superpoint, return_inverse=True)
    slot_ok = np.array([1, 1, 1, 1, 1, 1, 0, 1], bool)
    return masks, slot_ok, sem, np.ones(n, bool), superpoint.astype(np.int32)


@pytest.mark.parametrize("use_sp", [True, False])
def test_postprocess_removal_reasons(use_sp):
    masks, slot_ok, sem, valid, sp = _filter_scene()
    n = masks.shape[1]
    kw = dict(min_score=0.5, min_points=4, ignore_classes=(0,))
    r = pp.postprocess(
        masks, slot_ok, sem, valid, sp if use_sp else None, num_superpoints=n if use_sp else 0, **kw
    )
    want = postprocess_reference(
        masks,
        slot_ok,
        sem,
        valid,
        sp if use_sp else None,
        n,
        kw["min_score"],
        kw["min_points"],
        kw["ignore_classes"],
    )
    np.testing.assert_array_equal(np.asarray(r.keep), want["keep"])
    np.testing.assert_array_equal(np.asarray(r.labels), want["labels"])
    np.testing.assert_array_equal(np.asarray(r.masks), np.array(want["masks"]))
    np.testing.assert_allclose(np.asarray(r.scores), want["scores"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(r.point_instance), want["point_instance"])
    sp_code = pp.REMOVED_SUPERPOINT if use_sp else 0
    assert np.asarray(r.removed_by).tolist() == [
        0,
        pp.REMOVED_SCORE,
        pp.REMOVED_SIZE,
        pp.REMOVED_CLASS,
        pp.REMOVED_OTSU,
        sp_code,
        0,
        sp_code,
    ]
    assert np.asarray(r.keep).tolist() == [
        True,
        False,
        False,
        False,
        False,
        not use_sp,
        False,
        not use_sp,
    ]
    # every valid slot is either kept or removed by exactly one filter
    removed = np.asarray(r.removed_by) > 0
    assert not np.any(removed & np.asarray(r.keep))
    assert np.array_equal(removed | np.asarray(r.keep), slot_ok)

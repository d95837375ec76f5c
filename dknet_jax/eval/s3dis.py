"""S3DIS instance metrics: mCov, mWCov, mPrec, mRec (ASIS / PointGroup protocol).

Place in the data flow: per-room post-processed masks and labels (13 classes) plus GT
labels -> ``s3dis_instance_metrics(scenes)`` (host numpy) -> four fractions.

Protocol: a GT instance is each distinct ``gt_instance`` id (not -100); its class is the
most frequent non-ignored ``gt_semantic`` label of its points (ties: lower class). IoU is
over all points of the room. Coverage of a GT instance = max IoU with any prediction of the
same class (0 if none). Per room and class: mean coverage over its GT instances (Cov) and
the point-count-weighted mean (WCov); these are averaged over the rooms where the class has
GT, then over classes. A prediction is a true positive when its IoU with some GT instance
of its class is >= 0.5 (no one-to-one matching); a GT instance is recalled when some
prediction of its class reaches IoU >= 0.5 with it. TP, #pred, recalled and #GT are summed
per class over rooms; mPrec = mean over classes with predictions of TP / #pred, mRec = mean
over classes with GT of recalled / #GT. Scores are not used.
"""

from __future__ import annotations

import math

import numpy as np

from dknet_jax.data.labels import IGNORE_LABEL, S3DIS_CLASSES

NUM_CLASSES = len(S3DIS_CLASSES)
IOU_THRESHOLD = 0.5


def _gt_instances(sem: np.ndarray, ins: np.ndarray, num_classes: int):
    """(masks bool[G, N], classes i64[G]) of a room's GT instances."""
    ids = np.unique(ins[ins != IGNORE_LABEL])
    masks, classes = [], []
    for i in ids:
        m = ins == i
        lab = sem[m]
        lab = lab[lab != IGNORE_LABEL]
        if lab.size == 0:
            continue
        masks.append(m)
        classes.append(int(np.bincount(lab, minlength=num_classes).argmax()))
    n = ins.shape[0]
    return (np.array(masks, dtype=bool).reshape(-1, n), np.array(classes, dtype=np.int64))


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """f64[A, B] IoU of bool masks a[A, N] and b[B, N]."""
    inter = a.astype(np.float64) @ b.T.astype(np.float64)
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def s3dis_instance_metrics(scenes, num_classes: int = NUM_CLASSES) -> dict:
    """mCov, mWCov, mPrec, mRec (fractions 0..1, NaN if undefined) over rooms.

    Args:
      scenes: list of dicts with ``gt_semantic`` int[N] 0..12 (-100 ignore),
        ``gt_instance`` int[N] (-100 none), ``pred_masks`` bool[K, N], ``pred_labels``
        int[K] 0..12, ``pred_scores`` float[K] (unused by the protocol).
    """
    cov = [[] for _ in range(num_classes)]
    wcov = [[] for _ in range(num_classes)]
    tp = np.zeros(num_classes)
    npred = np.zeros(num_classes)
    recalled = np.zeros(num_classes)
    ngt = np.zeros(num_classes)
    for r, sc in enumerate(scenes):
        missing = {"gt_semantic", "gt_instance", "pred_masks", "pred_labels"} - set(sc)
        if missing:
            raise ValueError(f"scene {r} lacks {sorted(missing)}")
        sem = np.asarray(sc["gt_semantic"]).reshape(-1).astype(np.int64)
        ins = np.asarray(sc["gt_instance"]).reshape(-1)
        n = sem.shape[0]
        if ins.shape[0] != n:
            raise ValueError(
                f"scene {r}: gt_semantic ({n}) and gt_instance ({ins.shape[0]}) differ"
            )
        pm = np.asarray(sc["pred_masks"]).astype(bool)
        pm = pm.reshape(-1, n) if pm.size == 0 else pm
        pl = np.asarray(sc["pred_labels"]).reshape(-1).astype(np.int64)
        if pm.ndim != 2 or pm.shape[1] != n or pm.shape[0] != pl.shape[0]:
            raise ValueError(
                f"scene {r}: pred_masks {pm.shape} must be [K, {n}] with K = "
                f"len(pred_labels) = {pl.shape[0]}"
            )
        if np.any((pl < 0) | (pl >= num_classes)):
            raise ValueError(f"scene {r}: pred_labels must be 0..{num_classes - 1}")
        bad = (sem != IGNORE_LABEL) & ((sem < 0) | (sem >= num_classes))
        if np.any(bad):
            raise ValueError(f"scene {r}: gt_semantic must be 0..{num_classes - 1} or -100")
        gm, gc = _gt_instances(sem, ins, num_classes)
        for c in range(num_classes):
            g, p = gm[gc == c], pm[pl == c]
            iou = _iou(g, p)  # [Gc, Kc]
            if g.shape[0]:
                best = iou.max(axis=1) if p.shape[0] else np.zeros(g.shape[0])
                size = g.sum(axis=1).astype(np.float64)
                cov[c].append(float(best.mean()))
                wcov[c].append(float(np.sum(best * size) / size.sum()))
                recalled[c] += np.sum(best >= IOU_THRESHOLD)
                ngt[c] += g.shape[0]
            if p.shape[0]:
                npred[c] += p.shape[0]
                if g.shape[0]:
                    tp[c] += np.sum(iou.max(axis=0) >= IOU_THRESHOLD)

    def mean(vals):
        vals = [v for v in vals if not math.isnan(v)]
        return float(np.mean(vals)) if vals else math.nan

    return {
        "mCov": mean([np.mean(v) if v else math.nan for v in cov]),
        "mWCov": mean([np.mean(v) if v else math.nan for v in wcov]),
        "mPrec": mean([tp[c] / npred[c] if npred[c] else math.nan for c in range(num_classes)]),
        "mRec": mean([recalled[c] / ngt[c] if ngt[c] else math.nan for c in range(num_classes)]),
    }

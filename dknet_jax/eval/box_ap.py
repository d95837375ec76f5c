"""3D box AP (AP25 / AP50) from instance masks, detection style (paper Table 2).

Place in the data flow: post-processed instance masks + point coordinates ->
``boxes_from_masks`` (axis-aligned min/max boxes) -> ``BoxAPEvaluator.add_scene`` ->
``compute()`` over the set.

Protocol (VoteNet / DyCo3D detection evaluation): per class, all predictions of the set in
descending confidence (ties: the order they were added); each takes the GT box of its
class in its scene with the highest 3D IoU; if that IoU >= the threshold and that GT is not
yet taken it is a true positive (and takes it), otherwise a false positive. AP is the
VOC area under the precision envelope (all recall points, not the 11-point variant).
A class without GT boxes gets NaN and is left out of the mean; GT but no predictions: 0.
"""

from __future__ import annotations

import math

import numpy as np

from dknet_jax.types import IGNORE_LABEL


def boxes_from_masks(xyz, masks) -> np.ndarray:
    """f64[K, 6] boxes (xmin, ymin, zmin, xmax, ymax, zmax) of the member points.

    Args: xyz f32[N, 3]; masks bool[K, N], every mask non-empty.
    """
    xyz = np.asarray(xyz, dtype=np.float64)
    masks = np.asarray(masks) != 0
    if xyz.ndim != 2 or xyz.shape[1] != 3 or masks.ndim != 2 or masks.shape[1] != xyz.shape[0]:
        raise ValueError(f"need xyz [N, 3] and masks [K, N], got {xyz.shape} and {masks.shape}")
    empty = ~masks.any(axis=1)
    if np.any(empty):
        raise ValueError(f"masks {np.flatnonzero(empty)[:5].tolist()} are empty; drop them first")
    lo = np.where(masks[:, :, None], xyz[None], np.inf).min(axis=1)
    hi = np.where(masks[:, :, None], xyz[None], -np.inf).max(axis=1)
    return np.concatenate([lo, hi], axis=1)


def instance_boxes(xyz, instance, labels_per_point, ignore_label: int = IGNORE_LABEL):
    """Boxes and classes of GT instances: (f64[G, 6], i64[G]), instance ids ascending.

    Args: xyz f32[N, 3]; instance int[N] ids (``ignore_label`` = none); labels_per_point
    int[N] class of each point (an instance's class is the class of its first point).
    """
    instance = np.asarray(instance).reshape(-1)
    labels_per_point = np.asarray(labels_per_point).reshape(-1)
    ids = np.unique(instance[instance != ignore_label])
    masks = instance[None, :] == ids[:, None]
    first = masks.argmax(axis=1)
    if ids.size == 0:
        return np.zeros((0, 6)), np.zeros((0,), np.int64)
    return boxes_from_masks(xyz, masks), labels_per_point[first].astype(np.int64)


def box_iou_3d(a, b) -> np.ndarray:
    """f64[A, B] IoU of axis-aligned boxes a f[A, 6] and b f[B, 6]."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 6)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 6)
    lo = np.maximum(a[:, None, :3], b[None, :, :3])
    hi = np.minimum(a[:, None, 3:], b[None, :, 3:])
    inter = np.prod(np.clip(hi - lo, 0.0, None), axis=-1)
    vol_a = np.prod(a[:, 3:] - a[:, :3], axis=-1)
    vol_b = np.prod(b[:, 3:] - b[:, :3], axis=-1)
    union = vol_a[:, None] + vol_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def voc_ap(recall, precision) -> float:
    """Area under the precision envelope of a PR curve (VOC 2010+ style).

    Args: recall, precision f64[E] in detection order (descending confidence).
    """
    mrec = np.concatenate([[0.0], np.asarray(recall, np.float64), [1.0]])
    mpre = np.concatenate([[0.0], np.asarray(precision, np.float64), [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # envelope
    step = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[step + 1] - mrec[step]) * mpre[step + 1]))


class BoxAPEvaluator:
    """Accumulates boxes over scenes; ``compute()`` gives AP per class and threshold."""

    def __init__(self, num_classes: int, class_names=None, thresholds=(0.25, 0.5)):
        self.num_classes = num_classes
        self.class_names = tuple(class_names or [str(i) for i in range(num_classes)])
        if len(self.class_names) != num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {num_classes} classes")
        self.thresholds = tuple(float(t) for t in thresholds)
        self._gt: list[tuple[np.ndarray, np.ndarray]] = []
        self._pred: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def add_scene(self, gt_boxes, gt_labels, pred_boxes, pred_labels, pred_scores) -> None:
        """gt_boxes f[G, 6], gt_labels int[G] 0..S-1, pred_boxes f[K, 6], pred_labels
        int[K], pred_scores f[K]. Labels outside 0..S-1 are skipped."""
        gb = np.asarray(gt_boxes, np.float64).reshape(-1, 6)
        gl = np.asarray(gt_labels, np.int64).reshape(-1)
        pb = np.asarray(pred_boxes, np.float64).reshape(-1, 6)
        pl = np.asarray(pred_labels, np.int64).reshape(-1)
        ps = np.asarray(pred_scores, np.float64).reshape(-1)
        if gb.shape[0] != gl.shape[0] or not pb.shape[0] == pl.shape[0] == ps.shape[0]:
            raise ValueError(
                f"box / label / score counts differ: gt {gb.shape[0]} vs "
                f"{gl.shape[0]}, pred {pb.shape[0]}, {pl.shape[0]}, {ps.shape[0]}"
            )
        self._gt.append((gb, gl))
        self._pred.append((pb, pl, ps))

    def add_scene_from_masks(
        self, xyz, gt_masks, gt_labels, pred_masks, pred_labels, pred_scores
    ) -> None:
        """As ``add_scene`` with boxes from masks: xyz f[N, 3], gt_masks bool[G, N],
        pred_masks bool[K, N]."""
        self.add_scene(
            boxes_from_masks(xyz, np.asarray(gt_masks).reshape(-1, len(xyz))),
            gt_labels,
            boxes_from_masks(xyz, np.asarray(pred_masks).reshape(-1, len(xyz))),
            pred_labels,
            pred_scores,
        )

    def _class_ap(self, c: int, th: float) -> float:
        npos = sum(int(np.sum(gl == c)) for _, gl in self._gt)
        if npos == 0:
            return math.nan
        dets = []  # (score, scene, iou row over the scene's GT of class c)
        for s, ((gb, gl), (pb, pl, ps)) in enumerate(zip(self._gt, self._pred, strict=True)):
            sel = pl == c
            if not sel.any():
                continue
            ious = box_iou_3d(pb[sel], gb[gl == c])
            dets += [(float(sc), s, row) for sc, row in zip(ps[sel], ious, strict=True)]
        if not dets:
            return 0.0
        order = sorted(range(len(dets)), key=lambda i: -dets[i][0])  # stable
        taken = [np.zeros(int(np.sum(gl == c)), bool) for _, gl in self._gt]
        tp = np.zeros(len(dets))
        for rank, i in enumerate(order):
            _, s, row = dets[i]
            if row.size and row.max() >= th:
                j = int(np.argmax(row))
                if not taken[s][j]:
                    taken[s][j] = True
                    tp[rank] = 1.0
        ctp = np.cumsum(tp)
        return voc_ap(ctp / npos, ctp / np.arange(1, len(dets) + 1))

    def compute(self) -> dict:
        """``{"map_25", "map_50", "classes": {name: {"ap_25", "ap_50"}}}`` (keys follow the
        thresholds: ``map_{round(100*t)}``); NaN for classes without GT, nanmean over classes."""
        ap = np.array(
            [[self._class_ap(c, t) for t in self.thresholds] for c in range(self.num_classes)]
        ).reshape(self.num_classes, -1)
        keys = [f"{round(100 * t)}" for t in self.thresholds]
        out = {}
        for ti, k in enumerate(keys):
            col = ap[:, ti][~np.isnan(ap[:, ti])]
            out[f"map_{k}"] = float(col.mean()) if col.size else math.nan
        out["classes"] = {
            n: {f"ap_{k}": float(ap[c, ti]) for ti, k in enumerate(keys)}
            for c, n in enumerate(self.class_names)
        }
        return out

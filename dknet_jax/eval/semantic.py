"""Semantic segmentation mIoU from an accumulated confusion matrix.

Place in the data flow: per-point semantic predictions (argmax of the semantic head, in
benchmark indices 0..S-1) and GT labels (-100 ignored) of every scene ->
``SemanticEvaluator.add`` (host numpy) -> ``compute()`` -> mIoU.

Protocol (ScanNet v2: 20 classes; S3DIS: 13): IoU_c = TP / (TP + FP + FN) summed over all
evaluated points of the set; points whose GT is the ignore label do not count (neither as
FP nor FN); a class with TP + FP + FN = 0 gets NaN and is left out of the mean.
"""

from __future__ import annotations

import math

import numpy as np

from dknet_jax.data.labels import IGNORE_LABEL, SCANNET_CLASSES


def confusion_matrix(pred, gt, num_classes: int, ignore_label: int = IGNORE_LABEL) -> np.ndarray:
    """i64[S, S] counts, rows = GT class, columns = predicted class.

    Args:
      pred: int[N] predicted classes 0..S-1 (any value where GT is ignored).
      gt: int[N] GT classes 0..S-1 or ``ignore_label``.
    """
    pred = np.asarray(pred).reshape(-1)
    gt = np.asarray(gt).reshape(-1)
    if pred.shape != gt.shape:
        raise ValueError(f"pred ({pred.shape[0]}) and gt ({gt.shape[0]}) need one label per point")
    keep = gt != ignore_label
    pred, gt = pred[keep].astype(np.int64), gt[keep].astype(np.int64)
    for name, x in (("gt", gt), ("pred", pred)):
        bad = (x < 0) | (x >= num_classes)
        if np.any(bad):
            raise ValueError(
                f"{name} labels must be 0..{num_classes - 1} (or {ignore_label} "
                f"in gt), got {np.unique(x[bad])[:5].tolist()}"
            )
    return np.bincount(gt * num_classes + pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def iou_from_confusion(conf: np.ndarray) -> np.ndarray:
    """f64[S] IoU per class, NaN where the class is absent from GT and prediction."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    denom = conf.sum(axis=0) + conf.sum(axis=1) - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 0, tp / np.where(denom > 0, denom, 1.0), math.nan)


class SemanticEvaluator:
    """Accumulates a confusion matrix over scenes; ``compute()`` gives mIoU and per-class IoU."""

    def __init__(self, num_classes: int = 20, class_names=None, ignore_label: int = IGNORE_LABEL):
        if class_names is None:
            class_names = (
                SCANNET_CLASSES if num_classes == 20 else [str(i) for i in range(num_classes)]
            )
        if len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes = num_classes
        self.class_names = tuple(class_names)
        self.ignore_label = ignore_label
        self.confusion = np.zeros((num_classes, num_classes), dtype=np.int64)

    def add(self, pred, gt) -> None:
        """Adds one scene: pred int[N] 0..S-1, gt int[N] 0..S-1 or the ignore label."""
        self.confusion += confusion_matrix(pred, gt, self.num_classes, self.ignore_label)

    def compute(self) -> dict:
        """``{"miou": float, "acc": float, "classes": {name: iou}}`` (NaN where undefined)."""
        iou = iou_from_confusion(self.confusion)
        valid = ~np.isnan(iou)
        total = self.confusion.sum()
        return {
            "miou": float(iou[valid].mean()) if valid.any() else math.nan,
            "acc": float(np.trace(self.confusion) / total) if total else math.nan,
            "classes": {n: float(v) for n, v in zip(self.class_names, iou, strict=True)},
        }

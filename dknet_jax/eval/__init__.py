"""Evaluation: metrics equal to the benchmarks' own protocols, and benchmark file IO.

Place in the data flow: post-processed predictions -> these evaluators (host-side numpy,
accumulated over scenes) -> result dicts / tables / JSON.

- ``scannet_instance``: ScanNet v2 instance AP (mAP 0.50:0.90, AP50, AP25, per class).
- ``scannet_io``: GT / prediction / mask files of the ScanNet benchmark; ``evaluate_dirs``.
- ``semantic``: mIoU from a confusion matrix.
- ``box_ap``: 3D box AP25 / AP50 from masks (VoteNet protocol).
- ``s3dis``: mCov, mWCov, mPrec, mRec.
"""

from dknet_jax.eval.box_ap import BoxAPEvaluator, box_iou_3d, boxes_from_masks, voc_ap
from dknet_jax.eval.s3dis import s3dis_instance_metrics
from dknet_jax.eval.scannet_instance import (
    ScanNetInstanceEvaluator,
    format_table,
    gt_ids_from_labels,
    instance_class_to_nyu40,
    results_to_json,
    semantic_to_nyu40,
)
from dknet_jax.eval.scannet_io import (
    BenchmarkFormatError,
    evaluate_dirs,
    load_dirs,
    read_ids,
    read_prediction,
    write_gt_ids,
    write_prediction,
)
from dknet_jax.eval.semantic import SemanticEvaluator, confusion_matrix, iou_from_confusion

__all__ = [
    "BenchmarkFormatError",
    "BoxAPEvaluator",
    "ScanNetInstanceEvaluator",
    "SemanticEvaluator",
    "box_iou_3d",
    "boxes_from_masks",
    "confusion_matrix",
    "evaluate_dirs",
    "format_table",
    "gt_ids_from_labels",
    "instance_class_to_nyu40",
    "iou_from_confusion",
    "load_dirs",
    "read_ids",
    "read_prediction",
    "results_to_json",
    "s3dis_instance_metrics",
    "semantic_to_nyu40",
    "voc_ap",
    "write_gt_ids",
    "write_prediction",
]

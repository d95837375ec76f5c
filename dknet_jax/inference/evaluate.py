"""Batched, jit-compiled inference and evaluation over a prepared split.

Data flow: EvalIterator (bucketed PointBatch) -> jitted [DKNet forward -> per-scene
post-processing -> per-stage diagnostic counts] -> host: per-scene masks/labels/scores ->
ScanNet AP + mIoU (or S3DIS metrics) accumulated in numpy, the diagnostics accumulated by
``diagnostics.StageDiagnostics``, optional benchmark-format prediction/GT files.
"""

from __future__ import annotations

import json
import os
import time
import warnings

import numpy as np
from tqdm import tqdm

from dknet_jax import eval as E
from dknet_jax.config import is_overflow_safe, overflow_safe
from dknet_jax.data.dataset import list_scenes
from dknet_jax.data.labels import S3DIS_CLASSES, SCANNET_CLASSES
from dknet_jax.data.pipeline import EvalIterator
from dknet_jax.inference.diagnostics import MIN_GT_POINTS, StageDiagnostics, format_summary
from dknet_jax.inference.predictor import load_model, make_predict_fn, split_scenes
from dknet_jax.io_atomic import clean_json, write_json
from dknet_jax.model import abstract_model
from dknet_jax.types import IGNORE_LABEL


def _instance_ids_local(instance):
    """Batch-global instance ids of one scene -> 0..K-1 (order kept), -100 unchanged."""
    out = np.full(instance.shape, IGNORE_LABEL, np.int64)
    on = instance >= 0
    _, inv = np.unique(instance[on], return_inverse=True)
    out[on] = inv
    return out


def evaluate_split(
    graphdef,
    params,
    rest,
    config,
    *,
    split: str,
    out_dir: str | None = None,
    write_files: bool = False,
    progress: bool = True,
) -> dict:
    """Run inference over ``config.data.root``/``split`` and compute the metrics.

    With ``write_files``: ``out_dir/pred/`` gets ScanNet-format predictions for every scene
    and ``out_dir/gt/`` the matching GT files (ScanNet configs). Returns a JSON-ready dict.
    """
    d, m = config.data, config.model
    paths = list_scenes(d.root, d.val_split if split is None else split)
    it = EvalIterator(
        paths,
        batch_size=d.eval_batch_size,
        voxel_size=d.voxel_size,
        num_classes=m.num_classes,
        buckets=d.point_buckets,
        instance_buckets=d.instance_buckets,
        num_workers=1,
        prefetch=2,
        released_aug_seed=(
            int(config.test.released_aug_seed) if config.test.get("released_aug") else None
        ),
        voxel_origin=d.voxel_origin,
    )
    predict = make_predict_fn(graphdef, config)
    safe_predict = None  # compiled on the first overflowing batch, if any
    scannet = d.dataset == "scannet"
    ap_eval = E.ScanNetInstanceEvaluator() if scannet else None
    sem_eval = E.SemanticEvaluator(
        num_classes=m.num_classes, class_names=SCANNET_CLASSES if scannet else S3DIS_CLASSES
    )
    s3dis_scenes, shapes, exhausted = [], set(), 0
    diag = StageDiagnostics(MIN_GT_POINTS)
    t0 = time.time()
    for batch, names in tqdm(
        it, total=len(paths), disable=not progress, desc=f"eval {split}", unit="batch"
    ):
        shapes.add(tuple(batch.valid.shape) + tuple(batch.instance_class.shape))
        pred = predict(params, rest, batch)
        scenes = ", ".join(n for n in names if n is not None)  # None: padding slots
        if bool(pred.voxel_overflow) and not is_overflow_safe(config):
            # a UNet level or its conv tiles overflowed: rerun with room for everything
            warnings.warn(
                f"{scenes}: a UNet level or its conv tiles overflowed; reran with "
                f"model.level_capacity_ratio=1.0 and model.tile_fallback=True",
                stacklevel=2,
            )
            if safe_predict is None:
                safe = overflow_safe(config)
                safe_predict = make_predict_fn(abstract_model(safe)[0], safe)
            pred = safe_predict(params, rest, batch)
        if bool(pred.voxel_overflow):
            raise RuntimeError(
                f"{scenes}: the voxel key space overflowed during evaluation (the "
                f"scene spans too many voxels); crop it or use a larger data.voxel_size"
            )
        exhausted += int(np.sum(np.asarray(pred.pool_exhausted)))
        diag.add(pred.diag)
        for s in split_scenes(batch, pred, names):
            sem_eval.add(s.sem_pred, s.semantic)
            if scannet:
                gt_ids = E.gt_ids_from_labels(s.semantic, _instance_ids_local(s.instance))
                label_ids = E.semantic_to_nyu40(s.labels)
                ap_eval.add_scene(gt_ids, s.masks, label_ids, s.scores)
                if write_files and out_dir:
                    E.write_prediction(
                        os.path.join(out_dir, "pred"), s.name, s.masks, label_ids, s.scores
                    )
                    os.makedirs(os.path.join(out_dir, "gt"), exist_ok=True)
                    E.write_gt_ids(os.path.join(out_dir, "gt", s.name + ".txt"), gt_ids)
            else:
                s3dis_scenes.append(
                    {
                        "gt_semantic": s.semantic,
                        "gt_instance": s.instance,
                        "pred_masks": s.masks,
                        "pred_labels": s.labels,
                        "pred_scores": s.scores,
                    }
                )
    results = {
        "split": split,
        "scenes": len(paths),
        "compiled_shapes": len(shapes),
        "pool_exhausted_scenes": exhausted,
        "seconds": time.time() - t0,
        "semantic": sem_eval.compute(),
    }
    if scannet:
        inst = ap_eval.compute()
        results["instance"] = E.results_to_json(inst)
        results["table"] = E.format_table(inst)
    else:
        results["instance"] = E.s3dis_instance_metrics(s3dis_scenes)
    results["diagnostics"] = clean_json(diag.summary(miou=results["semantic"].get("miou")))
    return results


def headline(results: dict) -> float:
    """The number checkpoints are ranked by: ScanNet mAP, S3DIS mCov."""
    inst = results["instance"]
    value = inst.get("all_ap", inst.get("mCov"))
    return float("nan") if value is None else float(value)


def evaluate_checkpoint(
    config, workdir: str, *, split: str, out_dir: str, best: bool = False
) -> dict:
    """scripts/evaluate.py: restore, evaluate ``split``, print and write results."""
    from dknet_jax.config import validate

    validate(config)
    list_scenes(config.data.root, split)  # a missing data root or split fails before restoring
    model = load_model(workdir, config, which="best" if best else "latest")
    print(f"Restored step {model.meta['step']} from {workdir}", flush=True)
    results = evaluate_split(
        model.graphdef,
        model.params,
        model.rest,
        config,
        split=split,
        out_dir=out_dir,
        write_files=True,
    )
    print(
        f"{results['scenes']} scenes in {results['seconds']:.1f}s; "
        f"{results['compiled_shapes']} compiled batch shape(s)"
    )
    if "table" in results:
        print(results["table"])
    else:
        print(json.dumps(clean_json(results["instance"]), indent=2))
    sem = results["semantic"]
    if "miou" in sem:
        print(f"semantic mIoU: {sem['miou']:.4f}")
    print("per-stage diagnostics:\n" + format_summary(results["diagnostics"]))
    write_json(os.path.join(out_dir, "results.json"), clean_json(results))
    print(f"wrote {os.path.join(out_dir, 'results.json')}")
    return results

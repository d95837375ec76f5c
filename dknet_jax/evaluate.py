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

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from dknet_jax import eval as E
from dknet_jax.data.dataset import list_scenes
from dknet_jax.data.labels import S3DIS_CLASSES, SCANNET_CLASSES
from dknet_jax.data.pipeline import EvalIterator
from dknet_jax.diagnostics import MIN_GT_POINTS, StageDiagnostics, format_summary, stage_counts
from dknet_jax.postprocess import postprocess


def postprocess_batch(config, batch, semantic_logits, mask_logits, inst_ok):
    """Post-process every scene of a packed batch (jit-able, ``lax.map`` over scenes).

    ``semantic_logits`` f32[N, S], ``mask_logits`` f32[B*K, N], ``inst_ok`` bool[B*K] (K
    instance slots per scene) ->
    dict of ``masks`` bool[B, K, N], ``labels`` i32[B, K], ``scores`` f32[B, K],
    ``keep`` bool[B, K], ``removed_by`` i32[B, K] (``postprocess.Instances.removed_by``)."""
    m, te = config.model, config.test
    n, b = batch.valid.shape[0], batch.scene_valid.shape[0]
    k = inst_ok.shape[0] // b  # instance slots per scene
    sem_prob = jax.nn.softmax(semantic_logits, axis=-1)
    probs = jax.nn.sigmoid(mask_logits).reshape(b, k, n)
    superpoint = batch.superpoint if te.use_superpoints else None

    def one_scene(args):
        masks_b, ok_b, scene = args
        valid_b = batch.valid & (batch.batch_id == scene)
        r = postprocess(masks_b, ok_b, sem_prob, valid_b, superpoint,
                        num_superpoints=n if superpoint is not None else 0,
                        min_score=te.score_threshold, min_points=te.min_points,
                        ignore_classes=tuple(range(m.first_instance_class)))
        return r.masks, r.labels, r.scores, r.keep, r.removed_by

    out = jax.lax.map(one_scene, (probs, inst_ok.reshape(b, k), jnp.arange(b, dtype=jnp.int32)))
    return dict(zip(("masks", "labels", "scores", "keep", "removed_by"), out, strict=True))


def make_predict_fn(graphdef, config, *, diagnostics: bool = True):
    """jit(params, rest, batch) -> dict of device arrays for a packed batch of B scenes:
    ``masks`` bool[B, K, N], ``labels`` i32[B, K], ``scores`` f32[B, K], ``keep`` bool[B, K],
    ``sem_pred`` i32[N], ``pool_exhausted`` bool[B], ``instance_overflow`` bool[B],
    ``voxel_overflow`` bool[], and with
    ``diagnostics`` ``diag``: the per-stage counts against the batch's GT
    (``diagnostics.stage_counts``, computed in the same jit)."""

    def predict(params, rest, batch):
        model = nnx.merge(graphdef, params, rest, copy=True)
        model.eval()
        out = model(batch, merge_threshold=config.test.merge_threshold)
        result = postprocess_batch(config, batch, out.heads.semantic_logits, out.mask_logits,
                                   out.inst_ok)
        if diagnostics:
            result["diag"] = stage_counts(batch, out, result,
                                          first_instance_class=config.model.first_instance_class,
                                          min_gt_points=MIN_GT_POINTS)
        del result["removed_by"]
        result.update(
            sem_pred=jnp.argmax(out.heads.semantic_logits, axis=-1).astype(jnp.int32),
            pool_exhausted=out.pool_exhausted, instance_overflow=out.instance_overflow,
            voxel_overflow=out.voxel_overflow)
        return result

    return jax.jit(predict)


def split_scenes(batch, pred, names):
    """Host: a packed batch's predictions -> one dict per real scene (rows in file order).

    Returns a list of dicts: name, rows (indices into the batch), masks bool[K', n],
    labels i32[K'], scores f32[K'], sem_pred i32[n], gt semantic/instance i32[n]."""
    batch = jax.device_get(batch)
    pred = jax.device_get(pred)
    scenes = []
    for b, name in enumerate(names):
        if name is None or not bool(batch.scene_valid[b]):
            continue
        rows = np.flatnonzero(np.asarray(batch.valid) & (np.asarray(batch.batch_id) == b))
        keep = np.asarray(pred["keep"][b])
        scenes.append({
            "name": name, "rows": rows,
            "masks": np.asarray(pred["masks"][b])[keep][:, rows],
            "labels": np.asarray(pred["labels"][b])[keep],
            "scores": np.asarray(pred["scores"][b])[keep],
            "sem_pred": np.asarray(pred["sem_pred"])[rows],
            "semantic": np.asarray(batch.semantic)[rows],
            "instance": np.asarray(batch.instance)[rows],
            "xyz": np.asarray(batch.xyz)[rows],
        })
    return scenes


def _instance_ids_local(instance):
    """Batch-global instance ids of one scene -> 0..K-1 (order kept), -100 unchanged."""
    out = np.full(instance.shape, -100, np.int64)
    on = instance >= 0
    _, inv = np.unique(instance[on], return_inverse=True)
    out[on] = inv
    return out


def evaluate_split(graphdef, params, rest, config, *, split: str, out_dir: str | None = None,
                   write_files: bool = False, progress: bool = True) -> dict:
    """Run inference over ``config.data.root``/``split`` and compute the metrics.

    With ``write_files``: ``out_dir/pred/`` gets ScanNet-format predictions for every scene
    and ``out_dir/gt/`` the matching GT files (ScanNet configs). Returns a JSON-ready dict.
    """
    d, m = config.data, config.model
    paths = list_scenes(d.root, d.val_split if split is None else split)
    it = EvalIterator(paths, batch_size=d.eval_batch_size, voxel_size=d.voxel_size,
                      num_classes=m.num_classes, buckets=d.point_buckets,
                      instance_buckets=d.instance_buckets, num_workers=1, prefetch=2)
    predict = make_predict_fn(graphdef, config)
    scannet = d.dataset == "scannet"
    ap_eval = E.ScanNetInstanceEvaluator() if scannet else None
    sem_eval = E.SemanticEvaluator(num_classes=m.num_classes,
                                   class_names=SCANNET_CLASSES if scannet else S3DIS_CLASSES)
    s3dis_scenes, shapes, exhausted = [], set(), 0
    diag = StageDiagnostics(MIN_GT_POINTS)
    t0 = time.time()
    for batch, names in tqdm(it, total=len(paths), disable=not progress, desc=f"eval {split}",
                             unit="batch"):
        shapes.add(tuple(batch.valid.shape) + tuple(batch.instance_class.shape))
        pred = predict(params, rest, batch)
        if bool(pred["voxel_overflow"]):
            raise RuntimeError("voxel capacity overflow during evaluation (a scene exceeds "
                               "its bucket); add a larger data.point_buckets entry")
        exhausted += int(np.sum(np.asarray(pred["pool_exhausted"])))
        diag.add(pred["diag"])
        for s in split_scenes(batch, pred, names):
            sem_eval.add(s["sem_pred"], s["semantic"])
            if scannet:
                gt_ids = E.gt_ids_from_labels(s["semantic"], _instance_ids_local(s["instance"]))
                label_ids = E.semantic_to_nyu40(s["labels"])
                ap_eval.add_scene(gt_ids, s["masks"], label_ids, s["scores"])
                if write_files and out_dir:
                    E.write_prediction(os.path.join(out_dir, "pred"), s["name"], s["masks"],
                                       label_ids, s["scores"])
                    os.makedirs(os.path.join(out_dir, "gt"), exist_ok=True)
                    E.write_gt_ids(os.path.join(out_dir, "gt", s["name"] + ".txt"), gt_ids)
            else:
                s3dis_scenes.append({"gt_semantic": s["semantic"], "gt_instance": s["instance"],
                                     "pred_masks": s["masks"], "pred_labels": s["labels"],
                                     "pred_scores": s["scores"]})
    results = {"split": split, "scenes": len(paths), "compiled_shapes": len(shapes),
               "pool_exhausted_scenes": exhausted, "seconds": time.time() - t0,
               "semantic": sem_eval.compute()}
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


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(clean_json(obj), f, indent=2)
    os.replace(tmp, path)


def clean_json(obj):
    """NaN -> None recursively, so the JSON is valid."""
    if isinstance(obj, dict):
        return {k: clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return None if np.isnan(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return clean_json(obj.tolist())
    return obj


def restore_for_inference(config, workdir: str, best: bool = False):
    """Build the model from ``config`` and restore its weights from ``workdir``.

    Returns (graphdef, params, rest, meta). Raises FileNotFoundError, or a
    ``CheckpointError`` (a ValueError) whose message names the step and the fix."""
    from dknet_jax.checkpoint import Checkpoints, find_checkpoint_dir
    from dknet_jax.optim import make_optimizer
    from dknet_jax.train import build_model

    workdir = find_checkpoint_dir(workdir)
    graphdef, params, rest = build_model(config)
    tx, _ = make_optimizer(config.train, 1, 1)
    target = {"params": params, "rest": rest, "opt": tx.init(params),
              "key": jax.random.PRNGKey(0)}
    ckpt = Checkpoints(workdir)
    try:  # CheckpointMismatchError (another config) / CorruptCheckpointError (unreadable)
        state, meta = ckpt.restore(target, best=best)
    finally:
        ckpt.close()
    return graphdef, state["params"], state["rest"], meta


def evaluate_checkpoint(config, workdir: str, *, split: str, out_dir: str,
                        best: bool = False) -> dict:
    """scripts/evaluate.py: restore, evaluate ``split``, print and write results."""
    from dknet_jax.config import validate

    validate(config)
    list_scenes(config.data.root, split)  # a missing data root or split fails before restoring
    graphdef, params, rest, meta = restore_for_inference(config, workdir, best=best)
    print(f"Restored step {meta['step']} from {workdir}", flush=True)
    results = evaluate_split(graphdef, params, rest, config, split=split, out_dir=out_dir,
                             write_files=True)
    print(f"{results['scenes']} scenes in {results['seconds']:.1f}s; "
          f"{results['compiled_shapes']} compiled batch shape(s)")
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

"""The predictor: a restored model and the jit-compiled DKNet forward + post-processing.

Data flow: a work dir -> :func:`load_model` (``checkpoint.restore_model``, the config saved
in the checkpoint) -> :class:`LoadedModel` -> :func:`make_predict_fn` (jit: ``DKNet`` ->
:func:`postprocess_batch` -> optional per-stage diagnostic counts) on a packed
``PointBatch`` -> :func:`split_scenes` (host: one :class:`SceneResult` per scene).
:func:`run_model` does all of it for one scan given as arrays (``scan.predict_file`` for
files; ``evaluate`` runs :func:`make_predict_fn` over a prepared split).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from dknet_jax import checkpoint as ckpt_lib
from dknet_jax.config import is_overflow_safe, level_values, overflow_safe, validate
from dknet_jax.inference.diagnostics import MIN_GT_POINTS, stage_counts
from dknet_jax.inference.postprocess import postprocess, postprocess_released
from dknet_jax.model import abstract_model
from dknet_jax.types import IGNORE_LABEL


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
        if te.get("postprocess", "ours") == "released":
            r = postprocess_released(
                masks_b,
                ok_b,
                sem_prob,
                valid_b,
                superpoint,
                num_superpoints=n if superpoint is not None else 0,
                min_score=te.score_threshold,
                min_points=te.min_points,
                first_instance_class=m.first_instance_class,
            )
            return r.masks, r.labels, r.scores, r.keep, r.removed_by
        r = postprocess(
            masks_b,
            ok_b,
            sem_prob,
            valid_b,
            superpoint,
            num_superpoints=n if superpoint is not None else 0,
            min_score=te.score_threshold,
            min_points=te.min_points,
            ignore_classes=tuple(range(m.first_instance_class)),
        )
        return r.masks, r.labels, r.scores, r.keep, r.removed_by

    out = jax.lax.map(one_scene, (probs, inst_ok.reshape(b, k), jnp.arange(b, dtype=jnp.int32)))
    return dict(zip(("masks", "labels", "scores", "keep", "removed_by"), out, strict=True))


@flax.struct.dataclass
class BatchPrediction:
    """What the jitted predict function returns for a packed batch of B scenes (device
    arrays; K instance slots per scene, N points).

    Attributes:
      masks: bool[B, K, N] post-processed masks; labels: i32[B, K] class indices;
        scores: f32[B, K]; keep: bool[B, K] slots that survive post-processing.
      sem_pred: i32[N] semantic class per point.
      pool_exhausted: bool[B] the LN-NMS pool ran out (the exact whole-scene loop ran).
      instance_overflow: bool[B] more groups than instance slots (the lowest dropped).
      voxel_overflow: bool[] a voxel capacity overflowed (the outputs are invalid).
      diag: the per-stage diagnostic counts against the batch's GT
        (``diagnostics.stage_counts``), or None without diagnostics.
    """

    masks: jax.Array
    labels: jax.Array
    scores: jax.Array
    keep: jax.Array
    sem_pred: jax.Array
    pool_exhausted: jax.Array
    instance_overflow: jax.Array
    voxel_overflow: jax.Array
    diag: dict | None = None


@dataclasses.dataclass
class SceneResult:
    """One real scene of a packed batch, on the host (:func:`split_scenes`): the kept
    instances and per-point arrays in the scene's row order.

    Attributes:
      name: scene name; rows: i64[n] indices of its points in the batch.
      masks: bool[K', n]; labels: i32[K'] class indices; scores: f32[K'].
      sem_pred: i32[n] predicted class per point.
      semantic, instance: i32[n] the batch's GT (-100 where unknown); xyz: f32[n, 3].
      bucket: the point capacity the batch was padded to (set by :func:`run_model`).
    """

    name: str
    rows: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    sem_pred: np.ndarray
    semantic: np.ndarray
    instance: np.ndarray
    xyz: np.ndarray
    bucket: int = 0


def make_predict_fn(graphdef, config, *, diagnostics: bool = True):
    """jit(params, rest, batch) -> :class:`BatchPrediction` for a packed batch of B scenes;
    with ``diagnostics`` its ``diag`` holds the per-stage counts against the batch's GT
    (``diagnostics.stage_counts``, computed in the same jit)."""

    def predict(params, rest, batch):
        model = nnx.merge(graphdef, params, rest, copy=True)
        model.eval()
        out = model(batch, merge_threshold=config.test.merge_threshold)
        result = postprocess_batch(
            config, batch, out.heads.semantic_logits, out.mask_logits, out.inst_ok
        )
        diag = None
        if diagnostics:
            diag = stage_counts(
                batch,
                out,
                result,
                first_instance_class=config.model.first_instance_class,
                min_gt_points=MIN_GT_POINTS,
            )
        return BatchPrediction(
            masks=result["masks"],
            labels=result["labels"],
            scores=result["scores"],
            keep=result["keep"],
            sem_pred=jnp.argmax(out.heads.semantic_logits, axis=-1).astype(jnp.int32),
            pool_exhausted=out.pool_exhausted,
            instance_overflow=out.instance_overflow,
            voxel_overflow=out.voxel_overflow,
            diag=diag,
        )

    return jax.jit(predict)


def split_scenes(batch, pred: BatchPrediction, names) -> list[SceneResult]:
    """Host: a packed batch's predictions -> one :class:`SceneResult` per real scene
    (``names[b]`` None or an invalid scene slot: skipped)."""
    batch = jax.device_get(batch)
    pred = jax.device_get(pred)
    scenes = []
    for b, name in enumerate(names):
        if name is None or not bool(batch.scene_valid[b]):
            continue
        rows = np.flatnonzero(np.asarray(batch.valid) & (np.asarray(batch.batch_id) == b))
        keep = np.asarray(pred.keep[b])
        scenes.append(
            SceneResult(
                name=name,
                rows=rows,
                masks=np.asarray(pred.masks[b])[keep][:, rows],
                labels=np.asarray(pred.labels[b])[keep],
                scores=np.asarray(pred.scores[b])[keep],
                sem_pred=np.asarray(pred.sem_pred)[rows],
                semantic=np.asarray(batch.semantic)[rows],
                instance=np.asarray(batch.instance)[rows],
                xyz=np.asarray(batch.xyz)[rows],
            )
        )
    return scenes


@dataclasses.dataclass
class LoadedModel:
    """A restored model: ``graphdef``/``params``/``rest`` for ``make_predict_fn``, the
    config used, and where it came from."""

    graphdef: object
    params: object
    rest: object
    config: ml_collections.ConfigDict
    step: int
    source: str
    meta: dict = dataclasses.field(default_factory=dict)  # the checkpoint's meta item
    compiled: dict = dataclasses.field(default_factory=dict)  # (ratio, N, G) -> executable


def load_model(
    checkpoint: str,
    config: ml_collections.ConfigDict | None = None,
    log: Callable[[str], None] = print,
    *,
    which: str = "auto",
) -> LoadedModel:
    """Restore a trained DKNet for inference: the one restore path of evaluate and predict.

    ``checkpoint``: a work dir of ``scripts/train.py``, its ``checkpoints/`` (latest) or
    ``best/`` folder, or a step folder inside them. ``which`` (for a work dir): "auto" =
    the best checkpoint if one was ranked, else the latest; "latest"; "best".
    ``config``: replaces the config saved in the checkpoint (must describe the same
    network). Raises FileNotFoundError / ValueError (``checkpoint.CheckpointError``) with a
    message naming the fix.
    """
    if which not in ("auto", "latest", "best"):
        raise ValueError(f"which must be 'auto', 'latest' or 'best', got {which!r}")
    workdir, best, step = ckpt_lib.resolve(checkpoint)
    named = os.path.basename(os.path.abspath(checkpoint).rstrip(os.sep))
    if not best and step is None and named != "checkpoints":  # a work dir
        has_best = bool(ckpt_lib.list_steps(os.path.join(workdir, "best")))
        best = which == "best" or (which == "auto" and has_best)
    folder = os.path.join(workdir, "best" if best else "checkpoints")
    steps = ckpt_lib.list_steps(folder)
    if not steps:
        raise FileNotFoundError(
            f"no checkpoint steps in {folder}: train first (scripts/train.py --workdir {workdir})"
        )
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(f"no step {step} in {folder} (has {steps})")
    meta = ckpt_lib.read_meta(folder, step)
    if config is None:
        config = ckpt_lib.config_from_meta(meta, log)
        if config is None:
            raise ValueError(
                f"the checkpoint in {folder}/{step} holds no config; pass the "
                f"training config with --config=configs/<name>.py"
            )
    validate(config)
    if config.model.kernel_from == "oracle":
        raise ValueError(
            "config.model.kernel_from='oracle' uses ground truth and cannot "
            "predict on a new scan; use 'aggregate' or 'top'"
        )
    # the restore target needs only shapes: the model traced, not initialised
    graphdef, params, rest = abstract_model(config)
    params, rest, meta = ckpt_lib.restore_model(workdir, step, best, params, rest)
    return LoadedModel(graphdef, params, rest, config, step, folder, meta)


def run_model(
    model: LoadedModel,
    xyz: np.ndarray,
    rgb: np.ndarray,
    superpoint,
    *,
    name: str = "scan",
    subsample: bool = False,
    seed: int = 0,
    timings: dict | None = None,
    log: Callable[[str], None] = print,
) -> tuple[SceneResult, np.ndarray | None, list]:
    """Infer one scan. Returns (the :class:`SceneResult` of :func:`split_scenes` with masks /
    sem_pred mapped back to all N points, the indices of the inferred subset or None,
    warnings). ``superpoint`` i32[N] or None (no vote)."""
    from dknet_jax.data.batching import pack_batch
    from dknet_jax.data.transforms import prepare_eval

    config = model.config
    timings = {} if timings is None else timings
    d = config.data
    n = len(xyz)
    cap = int(max(d.point_buckets))
    notes: list[str] = []
    subset = None
    if n > cap:
        if not subsample:
            raise ValueError(
                f"{name}: {n} points exceed the largest point bucket ({cap}). Either add a "
                f"bucket, e.g. --config=<config> --config.data.point_buckets="
                f"'({', '.join(str(b) for b in d.point_buckets)}, {_round_up(n)})' (memory "
                f"grows with it), downsample the scan (e.g. one point per "
                f"{d.voxel_size} m voxel), or pass --subsample to infer on {cap} random "
                f"points and give every point its nearest inferred point's prediction"
            )
        rng = np.random.default_rng(seed)
        subset = np.sort(rng.choice(n, cap, replace=False))
        notes.append(
            f"scan has {n} points > largest bucket {cap}: inferred on a random "
            f"subset of {cap} points, the rest take their nearest neighbour's "
            f"prediction"
        )
        log("warning: " + notes[-1])
    sel = slice(None) if subset is None else subset
    sx, srgb = xyz[sel], rgb[sel]
    # no superpoints: singleton superpoints make the vote the identity (and reuse the
    # same compiled function)
    sp = np.arange(len(sx), dtype=np.int32) if superpoint is None else superpoint[sel]
    m = len(sx)
    sample = prepare_eval(
        {
            "xyz": sx.astype(np.float32),
            "rgb": srgb,
            "semantic": np.full(m, IGNORE_LABEL, np.int32),
            "instance": np.full(m, IGNORE_LABEL, np.int32),
            "superpoint": np.asarray(sp, np.int32),
            "name": name,
        }
    )
    batch = pack_batch(
        [sample],
        buckets=d.point_buckets,
        instance_buckets=d.instance_buckets,
        num_classes=config.model.num_classes,
        voxel_size=d.voxel_size,
        voxel_origin=d.voxel_origin,
    )
    safe = is_overflow_safe(config)
    timings["compile_s"] = timings["inference_s"] = 0.0
    while True:
        pred = _infer(model, batch, safe, timings)
        if not bool(pred.voxel_overflow):
            break
        if not safe:  # a sparse scan fills the coarse UNet levels: give them room
            ratio = level_values(config.model.level_capacity_ratio)
            notes.append(
                f"a UNet level or its conv tiles overflowed with "
                f"model.level_capacity_ratio={ratio}; reran with 1.0 and "
                f"model.tile_fallback=True (never overflows, more memory)"
            )
            log("warning: " + notes[-1])
            safe = True
            continue
        raise ValueError(
            f"{name}: the voxel key space overflowed (the scan spans "
            f"{np.ptp(sx, axis=0).round(2).tolist()} m at {d.voxel_size} m voxels); crop "
            f"the scan or use a larger --config.data.voxel_size"
        )
    if bool(np.any(np.asarray(pred.instance_overflow))):
        notes.append(
            "the scan had more candidate groups than instance slots: the lowest-"
            "scoring ones were dropped; raise --config.model.max_instances"
        )
        log("warning: " + notes[-1])
    scene = split_scenes(batch, pred, [name])[0]
    if subset is not None:
        from scipy.spatial import cKDTree

        _, nn = cKDTree(sx).query(xyz, k=1)
        scene.masks = scene.masks[:, nn]
        scene.sem_pred = scene.sem_pred[nn]
    scene.bucket = int(batch.valid.shape[0])
    return scene, subset, notes


def _infer(model: LoadedModel, batch, safe: bool, timings: dict) -> dict:
    """Compile (cached per setting and batch shape) and run the predict function, with
    the model's config or (``safe``) its :func:`overflow_safe` variant; adds to
    timings["compile_s"] / ["inference_s"]."""
    key = (safe, batch.valid.shape[0], batch.instance_valid.shape[0])
    t0 = time.perf_counter()
    if key not in model.compiled:
        config = model.config
        graphdef = model.graphdef
        if safe and not is_overflow_safe(config):
            config = overflow_safe(config)
            graphdef = abstract_model(config)[0]  # same parameters, other capacities
        predict = make_predict_fn(graphdef, config, diagnostics=False)  # no GT
        model.compiled[key] = predict.lower(model.params, model.rest, batch).compile()
    timings["compile_s"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    pred = jax.block_until_ready(model.compiled[key](model.params, model.rest, batch))
    timings["inference_s"] += time.perf_counter() - t0
    return pred


def _round_up(n: int) -> int:
    return int(2 ** np.ceil(np.log2(max(n, 1))))

"""Training targets from ground truth (docs/method.md section 4).

Data flow: ``PointBatch`` (GT ``instance`` ids are batch-global slots 0..G-1) ->
:func:`compute_targets` -> per-instance centroids / boxes / counts and per-point offset and
Gaussian heatmap targets, consumed by ``losses`` (offset, heatmap) and ``matching`` (GT
centroids and classes).

All functions are pure and jit-able; G is the static instance capacity
(``PointBatch.instance_class.shape[0]``). Points with ``instance == -100`` (or any id
outside 0..G-1, or invalid rows) belong to no instance.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from dknet_jax.types import PointBatch

Array = jax.Array


def _instance_slot(instance: Array, valid: Array, num_instances: int) -> Array:
    """i32[N]: the instance slot of each point, ``num_instances`` (sentinel) when none."""
    ok = valid & (instance >= 0) & (instance < num_instances)
    return jnp.where(ok, instance, num_instances)


def instance_stats(xyz: Array, instance: Array, valid: Array, num_instances: int):
    """Per-instance point count, centroid and axis-aligned box.

    Args:
      xyz: f32[N, 3]; instance: i32[N] slot 0..G-1 or -100; valid: bool[N].
      num_instances: G (static).
    Returns:
      count i32[G], centroid f32[G, 3] (mean of the instance's points; 0 if empty),
      box_min f32[G, 3], box_max f32[G, 3] (0 if empty).
    """
    g = num_instances
    slot = _instance_slot(instance, valid, g)
    count = jax.ops.segment_sum(jnp.ones_like(slot), slot, num_segments=g)
    total = jax.ops.segment_sum(xyz, slot, num_segments=g)
    centroid = total / jnp.maximum(count, 1)[:, None].astype(xyz.dtype)
    box_min = jax.ops.segment_min(xyz, slot, num_segments=g)
    box_max = jax.ops.segment_max(xyz, slot, num_segments=g)
    has = (count > 0)[:, None]
    return (count, centroid, jnp.where(has, box_min, 0.0), jnp.where(has, box_max, 0.0))


@flax.struct.dataclass
class Targets:
    """GT-derived targets for one packed batch.

    Attributes:
      centroid: f32[G, 3] instance centroids (mean of points).
      box_min, box_max: f32[G, 3] axis-aligned boxes.
      radius: f32[G] r = longest box side.
      count: i32[G] points per instance.
      gt_class: i32[G] semantic class per instance (-100 for empty slots).
      gt_batch: i32[G] scene per instance (B for empty slots).
      gt_ok: bool[G] real instance slots that own at least one point.
      on_instance: bool[N] valid points that belong to an instance.
      offset: f32[N, 3] centroid - xyz on instance points, 0 elsewhere.
      heat: f32[N] exp(-alpha d^2 / (r + eps)^2) on instance points, 0 elsewhere.
    """

    centroid: Array
    box_min: Array
    box_max: Array
    radius: Array
    count: Array
    gt_class: Array
    gt_batch: Array
    gt_ok: Array
    on_instance: Array
    offset: Array
    heat: Array


def compute_targets(
    batch: PointBatch, *, heat_alpha: float = 25.0, radius_eps: float = 1e-4
) -> Targets:
    """Targets for a packed batch (docs/method.md section 4).

    Heatmap target of an instance point: ``exp(-heat_alpha * d^2 / (r + radius_eps)^2)``, d
    = distance to its instance centroid, r = longest side of the instance's box (the eps,
    as in the released code, keeps one-point instances finite: their target is 1).
    """
    g = batch.instance_class.shape[0]
    count, centroid, bmin, bmax = instance_stats(batch.xyz, batch.instance, batch.valid, g)
    radius = jnp.max(bmax - bmin, axis=-1)
    slot = _instance_slot(batch.instance, batch.valid, g)
    on = slot < g
    c = jnp.take(centroid, slot, axis=0, mode="fill", fill_value=0.0)
    r = jnp.take(radius, slot, mode="fill", fill_value=1.0)
    off = jnp.where(on[:, None], c - batch.xyz, 0.0)
    d2 = jnp.sum(off * off, axis=-1)
    heat = jnp.where(on, jnp.exp(-heat_alpha * d2 / (r + radius_eps) ** 2), 0.0)
    return Targets(
        centroid=centroid,
        box_min=bmin,
        box_max=bmax,
        radius=radius,
        count=count,
        gt_class=batch.instance_class,
        gt_batch=batch.instance_batch,
        gt_ok=batch.instance_valid & (count > 0),
        on_instance=on,
        offset=off,
        heat=heat,
    )

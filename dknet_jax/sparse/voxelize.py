"""Voxelisation: points -> unique voxels with averaged features, under ``jit``.

Place in the data flow: ``PointBatch`` (``vox``, ``batch_id``, ``valid``, ``feats``) ->
**voxelize** -> :class:`Voxels` -> sparse UNet (``model/backbone``) -> per-voxel features
-> :func:`voxel_to_point` -> point heads.

Voxels are unique ``(batch, x, y, z)`` rows, sorted lexicographically, in a static
capacity ``V``; padded rows have ``valid == False``. Negative voxel coordinates are
allowed. :func:`voxel_coords` is the host-side helper that turns metres into ``vox``.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dknet_jax.sparse.hashing import unique_rows

Array = jax.Array


@flax.struct.dataclass
class Voxels:
    """A padded sparse voxel set of B scenes.

    Attributes:
      coords: i32[V, 4] rows (batch, x, y, z), unique, sorted lexicographically; padded
        rows are ``(b_pad, 0, 0, 0)`` with b_pad one past the largest real batch index.
      feats: f32[V, C] mean feature of the voxel's points (0 for padded rows).
      valid: bool[V] real voxels.
      point_to_voxel: i32[N] voxel row of each point; ``V`` (sentinel) for invalid points.
      num: i32[] number of real voxels (may exceed V when the capacity overflowed).
      overflow: bool[] the capacity V or the 32-bit key space overflowed; the voxel set
        is then incomplete and must not be used (:func:`check_voxels` raises).
    """

    coords: Array
    feats: Array
    valid: Array
    point_to_voxel: Array
    num: Array
    overflow: Array

    @property
    def capacity(self) -> int:
        return self.coords.shape[0]


def voxelize(vox: Array, batch_id: Array, valid: Array, feats: Array, *, capacity: int) -> Voxels:
    """Merge points that share a voxel; jit-able (``capacity`` is static).

    Args:
      vox: i32[N, 3] integer voxel coordinate of each point (negatives allowed).
      batch_id: i32[N] scene of each point (padding rows: B).
      valid: bool[N] real points.
      feats: f32[N, C] point features, averaged per voxel.
      capacity: V, the number of voxel rows.
    Returns:
      Voxels with V rows.
    """
    vox = jnp.asarray(vox, jnp.int32)
    if vox.ndim != 2 or vox.shape[1] != 3:
        raise ValueError(f"voxelize: vox must be i32[N, 3], got shape {vox.shape}")
    feats = jnp.asarray(feats)
    n = vox.shape[0]
    if feats.shape[0] != n or jnp.shape(batch_id) != (n,) or jnp.shape(valid) != (n,):
        raise ValueError(
            f"voxelize: vox {vox.shape}, batch_id {jnp.shape(batch_id)}, valid "
            f"{jnp.shape(valid)} and feats {feats.shape} must share the point dimension N"
        )
    valid = jnp.asarray(valid, bool)
    coords = jnp.concatenate([jnp.asarray(batch_id, jnp.int32)[:, None], vox], axis=1)
    vcoords, vvalid, p2v, count, overflow = unique_rows(coords, valid, capacity=capacity)
    # Feature sums and point counts in one scatter (a column of ones).
    ones = jnp.ones((n, 1), feats.dtype)
    sums = jax.ops.segment_sum(jnp.concatenate([feats, ones], axis=1), p2v, num_segments=capacity)
    vfeats = sums[:, :-1] / jnp.maximum(sums[:, -1:], 1)
    return Voxels(
        coords=vcoords,
        feats=vfeats,
        valid=vvalid,
        point_to_voxel=p2v,
        num=count,
        overflow=overflow,
    )


def voxel_to_point(voxel_feats: Array, point_to_voxel: Array) -> Array:
    """Gather ``voxel_feats: f[V, C]`` back to points: f[N, C]; sentinel rows get 0."""
    return jnp.take(voxel_feats, point_to_voxel, axis=0, mode="fill", fill_value=0)


def check_voxels(voxels: Voxels) -> None:
    """Host-side check of a concrete :class:`Voxels`; raises ValueError on overflow."""
    if bool(np.asarray(voxels.overflow)):
        raise ValueError(
            f"voxelize overflowed: {int(np.asarray(voxels.num))} voxels for a capacity of "
            f"{voxels.capacity}, or a coordinate box beyond the 32-bit key space. Raise the "
            f"voxel capacity or crop / coarsen the scenes."
        )


def voxel_coords(xyz, voxel_size: float, batch_id=None, *, shift: bool = True) -> np.ndarray:
    """Host helper: i32[N, 3] voxel coordinates ``floor(xyz / voxel_size)``.

    Args:
      xyz: f[N, 3] points in metres.
      voxel_size: edge of a voxel in metres.
      batch_id: optional i[N] scene ids; with ``shift`` each scene is shifted separately.
      shift: subtract the per-scene minimum so that coordinates start at 0 (keeps the
        voxel keys small; voxels are unchanged up to a translation).
    """
    if voxel_size <= 0:
        raise ValueError(f"voxel_coords: voxel_size must be > 0, got {voxel_size}")
    v = np.floor(np.asarray(xyz, np.float64) / voxel_size).astype(np.int64)
    if shift and len(v):
        if batch_id is None:
            v = v - v.min(0)
        else:
            b = np.asarray(batch_id)
            for s in np.unique(b):
                m = b == s
                v[m] -= v[m].min(0)
    if len(v) and np.abs(v).max() >= 2**31:
        raise ValueError("voxel_coords: coordinates exceed int32; use a larger voxel_size")
    return v.astype(np.int32)

"""Packing B scenes into one static-shape ``PointBatch`` with bucketed capacities.

Data flow: ``transforms`` (augmented sample dicts) -> **batching** (``pack_batch``) ->
``pipeline`` (prefetch, device) -> model. Layout rules are those of ``dknet_jax/types.py``.

Every array under ``jit`` has a capacity: the point capacity N is the smallest entry of a
short ladder of *buckets* (e.g. :func:`make_ladder`: powers of two times {1, 1.5}) that
holds the batch's points, and the GT-instance capacity G likewise from an instance
ladder. A pass over a dataset therefore compiles a handful of (N, G) shapes instead of
one per batch. Within a batch, scenes are laid out one after the other in point order
(scene b's rows are those with ``batch_id == b``, in the scene's own order), then padding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from dknet_jax.data.transforms import (
    VOXEL_ORIGINS,
    point_features,
    reindex_instances,
    voxel_coords,
)
from dknet_jax.types import IGNORE_LABEL, PointBatch


def make_ladder(
    min_size: int, max_size: int, factors: Sequence[float] = (1.0, 1.5), multiple: int = 256
) -> tuple[int, ...]:
    """Geometric bucket ladder: every ``2**k * f`` (f in ``factors``) rounded up to a
    multiple of ``multiple``, from the first value >= min_size up to the first value
    >= max_size (so max_size always fits). E.g. (1, 1.5) gives ..., 64k, 96k, 128k, ...:
    at most 50% and on average ~20% padding."""
    if not 0 < min_size <= max_size:
        raise ValueError(f"need 0 < min_size <= max_size, got {min_size}, {max_size}")
    if not factors or any(not 1.0 <= f < 2.0 for f in factors):
        raise ValueError(f"factors must lie in [1, 2), got {tuple(factors)}")
    values = set()
    k = max(0, int(math.floor(math.log2(min_size))) - 1)
    while True:
        for f in sorted(factors):
            v = int(math.ceil(2**k * f / multiple) * multiple)
            if v >= min_size:
                values.add(v)
        if max(values, default=0) >= max_size:
            break
        k += 1
    ladder = sorted(values)
    top = next(i for i, v in enumerate(ladder) if v >= max_size)
    return tuple(ladder[: top + 1])


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= n. Raises ValueError when n exceeds the largest bucket."""
    for b in sorted(buckets):
        if n <= b:
            return int(b)
    raise ValueError(f"{n} exceeds the largest bucket {max(buckets)}")


def batch_capacities(
    point_counts: Sequence[int],
    instance_counts: Sequence[int],
    *,
    buckets: Sequence[int],
    instance_buckets: Sequence[int],
    names: Sequence[str] | None = None,
) -> tuple[int, int]:
    """(N, G) capacities of a batch with these per-scene point and instance counts.

    Raises ValueError naming the scenes when the points exceed the largest bucket (fix:
    crop with ``config.data.max_points``, a smaller batch, or a larger bucket) or the
    instances exceed the largest instance bucket.
    """
    names = list(names) if names is not None else [f"#{i}" for i in range(len(point_counts))]
    total = int(sum(point_counts))
    if total > max(buckets):
        detail = ", ".join(f"{nm} ({c} points)" for nm, c in zip(names, point_counts, strict=True))
        raise ValueError(
            f"batch of {total} points exceeds the largest point bucket {max(buckets)}: "
            f"{detail}. Crop scenes (config.data.max_points), lower the batch size or add a "
            f"larger entry to config.data.point_buckets."
        )
    k = int(sum(instance_counts))
    if k > max(instance_buckets):
        detail = ", ".join(
            f"{nm} ({c} instances)" for nm, c in zip(names, instance_counts, strict=True)
        )
        raise ValueError(
            f"batch of {k} GT instances exceeds the largest instance bucket "
            f"{max(instance_buckets)}: {detail}. Add a larger entry to "
            f"config.data.instance_buckets."
        )
    return bucket_for(total, buckets), bucket_for(k, instance_buckets)


def _instance_classes(instance: np.ndarray, semantic: np.ndarray, k: int, s: int) -> np.ndarray:
    """i32[k]: majority semantic class (ignoring -100) of each compact instance id 0..k-1;
    ties -> lower class; -100 when none of its points has a class."""
    sel = (instance >= 0) & (semantic >= 0)
    votes = np.bincount(instance[sel] * s + semantic[sel], minlength=k * s).reshape(k, s)
    cls = votes.argmax(axis=1).astype(np.int32)
    cls[votes.sum(axis=1) == 0] = IGNORE_LABEL
    return cls


def pack_batch(
    samples: Sequence[dict],
    *,
    buckets: Sequence[int],
    instance_buckets: Sequence[int],
    num_classes: int,
    voxel_size: float,
    batch_size: int | None = None,
    voxel_origin: str = "centre",
) -> PointBatch:
    """Pack scenes flat into a numpy ``PointBatch`` (layout: ``dknet_jax/types.py``).

    Args:
      samples: up to B sample dicts (``xyz`` f32[N_b, 3] already centred/augmented,
        ``rgb`` [N_b, 3] in 0..255, ``semantic``/``instance``/``superpoint`` i32[N_b],
        optional ``name``).
      buckets / instance_buckets: ladders for the point capacity N and instance
        capacity G (:func:`batch_capacities`).
      num_classes: S; semantic labels must be 0..S-1 or -100.
      voxel_size: metres, for ``vox`` (:func:`transforms.voxel_coords`, per scene).
      voxel_origin: where each scene's voxel grid is anchored (config
        ``data.voxel_origin``): "centre" (ours) or "scene_min" (released).
      batch_size: B (default len(samples)); missing scenes are empty and
        ``scene_valid`` is False for them.
    Returns:
      PointBatch of numpy arrays with N rows and G instance slots. Instance ids are made
      compact per scene (0..K_b-1, any order gaps removed) and then batch-global by adding
      the number of instances of the earlier scenes; superpoint ids likewise (compact per
      scene, then offset). ``instance_class`` is the majority semantic class of each
      instance's points. Padding rows: batch_id = B, valid False, xyz/feats/vox 0,
      semantic/instance -100, superpoint -1; empty instance slots: class -100, batch B.
    """
    batch_size = len(samples) if batch_size is None else batch_size
    if voxel_origin not in VOXEL_ORIGINS:
        raise ValueError(
            f"pack_batch: voxel_origin {voxel_origin!r} is not one of {VOXEL_ORIGINS} "
            f"(config data.voxel_origin)"
        )
    if not 0 < len(samples) <= batch_size:
        raise ValueError(f"need 1..{batch_size} samples, got {len(samples)}")
    names = [s.get("name", f"#{i}") for i, s in enumerate(samples)]
    insts, sps, counts, kinds = [], [], [], []
    for name, s in zip(names, samples, strict=True):
        sem = np.asarray(s["semantic"])
        bad = (sem != IGNORE_LABEL) & ((sem < 0) | (sem >= num_classes))
        if bad.any():
            raise ValueError(
                f"scene {name}: semantic labels {np.unique(sem[bad])[:5].tolist()} are not "
                f"in 0..{num_classes - 1} or -100"
            )
        inst = reindex_instances(s["instance"])
        _, sp = np.unique(np.asarray(s["superpoint"]), return_inverse=True)
        insts.append(inst)
        sps.append(sp.reshape(-1).astype(np.int32))
        counts.append(len(s["xyz"]))
        kinds.append(int(inst.max()) + 1 if len(inst) and inst.max() >= 0 else 0)
    n_cap, g_cap = batch_capacities(
        counts, kinds, buckets=buckets, instance_buckets=instance_buckets, names=names
    )

    b = batch_size
    xyz = np.zeros((n_cap, 3), np.float32)
    feats = np.zeros((n_cap, 6), np.float32)
    vox = np.zeros((n_cap, 3), np.int32)
    batch_id = np.full(n_cap, b, np.int32)
    valid = np.zeros(n_cap, bool)
    semantic = np.full(n_cap, IGNORE_LABEL, np.int32)
    instance = np.full(n_cap, IGNORE_LABEL, np.int32)
    superpoint = np.full(n_cap, -1, np.int32)
    instance_class = np.full(g_cap, IGNORE_LABEL, np.int32)
    instance_batch = np.full(g_cap, b, np.int32)
    instance_valid = np.zeros(g_cap, bool)
    scene_valid = np.zeros(b, bool)

    row, inst_off, sp_off = 0, 0, 0
    for i, s in enumerate(samples):
        n, k = counts[i], kinds[i]
        rows = slice(row, row + n)
        xyz[rows] = s["xyz"]
        feats[rows] = point_features(s["rgb"], s["xyz"])
        vox[rows] = voxel_coords(s["xyz"], voxel_size, voxel_origin)
        batch_id[rows] = i
        valid[rows] = True
        sem = np.asarray(s["semantic"], np.int32)
        semantic[rows] = sem
        inst = insts[i]
        instance[rows] = np.where(inst >= 0, inst + inst_off, IGNORE_LABEL)
        superpoint[rows] = sps[i] + sp_off
        slots = slice(inst_off, inst_off + k)
        instance_class[slots] = _instance_classes(inst, sem, k, num_classes)
        instance_batch[slots] = i
        instance_valid[slots] = True
        scene_valid[i] = True
        row += n
        inst_off += k
        sp_off += int(sps[i].max()) + 1 if n else 0
    return PointBatch(
        xyz=xyz,
        feats=feats,
        vox=vox,
        batch_id=batch_id,
        valid=valid,
        semantic=semantic,
        instance=instance,
        superpoint=superpoint,
        instance_class=instance_class,
        instance_batch=instance_batch,
        instance_valid=instance_valid,
        scene_valid=scene_valid,
    )


def batch_shape(batch: PointBatch) -> tuple[int, int, int]:
    """(B, N, G) of a packed batch: the key that decides recompilation."""
    return (batch.num_scenes, int(batch.xyz.shape[0]), int(batch.instance_class.shape[0]))


def place_block(
    block: PointBatch,
    *,
    index: int,
    count: int,
    point_capacity: int,
    instance_capacity: int,
) -> PointBatch:
    """Block ``index`` of ``count`` of a global batch assembled from per-process blocks.

    Multi-host training packs each process's share of the global batch (``b`` scenes) as
    its own ``PointBatch`` (``pack_batch``); the global batch is the blocks laid one
    after the other: ``count * point_capacity`` point rows, ``count * instance_capacity``
    instance slots, ``count * b`` scenes. This pads ``block`` to the capacities all
    processes agreed on (the largest bucket any of them needs, so the shapes match) and
    makes its ids global: scene ids ``+ index * b`` (padding rows and empty slots get the
    global ``B = count * b``), instance ids ``+ index * instance_capacity``, superpoint ids
    ``+ index * point_capacity``. Scenes keep their order, so a global batch differs from
    the single-process packing of the same scenes only by where the padding rows and
    empty instance slots sit; nothing downstream depends on that (padding is masked by
    ``valid`` / ``instance_valid`` and its ids point at the sentinel scene B).
    """
    if not 0 <= index < count:
        raise ValueError(f"block index {index} is not in 0..{count - 1}")
    n, g = int(block.xyz.shape[0]), int(block.instance_class.shape[0])
    if point_capacity < n or instance_capacity < g:
        raise ValueError(
            f"block of {n} points / {g} instance slots does not fit the agreed capacities "
            f"{point_capacity} / {instance_capacity}"
        )
    b = int(block.scene_valid.shape[0])
    big_b = count * b

    def pad(x, size, fill):
        x = np.asarray(x)
        out = np.full((size,) + x.shape[1:], fill, x.dtype)
        out[: len(x)] = x
        return out

    valid = pad(block.valid, point_capacity, False)
    inst_valid = pad(block.instance_valid, instance_capacity, False)
    instance = pad(block.instance, point_capacity, IGNORE_LABEL)
    superpoint = pad(block.superpoint, point_capacity, -1)
    return PointBatch(
        xyz=pad(block.xyz, point_capacity, 0),
        feats=pad(block.feats, point_capacity, 0),
        vox=pad(block.vox, point_capacity, 0),
        batch_id=np.where(valid, pad(block.batch_id, point_capacity, 0) + index * b, big_b).astype(
            np.int32
        ),
        valid=valid,
        semantic=pad(block.semantic, point_capacity, IGNORE_LABEL),
        instance=np.where(instance >= 0, instance + index * instance_capacity, instance).astype(
            np.int32
        ),
        superpoint=np.where(superpoint >= 0, superpoint + index * point_capacity, -1).astype(
            np.int32
        ),
        instance_class=pad(block.instance_class, instance_capacity, IGNORE_LABEL),
        instance_batch=np.where(
            inst_valid, pad(block.instance_batch, instance_capacity, 0) + index * b, big_b
        ).astype(np.int32),
        instance_valid=inst_valid,
        scene_valid=np.asarray(block.scene_valid),
    )


def concat_blocks(blocks: Sequence[PointBatch]) -> PointBatch:
    """The global batch of already placed blocks (``place_block``), concatenated along
    every axis; what ``jax.make_array_from_process_local_data`` assembles across
    processes, built in one process (tests, single-host reference runs)."""
    return PointBatch(
        **{
            f: np.concatenate([np.asarray(getattr(x, f)) for x in blocks])
            for f in PointBatch.__dataclass_fields__
        }
    )

"""Packing scenes into bucketed PointBatches (dknet_jax/data/batching.py)."""

import numpy as np
import pytest

from dknet_jax.data.batching import (
    batch_capacities,
    batch_shape,
    bucket_for,
    make_ladder,
    pack_batch,
)

S = 5  # classes


def scene(n, seed, inst_ids=(0, 1, 2), name=None):
    rng = np.random.default_rng(seed)
    inst = rng.choice(np.array(list(inst_ids) + [-100], np.int32), size=n)
    return {
        "xyz": rng.normal(0, 1, (n, 3)).astype(np.float32),
        "rgb": rng.integers(0, 256, (n, 3)).astype(np.uint8),
        "semantic": np.where(rng.random(n) < 0.1, -100, rng.integers(0, S, n)).astype(np.int32),
        "instance": inst,
        "superpoint": (rng.integers(0, 8, n) * 1000 + 7).astype(np.int32),  # sparse ids
        "name": name or f"s{seed}",
    }


def test_ladder_and_bucket_for():
    assert make_ladder(1000, 5000, factors=(1.0, 1.5), multiple=256) == (
        1024,
        1536,
        2048,
        3072,
        4096,
        6144,
    )
    assert make_ladder(16, 100, factors=(1.0,), multiple=16) == (16, 32, 64, 128)
    assert bucket_for(1, (4, 8)) == 4
    assert bucket_for(4, (8, 4)) == 4
    assert bucket_for(5, (4, 8)) == 8
    with pytest.raises(ValueError, match="exceeds the largest bucket 8"):
        bucket_for(9, (4, 8))
    with pytest.raises(ValueError):
        make_ladder(10, 5)


def test_pack_batch_layout_against_direct_construction():
    a = scene(50, 1, inst_ids=(3, 9))  # non-compact ids -> 0, 1
    b = scene(30, 2, inst_ids=(0, 1, 2))
    c = scene(20, 3, inst_ids=())  # no instances
    samples = [a, b, c]
    batch = pack_batch(
        samples,
        buckets=(64, 128, 256),
        instance_buckets=(4, 8, 16),
        num_classes=S,
        voxel_size=0.1,
        batch_size=4,
    )
    assert batch_shape(batch) == (4, 128, 8)
    np.testing.assert_array_equal(batch.scene_valid, [True, True, True, False])
    row = 0
    inst_off = 0
    sp_off = 0
    for i, s in enumerate(samples):
        n = len(s["xyz"])
        rows = np.arange(row, row + n)
        np.testing.assert_array_equal(np.flatnonzero(batch.batch_id == i), rows)
        np.testing.assert_array_equal(batch.xyz[rows], s["xyz"])
        np.testing.assert_allclose(batch.feats[rows, :3], s["rgb"] / 127.5 - 1, atol=1e-6)
        np.testing.assert_array_equal(batch.feats[rows, 3:], s["xyz"])
        ref_vox = np.floor(s["xyz"].astype(np.float64) / 0.1).astype(int)
        np.testing.assert_array_equal(batch.vox[rows], ref_vox - ref_vox.min(0))
        np.testing.assert_array_equal(batch.semantic[rows], s["semantic"])
        assert batch.valid[rows].all()
        # instance ids: old ids in increasing order -> offset + 0, 1, ...
        old_ids = sorted(set(s["instance"][s["instance"] >= 0].tolist()))
        expect = np.array([inst_off + old_ids.index(v) if v >= 0 else -100 for v in s["instance"]])
        np.testing.assert_array_equal(batch.instance[rows], expect)
        for j, old in enumerate(old_ids):
            slot = inst_off + j
            assert batch.instance_valid[slot] and batch.instance_batch[slot] == i
            sem = s["semantic"][(s["instance"] == old) & (s["semantic"] >= 0)]
            counts = np.bincount(sem, minlength=S)
            assert batch.instance_class[slot] == np.argmax(counts)
        # superpoints: compact per scene, then offset
        sp_old = sorted(set(s["superpoint"].tolist()))
        np.testing.assert_array_equal(
            batch.superpoint[rows], [sp_off + sp_old.index(v) for v in s["superpoint"]]
        )
        row += n
        inst_off += len(old_ids)
        sp_off += len(sp_old)
    pad = np.arange(row, 128)
    assert (batch.batch_id[pad] == 4).all() and not batch.valid[pad].any()
    assert (batch.semantic[pad] == -100).all() and (batch.instance[pad] == -100).all()
    assert (batch.superpoint[pad] == -1).all()
    assert (batch.xyz[pad] == 0).all() and (batch.feats[pad] == 0).all()
    assert (batch.vox[pad] == 0).all()
    assert inst_off == 5
    assert not batch.instance_valid[5:].any()
    assert (batch.instance_class[5:] == -100).all() and (batch.instance_batch[5:] == 4).all()
    dtypes = {
        k: getattr(batch, k).dtype
        for k in ("xyz", "feats", "vox", "batch_id", "semantic", "instance", "superpoint")
    }
    assert dtypes == {
        "xyz": np.float32,
        "feats": np.float32,
        "vox": np.int32,
        "batch_id": np.int32,
        "semantic": np.int32,
        "instance": np.int32,
        "superpoint": np.int32,
    }


def test_instance_class_majority_hand_example():
    s = scene(6, 0)
    s["instance"] = np.array([0, 0, 0, 1, 1, -100], np.int32)
    s["semantic"] = np.array([2, 3, 3, -100, -100, 1], np.int32)
    batch = pack_batch([s], buckets=(8,), instance_buckets=(2,), num_classes=S, voxel_size=0.1)
    # instance 0: votes {2: 1, 3: 2} -> 3; instance 1: no labelled point -> -100
    np.testing.assert_array_equal(batch.instance_class, [3, -100])


def test_too_many_points_names_scenes_and_suggests_crop():
    samples = [scene(40, 0, name="sceneA"), scene(30, 1, name="sceneB")]
    with pytest.raises(ValueError, match=r"sceneA \(40 points\).*max_points"):
        pack_batch(samples, buckets=(32, 64), instance_buckets=(8,), num_classes=S, voxel_size=0.1)
    with pytest.raises(ValueError, match="instance_buckets"):
        pack_batch(samples, buckets=(128,), instance_buckets=(2,), num_classes=S, voxel_size=0.1)
    bad = scene(10, 0, name="sceneC")
    bad["semantic"][0] = S
    with pytest.raises(ValueError, match="sceneC"):
        pack_batch([bad], buckets=(16,), instance_buckets=(8,), num_classes=S, voxel_size=0.1)


def test_bucket_count_bounded_over_200_varied_scenes():
    """200 scenes of ScanNet-like size spread (scaled 1/100 to keep the test fast),
    packed 4 at a time in random order: only a handful of distinct shapes."""
    rng = np.random.default_rng(0)
    sizes = np.clip(rng.lognormal(np.log(1400), 0.5, 200), 200, 2500).astype(int)
    ninst = np.clip(rng.poisson(sizes / 80), 1, None)
    buckets = make_ladder(1024, 10_000, factors=(1.0, 1.5), multiple=128)
    inst_buckets = (16, 32, 64, 128, 256)
    order = rng.permutation(200)
    shapes, fill = set(), []
    for start in range(0, 200, 4):
        idx = order[start : start + 4]
        samples = [scene(int(sizes[i]), int(i), inst_ids=range(int(ninst[i]))) for i in idx]
        batch = pack_batch(
            samples,
            buckets=buckets,
            instance_buckets=inst_buckets,
            num_classes=S,
            voxel_size=0.1,
            batch_size=4,
        )
        shapes.add(batch_shape(batch))
        fill.append(batch.valid.mean())
        n, g = batch_capacities(
            sizes[idx], ninst[idx], buckets=buckets, instance_buckets=inst_buckets
        )
        assert (n, g) == batch_shape(batch)[1:]
    assert len(shapes) <= 6, shapes
    assert len({s[1] for s in shapes}) <= 4
    assert np.mean(fill) > 0.7  # the {1, 1.5} ladder wastes < 30% on average


def test_pack_batch_voxel_origin_per_scene():
    """``voxel_origin="scene_min"``: each scene's grid starts at its own minimum point,
    ``floor(p * scale - min(p * scale))`` (the released loader, scale = 1 / voxel), not at
    the batch's; "centre" (default) is ``floor(p / voxel)`` minus its per-scene minimum."""
    samples = [scene(40, 4), scene(60, 5), scene(25, 6)]
    samples[1]["xyz"] = samples[1]["xyz"] + np.float32(3.3)  # scenes far apart
    kw = dict(buckets=(128, 256), instance_buckets=(8, 16), num_classes=S, voxel_size=0.1)
    ours = pack_batch(samples, **kw)
    np.testing.assert_array_equal(ours.vox, pack_batch(samples, voxel_origin="centre", **kw).vox)
    released = pack_batch(samples, voxel_origin="scene_min", **kw)
    differ = 0
    for i, s in enumerate(samples):
        rows = released.batch_id == i
        p = s["xyz"].astype(np.float64) * 10.0
        np.testing.assert_array_equal(released.vox[rows], np.floor(p - p.min(0)))
        c = np.floor(s["xyz"].astype(np.float64) / 0.1)
        np.testing.assert_array_equal(ours.vox[rows], c - c.min(0))
        differ += int((released.vox[rows] != ours.vox[rows]).any())
    assert differ == 3  # a sub-voxel shift in every scene
    assert (released.vox[released.batch_id == 3] == 0).all()  # padding
    for f in ("xyz", "feats", "batch_id", "instance", "superpoint", "instance_class"):
        np.testing.assert_array_equal(getattr(released, f), getattr(ours, f), err_msg=f)
    with pytest.raises(ValueError, match="voxel_origin 'origin'.*data.voxel_origin"):
        pack_batch(samples, voxel_origin="origin", **kw)

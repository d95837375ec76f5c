"""Scene loading/validation and the train/eval iterators (dknet_jax/data/dataset.py,
dknet_jax/data/pipeline.py), on small synthetic npz files written here."""

import dataclasses
import json
import os

import numpy as np
import pytest

from dknet_jax.data.dataset import SceneError, list_scenes, load_scene, scene_num_points
from dknet_jax.data.pipeline import EvalIterator, TrainIterator, scene_rng
from dknet_jax.data.transforms import (
    AugmentConfig,
    flip_matrix,
    jitter_matrix,
    random_rotation_matrix,
)

S = 20
BUCKETS = (1024, 1536, 2048, 3072, 4096)
IBUCKETS = (16, 32, 64)
FIELDS = [
    f.name
    for f in dataclasses.fields(__import__("dknet_jax.types", fromlist=["PointBatch"]).PointBatch)
]


def room(n, seed):
    """A small room: floor points + a few box objects (instances), superpoints by cell."""
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, 5))
    n_obj = n // 2 // k
    floor = rng.uniform([0, 0, 0], [4, 3, 0.02], (n - n_obj * k, 3))
    objs, inst, sem = [floor], [np.full(len(floor), -100)], [np.full(len(floor), 1)]
    for j in range(k):
        c = rng.uniform([0.5, 0.5, 0.3], [3.5, 2.5, 0.6])
        objs.append(c + rng.uniform(-0.3, 0.3, (n_obj, 3)))
        inst.append(np.full(n_obj, j))
        sem.append(np.full(n_obj, rng.integers(2, S)))
    xyz = np.concatenate(objs).astype(np.float32) + np.float32(rng.uniform(-5, 5))
    return {
        "xyz": xyz,
        "rgb": rng.integers(0, 256, (n, 3)).astype(np.uint8),
        "semantic": np.concatenate(sem).astype(np.int32),
        "instance": np.concatenate(inst).astype(np.int32),
        "superpoint": (np.floor(xyz[:, 0] * 2) * 100 + np.floor(xyz[:, 1] * 2)).astype(np.int32)
        - int(np.floor(xyz[:, :2].min() * 2) * 101)
        + 1000,
    }


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    d = tmp_path_factory.mktemp("scenes")
    rng = np.random.default_rng(0)
    sizes = rng.integers(200, 900, 11)
    paths = []
    for i, n in enumerate(sizes):
        p = d / f"scene{i:04d}_00.npz"
        np.savez(p, **room(int(n), i))
        paths.append(str(p))
    return paths


def train_iter(paths, **kw):
    args = dict(
        batch_size=3,
        seed=7,
        voxel_size=0.05,
        num_classes=S,
        buckets=BUCKETS,
        instance_buckets=IBUCKETS,
        augment_config=AugmentConfig.for_voxel_size(0.05, max_points=800),
        num_workers=0,
    )
    args.update(kw)
    return TrainIterator(paths, **args)


def take(it, k):
    return [next(it) for _ in range(k)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for f in FIELDS:
            np.testing.assert_array_equal(getattr(x, f), getattr(y, f), err_msg=f)


# --------------------------------------------------------------------------------------
# dataset


def test_load_scene_roundtrip(split):
    s = load_scene(split[0], num_classes=S)
    with np.load(split[0]) as f:
        for k in ("xyz", "rgb", "semantic", "instance", "superpoint"):
            np.testing.assert_array_equal(s[k], f[k])
        assert scene_num_points(split[0]) == len(f["xyz"])
    assert s["name"] == "scene0000_00"


@pytest.mark.parametrize(
    "case, pattern",
    [
        ("missing", "missing key 'superpoint'"),
        ("dtype", "'xyz' has dtype float64, expected float32"),
        ("shape", r"'rgb' has shape \(50, 4\)"),
        ("rows", "'semantic' has 49 rows"),
        ("nan", "NaN/inf"),
        ("empty", "empty scene"),
        ("semantic", "outside 0..19"),
        ("instance", "'instance' has negative values"),
        ("superpoint", "negative ids"),
        ("notzip", "cannot read as .npz"),
    ],
)
def test_bad_scene_files_name_the_file(tmp_path, case, pattern):
    s = room(50, 3)
    if case == "missing":
        del s["superpoint"]
    elif case == "dtype":
        s["xyz"] = s["xyz"].astype(np.float64)
    elif case == "shape":
        s["rgb"] = np.zeros((50, 4), np.uint8)
    elif case == "rows":
        s["semantic"] = s["semantic"][:49]
    elif case == "nan":
        s["xyz"][7, 1] = np.nan
    elif case == "empty":
        s = {k: v[:0] for k, v in s.items()}
    elif case == "semantic":
        s["semantic"][3] = S
    elif case == "instance":
        s["instance"][3] = -1
    elif case == "superpoint":
        s["superpoint"][3] = -1
    path = tmp_path / f"bad_{case}.npz"
    if case == "notzip":
        path.write_text("not a zip")
    else:
        np.savez(path, **s)
    with pytest.raises(SceneError, match=pattern) as err:
        load_scene(path, num_classes=S)
    assert f"bad_{case}.npz" in str(err.value)


def test_missing_file_and_unlabelled_scene(tmp_path):
    with pytest.raises(SceneError, match="nope.npz"):
        load_scene(tmp_path / "nope.npz")
    s = room(30, 1)
    del s["semantic"], s["instance"]
    np.savez(tmp_path / "test_scene.npz", **s)
    with pytest.raises(SceneError, match="missing key 'semantic'"):
        load_scene(tmp_path / "test_scene.npz")
    out = load_scene(tmp_path / "test_scene.npz", require_labels=False)
    assert (out["semantic"] == -100).all() and (out["instance"] == -100).all()


def test_list_scenes(tmp_path, split):
    root = os.path.dirname(split[0])
    assert list_scenes(root) == sorted(split)
    (tmp_path / "val.txt").write_text("b\na\n")
    for n in ("a", "b", "c"):
        np.savez(tmp_path / f"{n}.npz", **room(10, 0))
    assert [os.path.basename(p) for p in list_scenes(tmp_path, "val")] == ["a.npz", "b.npz"]
    (tmp_path / "train.txt").write_text("a\nzzz\n")
    with pytest.raises(SceneError, match="zzz"):
        list_scenes(tmp_path, "train")
    with pytest.raises(SceneError, match="split 'test' not found"):
        list_scenes(tmp_path, "test")


def test_list_scenes_bom_binary_list_and_root_a_file(tmp_path):
    """A BOM is not part of the first name; a binary list and a root that is a file are
    errors naming the file (issue 11 probes)."""
    for n in ("a", "b"):
        np.savez(tmp_path / f"{n}.npz", **room(10, 0))
    (tmp_path / "val.txt").write_bytes(b"\xef\xbb\xbfb\r\na\r\n")
    assert [os.path.basename(p) for p in list_scenes(tmp_path, "val")] == ["a.npz", "b.npz"]
    (tmp_path / "train.txt").write_bytes(bytes(range(128, 256)))
    with pytest.raises(SceneError, match=r"train.txt: split list is not a text file"):
        list_scenes(tmp_path, "train")
    with pytest.raises(SceneError, match=r"a.npz: prepared-scene folder is a file"):
        list_scenes(tmp_path / "a.npz", "train")


# --------------------------------------------------------------------------------------
# training iterator


def test_same_seed_same_batches_any_worker_count(split):
    ref = take(train_iter(split), 7)  # crosses the epoch boundary (3 batches/epoch)
    with train_iter(split, num_workers=2, prefetch=3) as it:
        assert_same(ref, take(it, 7))
    other = take(train_iter(split, seed=8), 3)
    assert any(not np.array_equal(a.xyz, b.xyz) for a, b in zip(ref, other, strict=True))
    # epochs differ from each other (new shuffle and new augmentation)
    assert not np.array_equal(ref[0].xyz, ref[3].xyz)


def test_scene_augmentation_depends_only_on_seed_epoch_scene(split):
    """Whatever batch a scene lands in, its transform is drawn from
    scene_rng(seed, epoch, scene index): recover each scene's linear map (elastic and crop
    off) and compare with the matrices drawn from that generator."""
    cfg = AugmentConfig(elastic=(), max_points=None)
    sizes = [scene_num_points(p) for p in split]
    assert len(set(sizes)) == len(sizes)
    for window in (0, 2):
        it = train_iter(
            split, augment_config=cfg, size_window=window, num_epochs=2, drop_remainder=False
        )
        maps = {}
        for k, batch in enumerate(it):
            epoch = k // 4
            for b in np.flatnonzero(batch.scene_valid):
                rows = batch.batch_id == b
                i = sizes.index(int(rows.sum()))
                src = load_scene(split[i])["xyz"].astype(np.float64)
                src -= src.mean(0)
                m, *_ = np.linalg.lstsq(src, batch.xyz[rows], rcond=None)
                rng = scene_rng(7, epoch, i)
                want = jitter_matrix(rng, 0.1) @ flip_matrix(rng) @ random_rotation_matrix(rng)
                np.testing.assert_allclose(m, want, atol=1e-4)
                maps[epoch, i] = m
        assert len(maps) == 22
        assert min(np.abs(maps[0, 0] - m).max() for key, m in maps.items() if key != (0, 0)) > 1e-3


def test_transfer_runs_on_each_batch(split):
    import jax

    ref = take(train_iter(split), 2)
    with train_iter(split, num_workers=2, transfer=jax.device_put) as it:
        got = take(it, 2)
    assert isinstance(got[0].xyz, jax.Array)
    assert_same(ref, [jax.tree.map(np.asarray, b) for b in got])
    ev = EvalIterator(
        split[:2],
        batch_size=2,
        voxel_size=0.05,
        num_classes=S,
        buckets=BUCKETS,
        instance_buckets=IBUCKETS,
        transfer=jax.device_put,
    )
    batch, names = next(ev)
    assert isinstance(batch.vox, jax.Array) and names == ["scene0000_00", "scene0001_00"]


def test_epoch_covers_scenes_once_and_crops(split):
    it = train_iter(split, drop_remainder=False, augment_config=None)
    assert it.batches_per_epoch() == 4
    counts = []
    for batch in take(it, 4):
        counts += [int((batch.batch_id == b).sum()) for b in range(3) if batch.scene_valid[b]]
    sizes = sorted(scene_num_points(p) for p in split)
    assert sorted(counts) == sizes  # every scene exactly once, uncropped
    cropped = take(train_iter(split), 6)
    for batch in cropped:
        per_scene = np.bincount(batch.batch_id[batch.valid], minlength=3)
        assert per_scene.max() <= 800 and batch.scene_valid.all()


def test_resume_mid_epoch_equals_uninterrupted(split):
    ref = take(train_iter(split, num_workers=2), 8)
    it = train_iter(split, num_workers=2, prefetch=4)
    first = take(it, 4)  # one batch into epoch 1, with more prefetched
    state = json.loads(json.dumps(it.state()))
    it.close()
    assert state["epoch"] == 1 and state["position"] == 1
    resumed = train_iter(split, state=state)
    assert_same(ref, first + take(resumed, 4))
    # restore() on a running iterator rewinds it too
    it2 = train_iter(split, num_workers=1)
    take(it2, 6)
    it2.restore(state)
    assert_same(ref[4:], take(it2, 4))
    it2.close()
    with pytest.raises(ValueError, match="num_scenes"):
        train_iter(split[:-1], state=state)


def test_size_grouping_and_finite_epochs(split):
    it = train_iter(split, size_window=2, num_epochs=2, drop_remainder=False)
    batches = list(it)
    assert len(batches) == 8
    seen = []
    for batch in batches[:4]:
        seen += [int((batch.batch_id == b).sum()) for b in range(3) if batch.scene_valid[b]]
    assert len(seen) == 11  # each scene once per epoch
    with pytest.raises(StopIteration):
        next(it)
    assert it.state()["epoch"] == 2


def test_crop_lowered_when_batch_cannot_fit(split):
    with pytest.warns(UserWarning, match="cropping each scene to 341"):
        it = train_iter(split, buckets=(1024,), augment_config=AugmentConfig())
    batch = next(it)
    assert batch.xyz.shape[0] == 1024 and batch.valid.sum() <= 1023


def test_bad_file_error_surfaces_from_workers(split, tmp_path):
    bad = tmp_path / "broken.npz"
    s = room(100, 0)
    s["rgb"] = s["rgb"].astype(np.int32)
    np.savez(bad, **s)
    it = train_iter(split[:2] + [str(bad)], num_workers=2)
    with pytest.raises(SceneError, match="broken.npz"):
        next(it)
    it.close()


# --------------------------------------------------------------------------------------
# evaluation iterator


def test_eval_iterator_every_scene_once_in_order(split):
    it = EvalIterator(
        split,
        batch_size=4,
        voxel_size=0.05,
        num_classes=S,
        buckets=(1024, 2048),
        instance_buckets=IBUCKETS,
        num_workers=2,
    )
    names, n_batches = [], 0
    for batch, bnames in it:
        n_batches += 1
        assert len(bnames) == 4 and batch.xyz.shape[0] in (1024, 2048)
        np.testing.assert_array_equal(batch.scene_valid, [n is not None for n in bnames])
        for b, name in enumerate(bnames):
            if name is None:
                assert not (batch.batch_id == b).any()
                continue
            names.append(name)
            s = load_scene(split[int(name[5:9])])
            rows = batch.batch_id == b
            centred = s["xyz"] - s["xyz"].astype(np.float64).mean(0)
            np.testing.assert_allclose(batch.xyz[rows], centred, atol=1e-4)  # no augment
            np.testing.assert_array_equal(batch.semantic[rows], s["semantic"])
    assert names == [os.path.basename(p)[:-4] for p in split]
    assert n_batches == len(it) and n_batches >= 3  # 11 scenes of <= 900 in <= 2048 rows
    again = EvalIterator(
        split,
        batch_size=4,
        voxel_size=0.05,
        num_classes=S,
        buckets=(1024, 2048),
        instance_buckets=IBUCKETS,
        num_workers=0,
    )
    assert_same(
        [b for b, _ in again],
        [
            b
            for b, _ in EvalIterator(
                split,
                batch_size=4,
                voxel_size=0.05,
                num_classes=S,
                buckets=(1024, 2048),
                instance_buckets=IBUCKETS,
                num_workers=2,
            )
        ],
    )


def test_eval_scene_larger_than_largest_bucket(split):
    with pytest.raises(ValueError, match=r"scene00\d\d_00.npz: \d+ points exceed"):
        EvalIterator(
            split,
            batch_size=1,
            voxel_size=0.05,
            num_classes=S,
            buckets=(256,),
            instance_buckets=IBUCKETS,
        )


def released_data_augment_global(xyz, count):
    """The released testMerge draws, transcribed with numpy's *global* legacy API as the
    released code calls it (np.random.seed, np.random.randint, np.random.rand), state
    saved and restored around it. Returns (matrices, transformed xyz of each draw)."""
    import math

    saved = np.random.get_state()
    try:
        np.random.seed(567)
        mats = []
        for _ in range(count):
            m = np.eye(3)
            m[0][0] *= np.random.randint(0, 2) * 2 - 1
            theta = np.random.rand() * 2 * math.pi
            m = np.matmul(
                m,
                [
                    [math.cos(theta), math.sin(theta), 0],
                    [-math.sin(theta), math.cos(theta), 0],
                    [0, 0, 1],
                ],
            )
            mats.append(m)
    finally:
        np.random.set_state(saved)
    return np.array(mats), [np.matmul(xyz, m) for m in mats]


def test_released_test_transform(split):
    from dknet_jax.data.transforms import prepare_eval, released_test_matrices

    mats = released_test_matrices(567, 40)
    want, _ = released_data_augment_global(np.zeros((1, 3)), 40)
    np.testing.assert_array_equal(mats, want)  # the released stream, draw for draw
    np.testing.assert_array_equal(released_test_matrices(567, 5), mats[:5])  # prefix-stable
    assert not np.allclose(released_test_matrices(568, 5), mats[:5])
    for m in mats:  # a rigid map: z kept, x-flip optional, rotation about z
        np.testing.assert_allclose(m @ m.T, np.eye(3), atol=1e-12)
        np.testing.assert_array_equal(m[2], [0, 0, 1])
        np.testing.assert_array_equal(m[:, 2], [0, 0, 1])
    flips = np.linalg.det(mats) < 0
    assert 0 < flips.sum() < len(mats)  # both with and without the x-flip
    s = load_scene(split[3])
    plain, moved = prepare_eval(s), prepare_eval(s, mats[3])
    a, b = plain["xyz"].astype(np.float64), moved["xyz"].astype(np.float64)
    d_a = np.linalg.norm(a[:, None] - a[None], axis=-1)
    d_b = np.linalg.norm(b[:, None] - b[None], axis=-1)
    np.testing.assert_allclose(d_b, d_a, atol=2e-5)  # distances preserved
    np.testing.assert_allclose(b, a @ mats[3], atol=1e-5)
    np.testing.assert_allclose(b.mean(0), 0, atol=1e-4)
    assert not np.allclose(a, b, atol=1e-2)
    for k in ("rgb", "semantic", "instance", "superpoint"):
        np.testing.assert_array_equal(moved[k], s[k])
    with pytest.raises(ValueError, match="matrix"):
        prepare_eval(s, np.eye(2))
    with pytest.raises(ValueError, match="seed"):
        released_test_matrices(-1, 3)
    # the iterator: off by default (centred only); on, scene i gets matrix i of the stream
    kw = dict(
        batch_size=4,
        voxel_size=0.05,
        num_classes=S,
        buckets=(1024, 2048),
        instance_buckets=IBUCKETS,
        num_workers=0,
    )
    for seed in (None, 567):
        for batch, names in EvalIterator(split, released_aug_seed=seed, **kw):
            for b, name in enumerate(names):
                if name is None:
                    continue
                i = int(name[5:9])
                want = prepare_eval(load_scene(split[i]), None if seed is None else mats[i])
                np.testing.assert_array_equal(batch.xyz[batch.batch_id == b], want["xyz"])


def released_vox(xyz, voxel_size):
    """The released voxel coordinates of one scene (R:data/scannetv2_inst.py: ``xyz *
    scale; xyz -= xyz.min(0); .long()``), numpy float64, scale = 1 / voxel_size."""
    p = np.asarray(xyz, np.float64) * (1.0 / voxel_size)
    return np.trunc(p - p.min(0)).astype(np.int64)


def ours_vox(xyz, voxel_size):
    c = np.floor(np.asarray(xyz, np.float64) / voxel_size)
    return c - c.min(0)


def check_vox(batch, voxel_size, origin):
    """Every valid scene of ``batch``: vox from its own xyz rows by ``origin``; returns how
    many scenes differ between the two anchors (the test must be able to tell them apart)."""
    differ = 0
    for b in np.flatnonzero(batch.scene_valid):
        rows = batch.batch_id == b
        xyz = batch.xyz[rows]
        want = released_vox(xyz, voxel_size) if origin == "scene_min" else ours_vox(xyz, voxel_size)
        np.testing.assert_array_equal(batch.vox[rows], want)
        differ += int(not np.array_equal(released_vox(xyz, voxel_size), ours_vox(xyz, voxel_size)))
    assert (batch.vox[~batch.valid] == 0).all()
    return differ


def test_iterators_honour_voxel_origin(split):
    """``data.voxel_origin`` reaches the voxels of every batch of both iterators (and the
    config factory ``train_iterator``); everything else in the batch is unchanged."""
    from dknet_jax.config import base_config
    from dknet_jax.data.pipeline import train_iterator

    kw = dict(voxel_size=0.05, num_classes=S, buckets=(1024, 2048), instance_buckets=IBUCKETS)
    differ = 0
    for origin in ("centre", "scene_min"):
        batches = take(train_iter(split, voxel_origin=origin), 3)
        differ += sum(check_vox(b, 0.05, origin) for b in batches)
        if origin == "scene_min":
            default = take(train_iter(split), 3)
            for x, y in zip(batches, default, strict=True):
                for f in FIELDS:
                    if f != "vox":
                        np.testing.assert_array_equal(getattr(x, f), getattr(y, f), err_msg=f)
        for batch, _ in EvalIterator(split, batch_size=2, num_workers=0, voxel_origin=origin, **kw):
            differ += check_vox(batch, 0.05, origin)
    assert differ > 0
    c = base_config()
    c.data.voxel_size, c.data.batch_size, c.data.max_points = 0.05, 2, 800
    c.data.point_buckets, c.data.instance_buckets = BUCKETS, IBUCKETS
    for origin in ("centre", "scene_min"):
        c.data.voxel_origin = origin
        with train_iterator(split, c, num_workers=0, num_epochs=1) as it:
            check_vox(next(it), 0.05, origin)
    for cls, extra in ((TrainIterator, {"seed": 0, "augment_config": None}), (EvalIterator, {})):
        with pytest.raises(ValueError, match="voxel_origin 'min'.*data.voxel_origin"):
            cls(split, batch_size=2, voxel_origin="min", num_workers=0, **kw, **extra)


def test_evaluate_split_uses_the_configured_voxel_origin(tmp_path, split, monkeypatch):
    """evaluate.py's iterator is built from ``config.data.voxel_origin`` (spied: the
    iterator ``evaluate_split`` builds is kept and read, the model is never run)."""
    import shutil

    from dknet_jax.config import base_config
    from dknet_jax.inference import evaluate as ev

    (tmp_path / "val").mkdir()
    for p in split[:3]:
        shutil.copy(p, tmp_path / "val")
    built = []

    class Stop(Exception):
        pass

    def spy(*args, **kwargs):
        built.append(EvalIterator(*args, **kwargs))
        return built[-1]

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(ev, "EvalIterator", spy)
    monkeypatch.setattr(ev, "make_predict_fn", stop)
    c = base_config()
    c.data.root, c.data.voxel_size = str(tmp_path), 0.05
    c.data.point_buckets, c.data.instance_buckets = (1024, 2048), IBUCKETS
    differ = 0
    for origin in ("centre", "scene_min"):
        c.data.voxel_origin = origin
        with pytest.raises(Stop):
            ev.evaluate_split(None, None, None, c, split="val", progress=False)
        with built[-1] as it:
            for batch, _ in it:
                differ += check_vox(batch, 0.05, origin)
    assert differ > 0

"""Multi-host data parallelism: the global batch assembled from per-process blocks holds
the single-process batch's scenes, and 2 processes on localhost (``jax.distributed``,
CPU collectives over gloo) train like one process with the same global batch, with the
checkpoint written once and an exact resume after a kill."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from dknet_jax.checkpoint import read_meta
from dknet_jax.data.batching import concat_blocks, pack_batch, place_block
from dknet_jax.data.dataset import list_scenes
from dknet_jax.data.pipeline import TrainIterator
from dknet_jax.data.scannet import prepare_scannet
from dknet_jax.synthetic import make_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multihost_worker.py")
sys.path.insert(0, os.path.join(ROOT, "configs"))
import synthetic  # noqa: E402


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    base = tmp_path_factory.mktemp("mh")
    make_dataset(
        str(base / "raw"),
        scenes=5,
        seed=3,
        format="scannet",
        size="tiny",
        val_fraction=0.2,
        progress=False,
    )
    prepare_scannet(str(base / "raw"), str(base / "prepared"), progress=False, workers=1)
    return str(base / "prepared")


def _scene(rng, n, k, sp, name):
    inst = rng.integers(-1, k, n)
    inst[:k] = np.arange(k)  # every instance present
    sem = rng.integers(0, 5, n)
    sem[rng.random(n) < 0.1] = -100
    return {
        "xyz": rng.normal(size=(n, 3)).astype(np.float32),
        "rgb": rng.integers(0, 256, (n, 3)).astype(np.float32),
        "semantic": sem,
        "instance": np.where(inst >= 0, inst * 7 + 3, -100),  # ids with gaps
        "superpoint": rng.integers(0, sp, n) * 5 + 11,
        "name": name,
    }


def _partition(ids, valid):
    """Rows of each id (order-free): a set of frozensets."""
    groups = {}
    for row, i in enumerate(ids):
        if valid[row] and i >= 0:
            groups.setdefault(int(i), set()).add(row)
    return {frozenset(g) for g in groups.values()}


def test_placed_blocks_hold_the_single_process_batch():
    """Two blocks of 2 scenes, placed at agreed capacities, carry exactly what one
    process packs for the 4 scenes: the same rows in the same order, the same instance
    and superpoint partitions, scenes and instance classes; only the padding moves."""
    rng = np.random.default_rng(0)
    scenes = [
        _scene(rng, n, k, 9, f"s{i}")
        for i, (n, k) in enumerate([(50, 3), (70, 4), (60, 6), (90, 5)])
    ]
    kw = dict(buckets=(128, 256, 512), instance_buckets=(8, 16, 32), num_classes=5, voxel_size=0.1)
    one = pack_batch(scenes, batch_size=4, **kw)
    blocks = [pack_batch(scenes[i : i + 2], batch_size=2, **kw) for i in (0, 2)]
    # different local buckets: the blocks are padded to the larger ones
    assert [b.xyz.shape[0] for b in blocks] == [128, 256]
    assert [b.instance_class.shape[0] for b in blocks] == [8, 16]
    n = max(b.xyz.shape[0] for b in blocks)
    g = max(b.instance_class.shape[0] for b in blocks)
    placed = [
        place_block(b, index=i, count=2, point_capacity=n, instance_capacity=g)
        for i, b in enumerate(blocks)
    ]
    glob = concat_blocks(placed)
    assert glob.xyz.shape == (2 * n, 3) and glob.scene_valid.shape == (4,)
    assert glob.instance_class.shape == (2 * g,)
    # the valid rows, in order, are the single-process batch's rows
    for f in ("xyz", "feats", "vox", "batch_id", "semantic"):
        np.testing.assert_array_equal(
            np.asarray(getattr(glob, f))[glob.valid], np.asarray(getattr(one, f))[one.valid], f
        )
    rows_g, rows_1 = np.flatnonzero(glob.valid), np.flatnonzero(one.valid)
    for f in ("instance", "superpoint"):
        # same grouping of the valid rows (ids are global, so no two scenes share one)
        pg = _partition(getattr(glob, f)[rows_g], np.ones(len(rows_g), bool))
        p1 = _partition(getattr(one, f)[rows_1], np.ones(len(rows_1), bool))
        assert pg == p1, f
    # each point's instance slot has the same class and scene in both layouts
    ig, i1 = glob.instance[rows_g], one.instance[rows_1]
    has = ig >= 0
    np.testing.assert_array_equal(has, i1 >= 0)
    np.testing.assert_array_equal(glob.instance_class[ig[has]], one.instance_class[i1[has]])
    np.testing.assert_array_equal(glob.instance_batch[ig[has]], one.instance_batch[i1[has]])
    assert glob.instance_valid[ig[has]].all()
    np.testing.assert_array_equal(
        glob.instance_class[glob.instance_valid], one.instance_class[one.instance_valid]
    )
    np.testing.assert_array_equal(glob.scene_valid, one.scene_valid)
    # padding: sentinel scene B = 4, no labels
    pad = ~glob.valid
    assert (glob.batch_id[pad] == 4).all() and (glob.instance[pad] == -100).all()
    assert (glob.superpoint[pad] == -1).all()
    assert (glob.instance_batch[~glob.instance_valid] == 4).all()
    # every id is in range of the global capacities
    assert glob.instance.max() < 2 * g and glob.superpoint.max() < 2 * n
    with pytest.raises(ValueError, match="does not fit the agreed capacities"):
        place_block(blocks[1], index=1, count=2, point_capacity=128, instance_capacity=g)


def _iterator(paths, c, **kw):
    d = c.data
    return TrainIterator(
        paths,
        batch_size=d.batch_size,
        seed=c.seed,
        voxel_size=d.voxel_size,
        num_classes=c.model.num_classes,
        buckets=d.point_buckets,
        instance_buckets=d.instance_buckets,
        augment_config=None,
        num_workers=0,
        **kw,
    )


def test_shards_split_each_global_batch(prepared):
    """Shard i of P loads slots i*B/P.. of every batch of the single-process plan."""
    c = synthetic.get_config("tiny")
    c.data.batch_size = 4
    c.data.point_buckets = (8192, 16384, 32768)  # 4 uncropped rooms
    c.data.instance_buckets = (16, 32, 64)
    paths = list_scenes(prepared, "train")
    whole = _iterator(paths, c)
    parts = [_iterator(paths, c, num_shards=2, shard_index=i) for i in range(2)]
    for _ in range(2):  # two epochs (one batch each)
        full = next(whole)
        halves = [next(p) for p in parts]
        for h in halves:
            assert h.scene_valid.shape == (2,) and h.scene_valid.all()
        xyz = np.concatenate([h.xyz[h.valid] for h in halves])
        np.testing.assert_array_equal(xyz, full.xyz[full.valid])
    state = parts[1].state()
    assert state["batch_size"] == 4  # the global batch: resumable with any process count
    with pytest.raises(ValueError, match="does not divide by the 3 processes"):
        _iterator(paths, c, num_shards=3, shard_index=0)
    with pytest.raises(ValueError, match="needs drop_remainder=True"):
        _iterator(paths, c, num_shards=2, shard_index=0, drop_remainder=False)


def test_distributed_flags_single_process_and_errors():
    """No flag: one process, nothing started; partial or impossible flags: one-line user
    errors naming the flags (raised before JAX is touched)."""
    from dknet_jax.cli import UserError
    from dknet_jax.training import distributed

    assert distributed.initialize() is False
    with pytest.raises(UserError, match="missing: --coordinator_address, --process_id"):
        distributed.initialize(num_processes=2)
    with pytest.raises(UserError, match="--process_id must be in 0..1, got 2"):
        distributed.initialize("localhost:1", 2, 2)
    with pytest.raises(UserError, match="--num_processes must be >= 1"):
        distributed.initialize("localhost:1", 0, 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start_two(root, workdir, *extra):
    """Start both processes of a 2-process run (``_finish`` waits for them)."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return [
        subprocess.Popen(
            [sys.executable, WORKER, str(port), "2", str(i), root, workdir, *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]


def _finish(procs, timeout=600):
    """(returncode, stdout, stderr) of each process; kills both on a timeout or error."""
    out = []
    try:
        for p in procs:
            so, se = p.communicate(timeout=timeout)
            out.append((p.returncode, so, se))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return out


def _run_two(root, workdir, *extra):
    return _finish(_start_two(root, workdir, *extra))


def _rows(workdir):
    return [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]


def _state(workdir, step):
    import jax
    import orbax.checkpoint as ocp
    from etils import epath

    from dknet_jax import checkpoint as ckpt_lib

    where = epath.Path(workdir) / "checkpoints" / str(step) / "state"
    meta = ocp.PyTreeCheckpointHandler().metadata(where).tree
    ckpt = ckpt_lib.Checkpoints(workdir)
    try:
        state, _ = ckpt.restore(jax.tree.map(ckpt_lib._abstract_leaf, meta), step=step)
    finally:
        ckpt.close()
    flat = ocp.tree.to_flat_dict(state)
    return {"/".join(map(str, k)): np.asarray(v) for k, v in flat.items()}


def _nu_by_param(state: dict) -> dict:
    """AdamW's second moment per parameter leaf (``"backbone/.../value"`` -> array) from
    a flat checkpoint dict: the optimiser keeps it as one vector over the raveled
    parameters (``optax.flatten``), unravelled here with the tiny model's own tree."""
    import jax
    import orbax.checkpoint as ocp
    from jax.flatten_util import ravel_pytree

    from dknet_jax.model import build_model

    (key,) = [k for k in state if k.startswith("opt/") and k.endswith("/nu")]
    _, params, _ = build_model(synthetic.get_config("tiny"))
    nu = ravel_pytree(params)[1](jax.numpy.asarray(state[key]))
    return {"/".join(map(str, k)): np.asarray(v) for k, v in ocp.tree.to_flat_dict(nu).items()}


def _reference(root, tmp_path):
    """One process on one device, same config and global batch, no evaluation."""
    from dknet_jax.training.train import train_and_evaluate

    c = synthetic.get_config("tiny")
    c.data.root = root
    c.data.val_split = "none"
    single = str(tmp_path / "single")
    with pytest.warns(UserWarning, match="no validation scenes"):
        train_and_evaluate(c, single)
    return single


def _check_losses(multi, single):
    rows = [r for r in _rows(multi) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]  # logged once (process 0)
    ref = [r for r in _rows(single) if "loss" in r]
    for got, want in zip(rows, ref, strict=True):
        for name in ("loss", "semantic", "offset", "center", "aggregation", "mask"):
            # Step 2's mask term carries the +-lr AdamW steps of the near-zero-gradient
            # biases (test docstring below): it differs from the 1-process run by
            # 9.3e-5 (b136cf3) and 1.44e-4 (a82bad6, another rounding of the BatchNorm
            # backward) relative, while the 1-process value is the same in both and every
            # other term agrees to 1e-6. A data-parallel error moves it by far more.
            rtol = 5e-4 if (name == "mask" and got["step"] == 2) else 1e-4
            np.testing.assert_allclose(got[name], want[name], rtol=rtol, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=1e-3)
        assert got["gt_instances"] == want["gt_instances"]


def _quiet(stdout: str) -> str:
    return "".join(x for x in stdout.splitlines(True) if not x.startswith("[Gloo]"))


@pytest.fixture(scope="module")
def none_split(prepared):
    with open(os.path.join(prepared, "none.txt"), "w"):
        pass  # an empty split: training without evaluation
    return "none"


def test_two_processes_train_like_one(prepared, none_split, tmp_path):
    """2 processes x 1 CPU device, global batch 2 (1 scene each), 2 steps, against one
    process on one device with the same global batch.

    Losses are compared at both steps (step 2 runs on the parameters of step 1).
    Parameters are compared after step 1 where the gradient is above float noise: AdamW
    turns a gradient that is zero up to rounding (biases right before a BatchNorm) into a
    full +-lr step in a random direction, in any two runs that differ in summation order
    (they differ by up to 2 lr after two steps here, in both directions)."""
    multi = str(tmp_path / "multi")
    procs = _start_two(prepared, multi, none_split)
    try:  # the reference meanwhile (compiling is single-threaded: this uses both cores)
        single = _reference(prepared, tmp_path)
    finally:
        runs = _finish(procs)
    assert [r for r, _, _ in runs] == [0, 0], [se[-3000:] for _, _, se in runs]
    assert "multi-host: 2 processes, 2 devices" in runs[0][1]
    assert _quiet(runs[1][1]) == ""  # process 1 prints nothing: process 0 logs
    _check_losses(multi, single)

    # checkpoints: written once (only process 0's array files), same data position
    assert sorted(os.listdir(os.path.join(multi, "checkpoints"))) == ["1", "2"]
    for step in (1, 2):
        names = os.listdir(os.path.join(multi, "checkpoints", str(step), "state"))
        assert not any(n.startswith("ocdbt.process_1") for n in names), names
        got = read_meta(os.path.join(multi, "checkpoints"), step)
        want = read_meta(os.path.join(single, "checkpoints"), step)
        assert got["data"] == want["data"] and got["step"] == want["step"] == step

    a, b = _state(multi, 1), _state(single, 1)
    assert a.keys() == b.keys()
    nu = _nu_by_param(b)
    checked = 0
    for k, want in b.items():
        got = a[k]
        if k.startswith("params/"):
            # sqrt(nu) = 0.03 |g| after one step: gradients above 1e-4
            sig = np.sqrt(nu[k[len("params/") :]]) > 3e-6
            np.testing.assert_allclose(got[sig], want[sig], rtol=1e-3, atol=1e-6, err_msg=k)
            checked += int(sig.sum())
        elif k.startswith("rest/"):  # BatchNorm statistics of the global batch
            scale = np.abs(want).max() if want.size else 0.0
            np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-4 * scale, err_msg=k)
        elif k.startswith("key"):
            np.testing.assert_array_equal(got, want)
    assert checked > 1000


@pytest.mark.slow
def test_two_processes_resume_after_kill_with_evaluation(prepared, none_split, tmp_path):
    """Killed after the first checkpoint, the same 2-process command resumes (every
    process restores) and ends like one process; process 0 evaluates, best/ is written."""
    multi = str(tmp_path / "multi")
    killed = _run_two(prepared, multi, "val", "kill")
    assert [r for r, _, _ in killed] == [3, 3], [se[-3000:] for _, _, se in killed]
    resumed = _run_two(prepared, multi, "val")
    assert [r for r, _, _ in resumed] == [0, 0], [se[-3000:] for _, _, se in resumed]
    assert "Resumed from step 1" in resumed[0][1]
    assert _quiet(resumed[1][1]) == ""
    _check_losses(multi, _reference(prepared, tmp_path))  # rows past step 1 dropped
    assert [r["step"] for r in _rows(multi) if "val" in r] == [2]  # process 0 evaluated
    assert os.listdir(os.path.join(multi, "best")) == ["2"]

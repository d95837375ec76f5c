"""The released-weights converter (issue 14), proven without the real file.

A random state dict with exactly the released names and shapes (``spec.random_state_dict``:
non-trivial BatchNorm statistics, a controller large enough to make the masks depend on
the kernel layout) is saved in the released ``.pth`` format, converted by
``scripts/convert_released.py``'s function, restored as a work dir, and our per-point
outputs on a small scene are compared with ``released/reference.py`` (an independent
float64 numpy implementation of the released forward). Then the whole pipeline runs on
the converted model (shapes, determinism) and the CLIs load the converted work dir.

Tolerance: our model runs in float32 through a 7-level UNet (14 residual blocks, ~30
convolutions on the path); the reference in float64. Each output is compared as
``max |ours - ref| <= TOL * max(1, max |ref|)`` with TOL = 1e-5. Measured on CPU (XLA,
the tests' JAX settings): 2e-7 to 4e-7 for every per-point output, so TOL leaves a factor
25 for summation order; the smallest mapping error we could think of, a tower BatchNorm
eps of 1e-4 instead of 1e-5, moves the mask features by 1.4e-4 (14 x TOL), and the 1x1
skip transposed instead of reshaped moves the backbone features far more
(``test_mutated_mapping_is_caught``). (On a GPU, TF32 matmuls would need a looser TOL;
the tests run on CPU, conftest.py.)
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dknet_jax.checkpoint import config_from_meta, read_meta
from dknet_jax.inference.predictor import load_model, postprocess_batch
from dknet_jax.model import mask_decoder
from dknet_jax.model.dknet import abstract_model
from dknet_jax.released import convert as C
from dknet_jax.released import pth
from dknet_jax.released import reference as R
from dknet_jax.released import spec as S
from dknet_jax.types import PointBatch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5


def _script():
    spec = importlib.util.spec_from_file_location(
        "convert_released", os.path.join(ROOT, "scripts", "convert_released.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SCRIPT = _script()


def close(ours, ref, what):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(ours - ref).max()) / scale
    assert err <= TOL, f"{what}: normalised max error {err:.3g} > {TOL}"
    return err


def scene(n=420, seed=0):
    """One scene: points in three blobs within ~0.5 m (2 cm voxels, several points per
    voxel), rgb in [-1, 1]; returns the PointBatch and the reference's voxel inputs."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0.15, 0.15, 0.1], [0.4, 0.2, 0.15], [0.25, 0.42, 0.3]])
    xyz = centres[rng.integers(0, 3, n)] + rng.normal(0, 0.05, (n, 3))
    xyz = (xyz - xyz.min(0)).astype(np.float32)
    rgb = rng.uniform(-1, 1, (n, 3)).astype(np.float32)
    vox = np.floor(xyz / 0.02).astype(np.int32)
    feats = np.concatenate([rgb, xyz], axis=1).astype(np.float32)
    batch = PointBatch(
        xyz=jnp.asarray(xyz),
        feats=jnp.asarray(feats),
        vox=jnp.asarray(vox),
        batch_id=jnp.zeros(n, jnp.int32),
        valid=jnp.ones(n, bool),
        semantic=jnp.full(n, -100, jnp.int32),
        instance=jnp.full(n, -100, jnp.int32),
        superpoint=jnp.asarray(np.arange(n) // 5, jnp.int32),
        instance_class=jnp.full(4, -100, jnp.int32),
        instance_batch=jnp.full(4, 1, jnp.int32),
        instance_valid=jnp.zeros(4, bool),
        scene_valid=jnp.ones(1, bool),
    )
    coords = np.concatenate([np.zeros((n, 1), np.int64), vox.astype(np.int64)], axis=1)
    vcoords, vfeats, p2v = R.voxelize_mean(coords, feats.astype(np.float64))
    return batch, (vcoords, vfeats, p2v)


def scene_config(config):
    """The converted config plus what a tiny test scene needs (not a weight setting)."""
    config.model.level_capacity_ratio = (1.0,)  # a sparse 420-point scene never overflows
    config.model.pool_size = 420
    config.test.min_points = 1
    config.test.score_threshold = 0.0
    return config


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("released")
    sd = S.random_state_dict(seed=1)
    path = str(tmp / "DKNet.pth")
    # the released file layout: {'model': state_dict, 'optimizer': ...}
    pth.save_pth({"model": sd, "optimizer": {"state": {}, "param_groups": []}}, path)
    work = str(tmp / "work")
    logs = []
    report = SCRIPT.convert(path, work, log=logs.append)
    return {"sd": sd, "work": work, "report": report, "log": "\n".join(logs), "tmp": tmp}


@pytest.fixture(scope="module")
def model(converted):
    loaded = load_model(converted["work"], log=lambda m: None)
    config = scene_config(loaded.config)
    graphdef = abstract_model(config)[0]
    return graphdef, loaded.params, loaded.rest, config


def _eval_model(graphdef, params, rest):
    m = nnx.merge(graphdef, params, rest, copy=True)
    m.eval()
    return m


@pytest.fixture(scope="module")
def forward(model):
    """Point features + the whole forward (eval mode) in one jit, run twice."""
    graphdef, params, rest, config = model
    batch, _ = scene()

    @jax.jit
    def run(params, rest, batch):
        m = _eval_model(graphdef, params, rest)
        fp, overflow = m.point_features(batch)
        out = m(batch, merge_threshold=config.test.merge_threshold)
        return fp, overflow, out

    return run(params, rest, batch), run(params, rest, batch), batch


def test_report_accounts_for_every_entry(converted):
    report, sd = converted["report"], converted["sd"]
    assert len(sd) == 527
    assert set(report.used) | set(report.unused) == set(sd)
    assert not set(report.used) & set(report.unused)
    assert len(report.used) == 425
    counters = [k for k in sd if k.endswith("num_batches_tracked")]
    assert all("counter" in report.unused[k] for k in counters) and len(counters) == 83
    dropped = sorted(k for k in report.unused if k not in counters)
    assert dropped and all(k.startswith(("semantic_branch.", "recall_linear.")) for k in dropped)
    assert len(dropped) == 19  # semantic_branch 17 + recall_linear 2
    assert len(report.zero_filled) == 10
    assert "semantic_branch" in converted["log"] and "recall_linear" in converted["log"]
    assert report.layout == "KRSC"


def test_meta_holds_the_released_config(converted):
    meta = read_meta(os.path.join(converted["work"], "checkpoints"), 0)
    config = config_from_meta(meta, log=lambda m: None)
    want = C.released_config()
    assert config.to_dict() == want.to_dict()
    m = config.model
    assert (m.tower_bn_eps, m.kernel_norm, m.mask_center) == (1e-5, "batch", "point")
    assert (m.merge_clamp, m.empty_context) == (1e-6, "foreground_mean")
    assert config.data.voxel_size == 0.02 and meta["step"] == 0


def test_rules_transform_by_hand():
    # k3: KRSC [Co, kx, ky, kz, Ci] -> ours [9 kx + 3 ky + kz, Ci, Co]
    w = np.arange(2 * 27 * 3, dtype=np.float32).reshape(2, 3, 3, 3, 3)
    out = C.transform("x", "k3", w, "KRSC")
    assert out.shape == (27, 3, 2)
    assert out[9 * 2 + 3 * 0 + 1, 2, 1] == w[1, 2, 0, 1, 2]
    # subm1: the saved memory read as [Ci, Co], not the transpose
    w1 = np.arange(6, dtype=np.float32).reshape(3, 1, 1, 1, 2)  # Co 3, Ci 2
    np.testing.assert_array_equal(C.transform("x", "subm1", w1, "KRSC"), w1.reshape(2, 3))
    # controller: ours W1[c, o] (16 c + o) <- released W1[o, c] (19 o + c), position negated
    ctrl = np.arange(337 * 2, dtype=np.float32).reshape(337, 2, 1)
    ours = C.transform("x", "ctrl_w", ctrl, "KRSC")  # [2, 337]
    assert ours.shape == (2, 337)
    for c, o in ((0, 0), (3, 5), (15, 15), (16, 2), (18, 15)):
        sign = -1 if c >= 16 else 1
        np.testing.assert_array_equal(ours[:, 16 * c + o], sign * ctrl[19 * o + c, :, 0])
    np.testing.assert_array_equal(ours[:, 304:], ctrl[304:, :, 0].T)
    assert C.match("unet.u.u.u.blocks_tail.block0.i_branch.0.weight") == (
        "backbone/decoders/3/0/proj",
        "subm1",
    )
    assert C.match("linear.4.running_var") == ("heads/semantic/norms/1/var", "bn")


def test_bad_state_dicts_fail_naming_the_key():
    _, params, rest = abstract_model(C.released_config())
    sd = S.random_state_dict(seed=2)
    bad = dict(sd)
    bad["linear.3.weight"] = np.zeros((32, 31), np.float32)
    with pytest.raises(C.ConversionError, match=r"linear\.3\.weight.*heads/semantic/linears/1"):
        C.convert_state_dict(bad, params, rest)
    missing = dict(sd)
    del missing["offset.1.running_var"]
    with pytest.raises(C.ConversionError, match=r"lacks 1 entries.*offset\.1\.running_var"):
        C.convert_state_dict(missing, params, rest)
    extra = dict(sd)
    extra["unet.transformer.weight"] = np.zeros(3, np.float32)
    with pytest.raises(C.ConversionError, match=r"unet\.transformer\.weight.*matches no rule"):
        C.convert_state_dict(extra, params, rest)
    other = {"conv1.weight": np.zeros((3, 3), np.float32), "fc.bias": np.zeros(3, np.float32)}
    with pytest.raises(C.ConversionError, match="not a DKNet checkpoint"):
        C.convert_state_dict(other, params, rest)


def test_script_errors(tmp_path, converted):
    with pytest.raises(SCRIPT.UserError, match="download the released"):
        SCRIPT.convert(str(tmp_path / "nope.pth"), str(tmp_path / "w"))
    p = str(tmp_path / "resnet.pth")
    pth.save_pth({"state_dict": {"fc.weight": np.zeros((2, 2), np.float32)}}, p)
    with pytest.raises(SCRIPT.UserError, match="not a DKNet checkpoint"):
        SCRIPT.convert(p, str(tmp_path / "w"))
    with pytest.raises(SCRIPT.UserError, match="already holds checkpoints"):
        SCRIPT.convert(str(converted["tmp"] / "DKNet.pth"), converted["work"])


def test_per_point_outputs_match_the_released_forward(converted, forward):
    (fp, overflow, out), _, batch = forward
    sd = converted["sd"]
    _, (vcoords, vfeats, p2v) = None, scene()[1]
    ref = R.point_forward(sd, vcoords, vfeats, p2v)
    assert not bool(overflow)
    errs = {
        "backbone features": close(fp, ref["point_feats"], "backbone features"),
        "semantic logits": close(out.heads.semantic_logits, ref["semantic_logits"], "semantic"),
        "offsets": close(out.heads.offset, ref["offsets"], "offsets"),
        "heatmap logits": close(out.heads.heat_logits, ref["heat_logits"], "heat logits"),
        "mask features": close(out.heads.mask_feats, ref["mask_feats"], "mask features"),
        "kernel tower": close(out.heads.reduce_feats, ref["kernel_feats"], "kernel tower"),
    }
    fg = np.argmax(ref["semantic_logits"], axis=1) >= 2
    np.testing.assert_array_equal(np.asarray(out.heads.foreground), fg)
    heat_ref = R.scene_heatmap(ref["heat_logits"], np.zeros(len(fg), int), fg)
    errs["heatmap"] = close(out.heat, heat_ref, "heatmap")
    print("normalised max errors:", {k: f"{v:.2g}" for k, v in errs.items()})
    # the outputs are not trivially small
    assert np.abs(ref["point_feats"]).max() > 0.5 and np.abs(ref["mask_feats"]).std() > 0.1


def test_merge_tower_weight_generator_and_masks_match(converted, model):
    graphdef, params, rest, _ = model
    sd = converted["sd"]
    m = _eval_model(graphdef, params, rest)
    rng = np.random.default_rng(5)
    agg = rng.normal(0, 1, (6, 35)).astype(np.float32)
    agg[3] = agg[1]  # equal rows: the clamp at 1e-6 decides the input
    logits = m.heads.merge_logits(jnp.asarray(agg), jnp.ones((6, 6), bool))
    close(jax.nn.sigmoid(logits), R.merge_scores(sd, agg), "merge scores")

    kf = rng.normal(0, 1, (4, 16)).astype(np.float32)
    kernels = m.heads.kernels(jnp.asarray(kf), jnp.ones(4, bool))
    weights = R.kernel_weights(sd, kf)
    # the layouts differ (permuted, negated): compare what they do, the masks
    n = 50
    feats = rng.normal(0, 1, (n, 16)).astype(np.float32)
    xyz = rng.uniform(0, 1, (n, 3)).astype(np.float32)
    centres = xyz[[0, 7, 20, 33]]
    ours = mask_decoder.decode_masks(
        kernels,
        jnp.asarray(centres),
        jnp.zeros(4, jnp.int32),
        jnp.ones(4, bool),
        jnp.asarray(feats),
        jnp.asarray(xyz),
        jnp.zeros(n, jnp.int32),
        jnp.ones(n, bool),
    )
    ref = R.decode_masks(weights, feats, centres, xyz)
    close(jax.nn.sigmoid(ours), ref, "dynamic masks")
    assert np.abs(ref - ref.mean(1, keepdims=True)).max() > 1e-3  # the masks vary


def test_mutated_mapping_is_caught(converted):
    """The tolerance separates right from wrong: one BN eps of 1e-4 instead of 1e-5 in a
    tower, or the 1x1 skip transposed instead of reshaped, moves outputs beyond it."""
    sd = converted["sd"]
    _, (vcoords, vfeats, p2v) = None, scene()[1]
    ref = R.point_forward(sd, vcoords, vfeats, p2v)
    f = ref["point_feats"]
    eps_bad = dict(sd)
    for i in range(3):  # running_var + 9e-5 == eps 1e-4 instead of 1e-5
        eps_bad[f"mask_branch.{i}.1.running_var"] = sd[f"mask_branch.{i}.1.running_var"] + 9e-5
    moved = np.abs(R.tower(f, eps_bad, "mask_branch.") - ref["mask_feats"]).max()
    assert moved > 10 * TOL * max(1.0, np.abs(ref["mask_feats"]).max())
    transposed = dict(sd)
    for name, w in sd.items():
        if name.endswith("i_branch.0.weight"):  # memory such that reshape(Ci, Co) == W.T
            transposed[name] = np.ascontiguousarray(w[:, 0, 0, 0, :].T).reshape(w.shape)
    wrong = R.backbone(transposed, vcoords, vfeats)[p2v]
    assert np.abs(wrong - f).max() > 10 * TOL * max(1.0, np.abs(f).max())


def test_whole_pipeline_shapes_and_determinism(model, forward):
    graphdef, params, rest, config = model
    (fp, _, out), (fp2, _, out2), batch = forward
    for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(out2), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    n, k = batch.valid.shape[0], config.model.max_candidates
    assert out.cand_idx.shape == (k,) and out.mask_logits.shape == (k, n)
    assert out.kernels.shape == (k, 337)
    assert int(out.cand_ok.sum()) >= 1 and int(out.inst_ok.sum()) >= 1
    # released centre: the lead point's own coordinate
    ok = np.asarray(out.inst_ok)
    lead_pt = np.asarray(out.cand_idx)[np.asarray(out.inst_source)[ok]]
    np.testing.assert_array_equal(np.asarray(out.inst_pos)[ok], np.asarray(batch.xyz)[lead_pt])
    res = jax.jit(lambda b, s, m, o: postprocess_batch(config, b, s, m, o))(
        batch, out.heads.semantic_logits, out.mask_logits, out.inst_ok
    )
    assert res["masks"].shape == (1, k, n) and res["scores"].shape == (1, k)
    res2 = jax.jit(lambda b, s, m, o: postprocess_batch(config, b, s, m, o))(
        batch, out2.heads.semantic_logits, out2.mask_logits, out2.inst_ok
    )
    for key in ("masks", "labels", "scores", "keep"):
        np.testing.assert_array_equal(np.asarray(res[key]), np.asarray(res2[key]))


def test_train_resume_target_restores_the_converted_state(converted):
    """scripts/train.py --workdir W resumes from the converted step 0: the state matches
    the tree train.py builds (parameters, BatchNorm statistics, AdamW state, key)."""
    from dknet_jax.checkpoint import Checkpoints, train_state
    from dknet_jax.training.optim import make_optimizer

    config = C.released_config()
    _, params, rest = abstract_model(config)
    tx, _ = make_optimizer(config.train, 1000, 10)
    opt = jax.eval_shape(tx.init, params)
    target = train_state(params, rest, opt, jax.eval_shape(lambda: jax.random.PRNGKey(0)))
    ckpt = Checkpoints(converted["work"])
    try:
        state, meta = ckpt.restore_latest_readable(target)
    finally:
        ckpt.close()
    assert meta["step"] == 0 and meta["data"] is None
    flat = {
        C.path_name(p): np.asarray(v)
        for p, v in jax.tree_util.tree_leaves_with_path(state["params"])
    }
    w = converted["sd"]["linear.6.weight"]
    np.testing.assert_array_equal(flat["heads/semantic/out/kernel"], w.T)
    np.testing.assert_array_equal(flat["heads/kernel/linears/0/bias"], 0.0)


# --------------------------------------------------------------------------- CLIs


def _run(script, *args):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", script), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=900,
    )


def test_cli_convert_errors(tmp_path):
    r = _run("convert_released.py", "--checkpoint", str(tmp_path / "x.pth"), "--out", "w")
    assert r.returncode == 2 and "download the released" in r.stderr, r.stderr[-2000:]


@pytest.mark.slow  # compiles the full-size model twice in subprocesses (~8 CPU-minutes)
def test_cli_predict_and_evaluate_on_the_converted_work_dir(tmp_path, converted):
    """predict.py (config from the checkpoint meta) and evaluate.py
    (``--config=configs/scannet.py:released``) load the converted work dir."""
    from dknet_jax.data.ply import write_ply
    from dknet_jax.synthetic import generate_scene

    s = generate_scene(np.random.default_rng(0), "tiny")
    v = s.vertices
    ply = str(tmp_path / "scan.ply")
    cols = {"red": s.colors[:, 0], "green": s.colors[:, 1], "blue": s.colors[:, 2]}
    write_ply(ply, {"x": v[:, 0], "y": v[:, 1], "z": v[:, 2], **cols}, faces=s.faces)
    out = str(tmp_path / "pred")
    r = _run("predict.py", "--checkpoint", converted["work"], "--input", ply, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.load(open(os.path.join(out, "scan_summary.json")))
    assert summary

    root = tmp_path / "prepared"
    os.makedirs(root / "val")
    rng = np.random.default_rng(0)
    n = 600
    np.savez(
        root / "val" / "scene0000_00.npz",
        xyz=rng.uniform(0, 1.0, (n, 3)).astype(np.float32),
        rgb=rng.integers(0, 256, (n, 3)).astype(np.uint8),
        semantic=rng.integers(0, 20, n).astype(np.int32),
        instance=(np.arange(n) // 100).astype(np.int32),
        superpoint=(np.arange(n) // 10).astype(np.int32),
    )
    ev = str(tmp_path / "eval")
    r = _run(
        "evaluate.py",
        "--config=configs/scannet.py:released",
        f"--config.data.root={root}",
        "--config.data.point_buckets=(4096,)",
        "--config.data.max_points=4096",
        f"--checkpoint={converted['work']}",
        "--split=val",
        f"--out={ev}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.load(open(os.path.join(ev, "results.json")))
    assert "instance" in results

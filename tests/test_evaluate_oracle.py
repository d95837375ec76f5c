"""Evaluation and prediction glue with an oracle model: GT in, AP 1.0 out.

The network is replaced by an oracle model (same call and outputs as ``DKNet``, no
parameters) that reads the GT labels of the batch: semantic logits = A * one-hot(GT
class), one mask slot per GT instance with logit ``3 - n/100`` on the instance's n points
and -6 elsewhere in its scene, plus one slot over the scene's wall points and one over its
floor points (the proposals a real model makes there). Everything after the network is the
real code: ``make_predict_fn``, ``postprocess_batch`` (Otsu, coverage, superpoint vote,
class, score, filters), ``split_scenes``, the label mapping and the AP / mIoU evaluators of
``evaluate_split``, the benchmark files it writes; and for ``predict.predict_file`` the
batching, the ordering by score and the submission files.

Hand-worked expectations:
- oracle: AP = AP50 = AP25 = 1.0, mIoU 1.0; exactly one prediction per GT instance with
  the GT class (the wall / floor slots must be dropped: their points vote only for
  ignored classes); score of an n-point instance = sigmoid(3 - n/100) * P with
  P = e^A / (e^A + 19) (mean mask x mean semantic probability over its points).
- wrong: the table of scene 0 (105 points) predicted as chair. Chair entries: TP
  s(150), TP s(130), TP s(110), FP s(105), scores increasing in that order; operating
  points (P, R) = (3/4, 1), (2/3, 2/3), (1/2, 1/3), (0, 0), artificial (1, 0); steps
  1/6, 1/3, 1/3, 0, 0: chair AP = 3/4 * 1/6 + 2/3 * 1/3 + 1/2 * 1/3 = 37/72 at every IoU
  threshold. Table: GT but no prediction -> 0. Bed, sofa, otherfurniture: 1. Mean over
  the five classes with GT: (37/72 + 3) / 5. (Every mask scored 1 would give chair
  3/4 * 1/2 + 1/2 = 7/8.)
When the official ScanNet script is available, it is run on the written files and must
give the same numbers.
"""

from __future__ import annotations

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dknet_jax import eval as E
from dknet_jax.data.labels import SCANNET_NYU40_IDS
from dknet_jax.inference import evaluate as ev
from dknet_jax.inference import predictor
from dknet_jax.inference import scan as P
from dknet_jax.model.dknet import DKNetOutputs
from dknet_jax.model.heads import PointHeadOutputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF = os.environ.get(
    "DKNET_SCANNET_EVAL_REF",
    os.path.join(ROOT, "..", "shared", "reference", "scannet_official_eval"),
)
HAVE_REF = os.path.isdir(os.path.join(REF, "BenchmarkScripts"))

WALL, FLOOR, BED, CHAIR, SOFA, TABLE, OTHERFURN = 0, 1, 3, 4, 5, 6, 19  # semantic indices
S = 20
FIRST_INSTANCE_CLASS = 2
A = 5.0
P_SEM = np.exp(A) / (np.exp(A) + S - 1)
# scenes as blocks of (semantic, instance, points); instance ids per scene
SCENES = {
    "scene0000_00": [
        (CHAIR, 0, 150),
        (CHAIR, 1, 130),
        (TABLE, 2, 105),
        (WALL, -100, 100),
        (OTHERFURN, 3, 115),
        (FLOOR, -100, 100),
        (-100, -100, 20),
    ],
    "scene0001_00": [(BED, 0, 140), (WALL, -100, 80), (CHAIR, 1, 110), (FLOOR, -100, 60)],
    "scene0002_00": [(SOFA, 0, 125), (FLOOR, -100, 50)],
}
CHAIR_AP_WRONG = 37 / 72
MEAN_WRONG = (CHAIR_AP_WRONG + 3) / 5


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _scene_arrays(name, seed=0):
    rng = np.random.default_rng(seed)
    sem, inst, xyz, sp = [], [], [], []
    for i, (s, g, n) in enumerate(SCENES[name]):
        sem += [s] * n
        inst += [g] * n
        xyz.append(rng.uniform(0, 0.5, (n, 3)) + [1.0 * i, 0.0, 0.0])
        sp.append(1000 * i + np.arange(n) // 10)  # superpoints never straddle blocks
    return {
        "xyz": np.concatenate(xyz).astype(np.float32),
        "rgb": rng.integers(0, 256, (len(sem), 3)).astype(np.uint8),
        "semantic": np.array(sem, np.int32),
        "instance": np.array(inst, np.int32),
        "superpoint": np.concatenate(sp).astype(np.int32),
    }


def _expected(wrong: bool):
    """[(nyu40 label, score)] sorted by score, over all scenes."""
    out = []
    for blocks in SCENES.values():
        for s, g, n in blocks:
            if g >= 0:
                cls = CHAIR if (wrong and s == TABLE) else s
                out.append((SCANNET_NYU40_IDS[cls], _sigmoid(3 - n / 100) * P_SEM))
    return sorted(out, key=lambda t: t[1])


def _oracle_logits(k, batch, semantic, instance, wrong):
    """Semantic logits, mask logits and slot validity of the oracle (module docstring)."""
    n, b = batch.valid.shape[0], batch.scene_valid.shape[0]
    pred_sem = jnp.where(semantic >= 0, semantic, WALL)
    if wrong:
        pred_sem = jnp.where(semantic == TABLE, CHAIR, pred_sem)
    sem_logits = A * jax.nn.one_hot(pred_sem, S)
    scenes = jnp.arange(b)
    in_scene = (batch.batch_id[None, :] == scenes[:, None]) & batch.valid[None, :]  # [b, n]
    has = in_scene & (instance[None, :] >= 0)
    big = jnp.iinfo(jnp.int32).max
    first = jnp.min(jnp.where(has, instance[None, :], big), axis=1)  # ids compact per scene
    last = jnp.max(jnp.where(has, instance[None, :], -1), axis=1)
    count = jnp.where(jnp.any(has, axis=1), last - first + 1, 0)
    j = jnp.arange(k)
    gid = first[:, None] + j[None, :]  # [b, k]
    is_inst = j[None, :] < jnp.minimum(count[:, None], k - 2)
    on = (instance[None, None, :] == gid[:, :, None]) & is_inst[:, :, None] & in_scene[:, None]
    on = on.at[:, k - 2].set(in_scene & (semantic == WALL))
    on = on.at[:, k - 1].set(in_scene & (semantic == FLOOR))
    size = jnp.sum(on, axis=2).astype(jnp.float32)  # [b, k]
    strength = jnp.where(j[None, :] < k - 2, 3.0 - size / 100.0, 2.5)
    mask_logits = jnp.where(on, strength[:, :, None], -6.0).reshape(b * k, n)
    inst_ok = (jnp.any(on, axis=2) & batch.scene_valid[:, None]).reshape(-1)
    cand_idx = jnp.where(inst_ok, jnp.argmax(on, axis=2).reshape(-1), n).astype(jnp.int32)
    return sem_logits, mask_logits, inst_ok, cand_idx


MERGE_THRESHOLDS_SEEN: list = []


class OracleDKNet(nnx.Module):
    """Stands in for ``DKNet`` (same call, same ``DKNetOutputs``), no parameters.
    ``labels``: (semantic, instance) of the scan rows for ``predict.py``, whose batches
    carry no labels; None: the batch's own GT."""

    def __init__(self, k: int, wrong: bool, labels=None):
        self.k, self.wrong = k, wrong
        self.labels = (
            None
            if labels is None
            else nnx.Variable(jnp.stack([jnp.asarray(a, jnp.int32) for a in labels]))
        )

    def __call__(self, batch, *, key=None, decode_masks=True, merge_threshold=None):
        MERGE_THRESHOLDS_SEEN.append(merge_threshold)  # at trace time
        n, b, k = batch.valid.shape[0], batch.scene_valid.shape[0], self.k
        if self.labels is None:
            semantic, instance = batch.semantic, batch.instance
        else:
            lab = self.labels[...]
            lab = jnp.pad(lab, ((0, 0), (0, n - lab.shape[1])), constant_values=-100)
            semantic, instance = lab[0], lab[1]
        sem_logits, mask_logits, inst_ok, cand_idx = _oracle_logits(
            k, batch, semantic, instance, self.wrong
        )
        m = b * k
        cand_batch = jnp.repeat(jnp.arange(b, dtype=jnp.int32), k)
        pair = (
            inst_ok[:, None]
            & inst_ok[None, :]
            & (cand_batch[:, None] == cand_batch[None, :])
            & ~jnp.eye(m, dtype=bool)
        )
        heads = PointHeadOutputs(
            semantic_logits=sem_logits,
            offset=jnp.zeros((n, 3)),
            heat_logits=jnp.zeros(n),
            reduce_feats=jnp.zeros((n, 1)),
            mask_feats=jnp.zeros((n, 1)),
            foreground=batch.valid & (jnp.argmax(sem_logits, -1) >= FIRST_INSTANCE_CLASS),
        )
        return DKNetOutputs(
            heads=heads,
            heat=jnp.zeros(n),
            cand_idx=cand_idx,
            cand_ok=inst_ok,
            cand_batch=cand_batch,
            merge_logits=jnp.zeros((m, m)),
            pair_mask=pair,
            lead=jnp.where(inst_ok, jnp.arange(m, dtype=jnp.int32), -1),
            inst_ok=inst_ok,
            inst_pos=jnp.zeros((m, 3)),
            kernels=jnp.zeros((m, 1)),
            mask_logits=mask_logits if decode_masks else None,
            pool_exhausted=jnp.zeros(b, bool),
            voxel_overflow=jnp.zeros((), bool),
            inst_batch=cand_batch,
            instance_overflow=jnp.zeros(b, bool),
        )


def _oracle_model(config, wrong, labels=None):
    """(graphdef, params, rest) of the oracle, as ``train.build_model`` returns them."""
    return nnx.split(OracleDKNet(config.model.max_candidates, wrong, labels), nnx.Param, ...)


def _config(root):
    spec = importlib.util.spec_from_file_location(
        "synthetic_cfg", os.path.join(ROOT, "configs", "synthetic.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config("tiny")
    c.data.root = root
    c.data.eval_batch_size = 2  # scenes 0 + 1 share a batch, scene 2 has a padding scene
    c.data.point_buckets = (1024, 2048)
    c.data.max_points = 2048
    assert c.test.min_points == 100 and c.test.score_threshold == 0.1
    assert c.test.use_superpoints and c.model.first_instance_class == 2
    return c


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    base = tmp_path_factory.mktemp("oracle")
    os.makedirs(base / "val")
    for i, name in enumerate(SCENES):
        np.savez(base / "val" / f"{name}.npz", **_scene_arrays(name, seed=i))
    return str(base)


def _read_pred_dir(pred_dir):
    """{scene: [(nyu40 label, score, mask)]} from benchmark prediction files."""
    out = {}
    for f in sorted(os.listdir(pred_dir)):
        if not f.endswith(".txt"):
            continue
        rows = []
        for line in open(os.path.join(pred_dir, f)).read().splitlines():
            rel, lab, conf = line.split()
            mask = np.loadtxt(os.path.join(pred_dir, rel), dtype=np.int64)
            rows.append((int(lab), float(conf), mask))
        out[f[:-4]] = rows
    return out


def _official(gt_dir, pred_dir):
    spec = importlib.util.spec_from_file_location(
        "crosscheck_official_eval", os.path.join(ROOT, "scripts", "crosscheck_official_eval.py")
    )
    cc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cc)
    mod = cc.load_official(REF)
    ap, crashes = cc.official_ap(mod, gt_dir, pred_dir)
    assert crashes == 0
    return mod.compute_averages(ap[None])


@pytest.mark.parametrize("wrong", [False, True])
def test_evaluate_split_with_oracle_model(root, tmp_path, wrong):
    config = _config(root)
    config.test.merge_threshold = 0.65  # inference groups with the test-time threshold
    MERGE_THRESHOLDS_SEEN.clear()
    out_dir = str(tmp_path / "out")
    res = ev.evaluate_split(
        *_oracle_model(config, wrong),
        config,
        split="val",
        out_dir=out_dir,
        write_files=True,
        progress=False,
    )
    assert res["scenes"] == 3
    assert MERGE_THRESHOLDS_SEEN and set(MERGE_THRESHOLDS_SEEN) == {0.65}
    inst = res["instance"]
    if not wrong:
        assert inst["all_ap"] == 1.0 and inst["all_ap_50%"] == 1.0
        assert inst["all_ap_25%"] == 1.0
        assert res["semantic"]["miou"] == 1.0
    else:
        assert inst["classes"]["chair"]["ap"] == pytest.approx(CHAIR_AP_WRONG, abs=1e-9)
        assert inst["classes"]["table"]["ap"] == 0.0
        assert inst["classes"]["bed"]["ap"] == 1.0 and inst["classes"]["sofa"]["ap"] == 1.0
        for key in ("all_ap", "all_ap_50%", "all_ap_25%"):
            assert inst[key] == pytest.approx(MEAN_WRONG, abs=1e-9), key
        assert res["semantic"]["miou"] < 1.0

    # the benchmark files: one line per GT instance, GT classes (no wall / floor), the
    # hand-computed scores, masks equal to the GT instances
    pred = _read_pred_dir(os.path.join(out_dir, "pred"))
    assert sorted(pred) == sorted(SCENES)
    got = sorted(
        ((lab, conf) for rows in pred.values() for lab, conf, _ in rows), key=lambda t: t[1]
    )
    want = _expected(wrong)
    assert [lab for lab, _ in got] == [lab for lab, _ in want]
    np.testing.assert_allclose([c for _, c in got], [c for _, c in want], rtol=1e-5)
    for name, rows in pred.items():
        gt_ids = E.read_ids(os.path.join(out_dir, "gt", name + ".txt"))
        arrays = _scene_arrays(name, seed=list(SCENES).index(name))
        np.testing.assert_array_equal(
            gt_ids, E.gt_ids_from_labels(arrays["semantic"], arrays["instance"])
        )
        inst_ids = sorted(set(arrays["instance"][arrays["instance"] >= 0].tolist()))
        masks = sorted(tuple(np.flatnonzero(m)) for _, _, m in rows)
        assert masks == sorted(tuple(np.flatnonzero(arrays["instance"] == g)) for g in inst_ids)

    if HAVE_REF:
        avg = _official(os.path.join(out_dir, "gt"), os.path.join(out_dir, "pred"))
        for key in ("all_ap", "all_ap_50%", "all_ap_25%"):
            assert avg[key] == pytest.approx(1.0 if not wrong else MEAN_WRONG, abs=1e-9)


@pytest.mark.parametrize("wrong", [False, True])
def test_predict_file_with_oracle_model(root, tmp_path, wrong):
    """predict.py on scene 0 written as a user's .npz scan (superpoint vote off)."""
    name = "scene0000_00"
    arrays = _scene_arrays(name, seed=0)
    scan = tmp_path / f"{name}.npz"
    np.savez(scan, xyz=arrays["xyz"], rgb=arrays["rgb"])
    config = _config(root)
    model = predictor.LoadedModel(
        *_oracle_model(config, wrong, (arrays["semantic"], arrays["instance"])), config, 0, "oracle"
    )
    out_dir = tmp_path / "out"
    out = P.predict_file(
        "unused", str(scan), str(out_dir), superpoints="none", log=lambda m: None, model=model
    )
    pred = out.prediction
    # instances sorted by score, highest first; labels are class indices
    order = np.argsort(-pred.scores, kind="stable")
    np.testing.assert_array_equal(order, np.arange(len(pred.scores)))
    cls_of = {0: CHAIR, 1: CHAIR, 2: CHAIR if wrong else TABLE, 3: OTHERFURN}
    want = sorted(
        (c, _sigmoid(3 - np.sum(arrays["instance"] == g) / 100) * P_SEM) for g, c in cls_of.items()
    )
    got = sorted(zip(pred.labels.tolist(), pred.scores.tolist(), strict=True))
    assert [c for c, _ in got] == [c for c, _ in want]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in want], rtol=1e-5)
    np.testing.assert_array_equal(pred.instance >= 0, arrays["instance"] >= 0)

    # the submission file evaluated against the scan's GT: AP 1 / the wrong-class value
    gt_dir = tmp_path / "gt"
    gt_dir.mkdir()
    E.write_gt_ids(
        str(gt_dir / f"{name}.txt"), E.gt_ids_from_labels(arrays["semantic"], arrays["instance"])
    )
    res, skipped = E.evaluate_dirs(str(gt_dir), str(out_dir), progress=False)
    assert skipped == []
    # scene 0 alone; wrong: chairs s(150), s(130) TP, table-as-chair s(105) FP on top:
    # (2/3, 1), (1/2, 1/2), (0, 0), (1, 0): 2/3 * 1/4 + 1/2 * 1/2 = 5/12; table 0;
    # otherfurniture (nyu40 39, a label the index + 1 would get wrong) 1
    want_ap = 1.0 if not wrong else (5 / 12 + 0.0 + 1.0) / 3
    assert res["all_ap"] == pytest.approx(want_ap, abs=1e-9)
    assert res["all_ap_25%"] == pytest.approx(want_ap, abs=1e-9)
    if HAVE_REF:
        avg = _official(str(gt_dir), str(out_dir))
        assert avg["all_ap"] == pytest.approx(want_ap, abs=1e-9)


def test_evaluate_split_reruns_an_overflowing_batch(root):
    """A real DKNet whose level-0 tiles hold 0.5 pairs per voxel (every batch overflows
    them) and no compiled fallback: evaluate_split warns, reruns each batch with the
    overflow-safe settings and reports what the model with the fallback compiled in
    reports (same parameters)."""
    from dknet_jax.model import build_model

    config = _config(root)
    config.model.pairs_per_voxel = (0.5,)
    config.model.tile_fallback = True
    graphdef, params, rest = build_model(config)
    want = ev.evaluate_split(graphdef, params, rest, config, split="val", progress=False)
    config.model.tile_fallback = False
    graphdef = build_model(config)[0]  # same parameters: the switch is static
    with pytest.warns(UserWarning, match=r"conv tiles overflowed; reran with"):
        got = ev.evaluate_split(graphdef, params, rest, config, split="val", progress=False)
    for key in ("instance", "semantic", "scenes"):  # (json: NaN classes compare equal)
        assert json.dumps(got[key], sort_keys=True) == json.dumps(want[key], sort_keys=True)

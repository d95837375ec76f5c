"""predict.py end to end with a tiny untrained DKNet saved as a real checkpoint: a
synthetic mesh PLY, a PLY without faces or colours, a .txt; every output file parsed back
and checked against the input and against each other; hand-built predictions for the
writers; clear errors on bad input."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import plyfile
import pytest
from flax import nnx
from PIL import Image

from dknet_jax import eval as E
from dknet_jax.checkpoint import Checkpoints, config_from_meta
from dknet_jax.config import base_config
from dknet_jax.data.labels import SCANNET_CLASSES, SCANNET_NYU40_IDS
from dknet_jax.data.ply import write_ply
from dknet_jax.inference import render as R
from dknet_jax.inference import scan as P
from dknet_jax.inference.predictor import load_model
from dknet_jax.model import build_model
from dknet_jax.synthetic import generate_scene
from dknet_jax.training.optim import make_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = 4096


def _tiny_config():
    spec = importlib.util.spec_from_file_location(
        "synthetic_cfg", os.path.join(ROOT, "configs", "synthetic.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config("tiny")
    c.data.point_buckets = (BUCKET,)  # one bucket: one compile for every test scan
    c.data.max_points = BUCKET
    c.test.score_threshold = 0.0  # an untrained model: keep whatever it finds
    c.test.min_points = 1
    c.model.level_capacity_ratio = (0.5,)  # too small for sparse rooms: exercises the rerun
    return c


def _random_state(config, seed=0):
    """Untrained parameters without running the (slow, eager) initialisers: shapes from
    an abstract trace, values random (the semantic bias favours two instance classes so
    the model finds instances); BatchNorm statistics mean 0 / var 1."""
    _, params, rest = nnx.split(
        nnx.eval_shape(lambda: nnx.merge(*build_model(config))), nnx.Param, ...
    )
    rng = np.random.default_rng(seed)

    def param(path, s):
        x = rng.normal(0, 0.3, s.shape).astype(s.dtype)
        if "['semantic']['out']['bias']" in jax.tree_util.keystr(path):
            x[[4, 16]] += 3.0  # chair / toilet: foreground points, so instances appear
        return x

    params = jax.tree_util.tree_map_with_path(param, params)

    def stat(path, s):
        name = str(path[-2]) if len(path) > 1 else ""
        fill = 1.0 if "var" in name else 0.0
        return np.full(s.shape, fill, s.dtype)

    rest = jax.tree_util.tree_map_with_path(stat, rest)
    tx, _ = make_optimizer(config.train, 1, 1)
    return {"params": params, "rest": rest, "opt": tx.init(params), "key": jax.random.PRNGKey(0)}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    config = _tiny_config()
    wd = str(tmp_path_factory.mktemp("work"))
    ckpt = Checkpoints(wd)
    ckpt.save(
        3,
        _random_state(config),
        {"step": 3, "data": None, "best": None, "config": config.to_json_best_effort()},
    )
    ckpt.close()
    return wd


@pytest.fixture(scope="module")
def model(workdir):
    return load_model(workdir, log=lambda m: None)


@pytest.fixture(scope="module")
def scene():
    return generate_scene(np.random.default_rng(0), "tiny")


def _write_mesh_ply(path, scene):
    v = scene.vertices
    write_ply(
        path,
        {
            "x": v[:, 0],
            "y": v[:, 1],
            "z": v[:, 2],
            "red": scene.colors[:, 0],
            "green": scene.colors[:, 1],
            "blue": scene.colors[:, 2],
        },
        faces=scene.faces,
    )


def _check_outputs(out_dir, name, xyz, faces, summary_ret):
    """Parse every output back; check counts and the cross-file consistency."""
    n = len(xyz)
    summary = json.load(open(os.path.join(out_dir, f"{name}_summary.json")))
    assert summary == json.loads(json.dumps(summary_ret))
    assert summary["scene"]["points"] == n
    k = summary["scene"]["instances"]
    assert len(summary["instances"]) == k
    for key in ("load_s", "restore_s", "compile_s", "inference_s", "write_s"):
        assert summary["timings_s"][key] >= 0

    # submission files: one line per instance, each mask has N lines of 0/1
    pred_file = os.path.join(out_dir, f"{name}.txt")
    lines = open(pred_file).read().splitlines()
    assert len(lines) == k
    for line in lines:
        rel = line.split()[0]
        assert len(open(os.path.join(out_dir, rel)).read().splitlines()) == n
    masks, labels, scores, _ = E.read_prediction(pred_file, out_dir, n)
    assert masks.shape == (k, n)

    # instance PLY: same points (and faces), per-point instance = best-scoring mask
    ply = plyfile.PlyData.read(os.path.join(out_dir, f"{name}_instances.ply"))
    vx = ply["vertex"].data
    assert len(vx) == n
    np.testing.assert_allclose(np.stack([vx["x"], vx["y"], vx["z"]], 1), xyz, atol=1e-6)
    if faces is None:
        assert "face" not in [e.name for e in ply.elements]
    else:
        assert len(ply["face"].data) == len(faces)
    inst = np.asarray(vx["instance"])
    cols = np.stack([vx["red"], vx["green"], vx["blue"]], 1)
    palette = R.distinct_colors(k)
    for i in range(n) if n < 50 else np.random.default_rng(0).choice(n, 50, replace=False):
        if inst[i] < 0:
            assert not masks[:, i].any() and tuple(cols[i]) == R.GREY
        else:
            assert masks[inst[i], i]
            covering = np.flatnonzero(masks[:, i])
            assert scores[inst[i]] == scores[covering].max()
            np.testing.assert_array_equal(cols[i], palette[inst[i]])

    # summary instances agree with the mask files (same order as the submission lines)
    for j, item in enumerate(summary["instances"]):
        assert item["points"] == int(masks[j].sum())
        assert item["nyu40_id"] == int(labels[j])
        assert SCANNET_NYU40_IDS[SCANNET_CLASSES.index(item["class"])] == labels[j]
        assert item["score"] == pytest.approx(scores[j])
        if item["points"]:
            pts = xyz[masks[j]]
            np.testing.assert_allclose(item["box"]["min"], pts.min(0), atol=1e-5)
            np.testing.assert_allclose(item["box"]["max"], pts.max(0), atol=1e-5)
    assert list(scores) == sorted(scores, reverse=True)

    # semantic PLY coloured by the fixed class palette
    sply = plyfile.PlyData.read(os.path.join(out_dir, f"{name}_semantic.ply"))["vertex"].data
    sem = np.asarray(sply["semantic"])
    assert len(sem) == n and sem.min() >= 0 and sem.max() < len(SCANNET_CLASSES)
    scol = np.stack([sply["red"], sply["green"], sply["blue"]], 1)
    np.testing.assert_array_equal(scol, P.semantic_colors(base_config())[sem])
    assert summary["scene"]["semantic_points"] == {
        SCANNET_CLASSES[c]: int(v) for c, v in enumerate(np.bincount(sem)) if v
    }

    img = Image.open(os.path.join(out_dir, f"{name}.png"))
    assert img.size[0] == 1280 and img.size[1] > 520
    return summary, masks


def test_predict_mesh_ply(tmp_path, model, scene):
    path = tmp_path / "room.ply"
    _write_mesh_ply(path, scene)
    logs = []
    out = P.predict_file(None, str(path), str(tmp_path / "out"), model=model, log=logs.append)
    summary, _ = _check_outputs(
        str(tmp_path / "out"), "room", scene.vertices, scene.faces, out.summary
    )
    # every point is foreground (semantic bias) and no filter is on: instances must appear,
    # so the mask-file / PLY / summary cross-checks above ran on real masks
    assert summary["scene"]["instances"] >= 1
    assert summary["scene"]["faces"] == len(scene.faces)
    assert summary["scene"]["superpoints"] == len(
        np.unique(P.compute_superpoints(scene.vertices, scene.faces))
    )
    assert summary["checkpoint"]["step"] == 3
    text = "\n".join(logs)
    for stage in ("loaded", "superpoints (mesh)", "inference: compile", "wrote"):
        assert stage in text
    # this sparse room overflows the coarse UNet levels at the default capacity ratio 0.5:
    # predict reruns with 1.0 instead of failing
    assert "reran with 1.0" in text and summary["warnings"]


def test_predict_bare_ply_and_txt(tmp_path, model, scene):
    xyz = scene.vertices[::2]
    bare = tmp_path / "bare.ply"
    write_ply(bare, {"x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2]}, binary=False)
    logs = []
    out = P.predict_file(None, str(bare), str(tmp_path / "o1"), model=model, log=logs.append)
    _check_outputs(str(tmp_path / "o1"), "bare", xyz, None, out.summary)
    assert any("no colours" in m for m in logs)
    assert any("superpoints (point-cloud)" in m for m in logs)
    np.testing.assert_array_equal(out.prediction.rgb, 128)

    txt = tmp_path / "rows.txt"
    rows = np.concatenate([scene.vertices[1::3], scene.colors[1::3]], 1)
    np.savetxt(txt, rows, fmt="%.6f %.6f %.6f %d %d %d")
    out = P.predict_file(
        None, str(txt), str(tmp_path / "o2"), model=model, superpoints="none", log=lambda m: None
    )
    _check_outputs(str(tmp_path / "o2"), "rows", rows[:, :3].astype(np.float32), None, out.summary)
    assert out.summary["scene"]["superpoints"] is None


def test_too_many_points_error_and_subsample(tmp_path, model):
    rng = np.random.default_rng(1)
    n = BUCKET + 700
    xyz = rng.uniform(0, 4, (n, 3)).astype(np.float32)
    path = tmp_path / "big.npz"
    np.savez(path, xyz=xyz, rgb=rng.integers(0, 255, (n, 3)).astype(np.uint8))
    with pytest.raises(
        ValueError,
        match=r"exceed the largest point bucket.*point_buckets"
        r".*--subsample",
    ):
        P.predict_file(
            None,
            str(path),
            str(tmp_path / "o"),
            model=model,
            superpoints="none",
            log=lambda m: None,
        )
    logs = []
    out = P.predict_file(
        None,
        str(path),
        str(tmp_path / "o"),
        model=model,
        superpoints="none",
        subsample=True,
        log=logs.append,
    )
    pred = out.prediction
    assert pred.inferred == BUCKET and pred.sem_pred.shape == (n,)
    assert pred.masks.shape[1] == n
    assert any("random subset" in m for m in logs) and out.summary["warnings"]
    _check_outputs(str(tmp_path / "o"), "big", xyz, None, out.summary)


def test_write_outputs_hand_built(tmp_path):
    xyz = np.array([[0, 0, 0], [1, 0, 0], [1, 2, 0], [3, 3, 1], [5, 5, 5]], np.float32)
    masks = np.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 0]], bool)
    scores = np.array([0.9, 0.4], np.float32)
    labels = np.array([4, 16], np.int32)  # chair, toilet
    pred = P.Prediction(
        name="hand",
        xyz=xyz,
        rgb=np.zeros((5, 3), np.uint8),
        faces=np.array([[0, 1, 2]], np.int32),
        masks=masks,
        labels=labels,
        scores=scores,
        sem_pred=np.array([4, 4, 4, 16, 0], np.int32),
        instance=P.instance_per_point(masks, scores),
        superpoint=np.arange(5),
        inferred=5,
        bucket=8,
        warnings=[],
    )
    np.testing.assert_array_equal(pred.instance, [0, 0, 0, 1, -1])  # point 2: 0.9 wins
    out = P.write_outputs(str(tmp_path), pred, base_config())
    s = out.summary
    a, b = s["instances"]
    assert (a["class"], a["nyu40_id"], a["points"], a["points_assigned"]) == ("chair", 5, 3, 3)
    assert (b["class"], b["nyu40_id"], b["points"], b["points_assigned"]) == ("toilet", 33, 2, 1)
    assert a["box"] == {
        "min": [0, 0, 0],
        "max": [1, 2, 0],
        "centre": [0.5, 1, 0],
        "size": [1, 2, 0],
    }
    assert b["box"]["centre"] == [2, 2.5, 0.5] and b["box"]["size"] == [2, 1, 1]
    assert s["scene"]["unassigned_points"] == 1
    assert s["scene"]["instances_per_class"] == {"chair": 1, "toilet": 1}
    assert s["scene"]["semantic_points"] == {"wall": 1, "chair": 3, "toilet": 1}
    lines = open(tmp_path / "hand.txt").read().splitlines()
    assert [ln.split()[1] for ln in lines] == ["5", "33"]
    assert [float(ln.split()[2]) for ln in lines] == pytest.approx([0.9, 0.4])
    assert open(tmp_path / lines[1].split()[0]).read() == "0\n0\n1\n1\n0\n"
    ply = plyfile.PlyData.read(tmp_path / "hand_instances.ply")
    cols = np.stack([ply["vertex"].data[c] for c in ("red", "green", "blue")], 1)
    pal = R.distinct_colors(2)
    np.testing.assert_array_equal(cols, [pal[0], pal[0], pal[0], pal[1], R.GREY])
    assert ply["face"].data["vertex_indices"][0].tolist() == [0, 1, 2]


def test_write_outputs_s3dis_label_space(tmp_path):
    c = base_config()
    c.data.dataset = "s3dis"
    xyz = np.array([[0, 0, 0], [1, 1, 1], [2, 0, 1]], np.float32)
    masks = np.array([[0, 1, 1]], bool)
    pred = P.Prediction(
        name="area",
        xyz=xyz,
        rgb=np.zeros((3, 3), np.uint8),
        faces=None,
        masks=masks,
        labels=np.array([8], np.int32),
        scores=np.array([0.7], np.float32),
        sem_pred=np.array([1, 8, 8], np.int32),
        instance=np.array([-1, 0, 0], np.int32),
        superpoint=None,
        inferred=3,
        bucket=4,
        warnings=[],
    )
    out = P.write_outputs(str(tmp_path), pred, c)
    assert "submission" not in out.paths  # nyu40 files only for the ScanNet labels
    assert not os.path.exists(tmp_path / "area.txt")
    inst = out.summary["instances"][0]
    assert (inst["class"], inst["nyu40_id"], inst["points"]) == ("chair", None, 2)
    assert out.summary["scene"]["semantic_points"] == {"floor": 1, "chair": 2}
    sply = plyfile.PlyData.read(tmp_path / "area_semantic.ply")["vertex"].data
    cols = np.stack([sply[k] for k in ("red", "green", "blue")], 1)
    np.testing.assert_array_equal(cols, P.semantic_colors(c)[[1, 8, 8]])
    assert len(np.unique(P.semantic_colors(c), axis=0)) == 13


def test_instance_per_point_ties_and_empty():
    masks = np.array([[1, 1, 0], [0, 1, 1], [0, 1, 0]], bool)
    # instances 1 and 2 tie at 0.5 > 0.3: the lower index wins point 1
    np.testing.assert_array_equal(P.instance_per_point(masks, np.array([0.3, 0.5, 0.5])), [0, 1, 1])
    np.testing.assert_array_equal(
        P.instance_per_point(np.zeros((0, 4), bool), np.zeros(0)), [-1, -1, -1, -1]
    )


def test_config_from_meta_types_and_unknown_keys():
    c = base_config()
    c.model.widths = (8, 16)
    c.test.score_threshold = 0.25
    values = json.loads(c.to_json_best_effort())
    values["model"]["not_a_field"] = 3
    values["data"]["voxel_size"] = 1  # an int in JSON for a float field
    notes = []
    got = config_from_meta({"config": json.dumps(values)}, log=notes.append)
    assert got.model.widths == (8, 16) and isinstance(got.model.widths, tuple)
    assert got.test.score_threshold == 0.25
    assert got.data.point_buckets == base_config().data.point_buckets
    assert isinstance(got.data.voxel_size, float) and got.data.voxel_size == 1.0
    assert notes and "model.not_a_field" in notes[0]
    assert config_from_meta({"step": 1}) is None


def test_bad_inputs_give_clear_messages(tmp_path, model, workdir):
    out = str(tmp_path / "o")
    quiet = dict(model=model, log=lambda m: None)
    with pytest.raises(FileNotFoundError, match="scan file not found.*nope.ply"):
        P.predict_file(None, str(tmp_path / "nope.ply"), out, **quiet)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        P.predict_file(None, str(empty), out, **quiet)
    nan = tmp_path / "nan.npz"
    np.savez(nan, xyz=np.array([[0, 0, 0], [np.nan, 1, 1]], np.float32))
    with pytest.raises(ValueError, match="NaN"):
        P.predict_file(None, str(nan), out, **quiet)
    with pytest.raises(ValueError, match="unsupported scan format"):
        P.predict_file(None, str(tmp_path / "x.obj"), out, **quiet)
    with pytest.raises(ValueError, match="superpoints must be"):
        P.predict_file(None, str(empty), out, superpoints="maybe", **quiet)
    # checkpoints: missing folder, a folder without checkpoints, an empty best/
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_model(str(tmp_path / "no_such_dir"))
    (tmp_path / "not_a_workdir").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoints found"):
        load_model(str(tmp_path / "not_a_workdir"))
    with pytest.raises(FileNotFoundError, match="no step 99"):
        load_model(os.path.join(workdir, "checkpoints", "99"))
    # a config describing another network
    other = _tiny_config()
    other.model.widths = (8, 24)
    with pytest.raises(ValueError, match="does not match the network"):
        load_model(workdir, config=other, log=lambda m: None)


def test_cli_reports_missing_checkpoint(tmp_path):
    scan = tmp_path / "s.txt"
    scan.write_text("0 0 0\n1 0 0\n0 1 0\n")
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "scripts", "predict.py"),
            "--checkpoint",
            str(tmp_path / "missing"),
            "--input",
            str(scan),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert "error: checkpoint not found" in r.stderr and "Traceback" not in r.stderr


def _write_txt_scan(path, scene, step=3):
    rows = np.concatenate([scene.vertices[::step], scene.colors[::step]], 1)
    np.savetxt(path, rows, fmt="%.6f %.6f %.6f %d %d %d")
    return rows


def test_outputs_never_overwrite_the_input(tmp_path, model, scene):
    """--input /x/room.txt --out /x would write the submission list over room.txt: stop
    before inference with a one-line error naming the clash and the fix; also when the
    out folder is reached through a symlink."""
    scan = tmp_path / "room.txt"
    _write_txt_scan(scan, scene)
    before = scan.read_bytes()
    link = tmp_path / "link"
    link.symlink_to(tmp_path, target_is_directory=True)
    for out in (tmp_path, link):
        logs = []
        with pytest.raises(ValueError) as e:
            P.predict_file(
                None, str(scan), str(out), model=model, superpoints="none", log=logs.append
            )
        msg = str(e.value)
        assert "\n" not in msg and "would overwrite the input" in msg
        assert str(scan) in msg and "--out" in msg
        assert not any(m.startswith("inference") for m in logs)  # stopped before the model
        assert scan.read_bytes() == before
        assert not (tmp_path / "predicted_masks").exists()
        assert not (tmp_path / "room.png").exists()
    # the submission's mask files are outputs too: scene id scene0000_00 writes
    # predicted_masks/scene0000_00_000.txt, the input's own name
    masks = tmp_path / "m" / "predicted_masks"
    masks.mkdir(parents=True)
    inside = masks / "scene0000_00_000.txt"
    _write_txt_scan(inside, scene)
    with pytest.raises(ValueError, match=r"would overwrite the input .*scene0000_00_000\.txt"):
        P.predict_file(
            None,
            str(inside),
            str(tmp_path / "m"),
            model=model,
            superpoints="none",
            log=lambda m: None,
        )


def test_scene_id_from_the_name_or_flag_and_no_whitespace(tmp_path):
    assert P.scene_id_for("/d/scene0000_00_vh_clean_2.ply") == "scene0000_00"
    assert P.scene_id_for("scene0707_00.txt") == "scene0707_00"
    assert P.scene_id_for("/d/my room\tscan.npz") == "my_room_scan"
    assert P.scene_id_for("/d/room.ply", "scene0011_01") == "scene0011_01"
    for bad in ("a b", "", "x/y", "../up"):
        with pytest.raises(ValueError, match="scene id"):
            P.scene_id_for("room.ply", bad)


def test_submission_named_by_scene_id_pairs_with_gt(tmp_path, model, scene):
    """The submission list and masks take the ScanNet scene id (so eval_scannet pairs them
    with GT); the other outputs keep the file stem; whitespace never reaches the list."""
    src = tmp_path / "in"
    src.mkdir()
    ply = src / "scene0000_00_vh_clean_2.ply"
    _write_mesh_ply(ply, scene)
    out = tmp_path / "pred"
    res = P.predict_file(
        None, str(ply), str(out), model=model, superpoints="none", log=lambda m: None
    )
    assert res.paths["submission"] == str(out / "scene0000_00.txt")
    assert res.summary["scene_id"] == "scene0000_00"
    for f in (
        "scene0000_00_vh_clean_2_instances.ply",
        "scene0000_00_vh_clean_2.png",
        "scene0000_00_vh_clean_2_summary.json",
    ):
        assert (out / f).is_file()
    k = res.summary["scene"]["instances"]
    assert k >= 1
    assert sorted(os.listdir(out / "predicted_masks")) == [
        f"scene0000_00_{i:03d}.txt" for i in range(k)
    ]
    # eval_scannet pairs it with the GT file of the scene
    gt = tmp_path / "gt"
    gt.mkdir()
    E.write_gt_ids(str(gt / "scene0000_00.txt"), np.full(len(scene.vertices), 5001))
    results, skipped = E.evaluate_dirs(str(gt), str(out), progress=False)
    assert skipped == [] and results["classes"]["chair"]["ap"] is not None

    # a stem with whitespace: list and masks use '_', the official split(' ') gives 3 parts
    spaced = tmp_path / "my room.txt"
    _write_txt_scan(spaced, scene)
    res = P.predict_file(
        None, str(spaced), str(tmp_path / "o2"), model=model, superpoints="none", log=lambda m: None
    )
    lst = tmp_path / "o2" / "my_room.txt"
    assert res.paths["submission"] == str(lst)
    lines = lst.read_text().splitlines()
    assert lines and all(len(ln.split(" ")) == 3 for ln in lines)
    assert all(ln.startswith("predicted_masks/my_room_") for ln in lines)
    assert (tmp_path / "o2" / "my room_instances.ply").is_file()

    # --scene_id wins over the name
    res = P.predict_file(
        None,
        str(spaced),
        str(tmp_path / "o3"),
        model=model,
        superpoints="none",
        scene_id="scene0707_00",
        log=lambda m: None,
    )
    assert res.paths["submission"] == str(tmp_path / "o3" / "scene0707_00.txt")
    assert (tmp_path / "o3" / "predicted_masks" / "scene0707_00_000.txt").is_file()


def test_cli_scene_id_flag_and_clash_error(tmp_path, workdir, scene):
    scan = tmp_path / "room.txt"
    _write_txt_scan(scan, scene)
    before = scan.read_bytes()
    cmd = [
        sys.executable,
        os.path.join(ROOT, "scripts", "predict.py"),
        "--checkpoint",
        workdir,
        "--input",
        str(scan),
        "--superpoints",
        "none",
    ]
    r = subprocess.run(cmd + ["--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "error: " in r.stderr and "would overwrite the input" in r.stderr
    assert scan.read_bytes() == before
    r = subprocess.run(
        cmd + ["--out", str(tmp_path / "o"), "--scene_id", "bad id"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "scene id" in r.stderr and "Traceback" not in r.stderr


def test_georeferenced_double_ply_keeps_precision(tmp_path, model, scene, monkeypatch):
    """Issue 11.2: a double-precision PLY in map coordinates (5e5 / 4e6 / 100 m) on a 1 cm
    lattice: the model sees centimetre steps (not float32's 0.25 m at 4e6), the output PLYs
    carry the input's coordinates exactly (float64), the summary boxes are in the input's
    coordinates and it records the origin."""
    offset = np.array([5e5, 4e6, 100.0])
    xyz = np.round(scene.vertices.astype(np.float64), 2) + offset
    assert len(np.unique(xyz[:, 1])) > 100  # the room spans metres in 1 cm steps
    path = tmp_path / "site.ply"
    write_ply(
        path,
        {
            "x": xyz[:, 0],
            "y": xyz[:, 1],
            "z": xyz[:, 2],
            "red": scene.colors[:, 0],
            "green": scene.colors[:, 1],
            "blue": scene.colors[:, 2],
        },
        faces=scene.faces,
    )
    assert plyfile.PlyData.read(path)["vertex"].data["x"].dtype == np.float64
    seen = {}
    real_run = P.run_model

    def spy(model_, xyz_, *a, **k):
        seen["xyz"] = np.array(xyz_)
        return real_run(model_, xyz_, *a, **k)

    monkeypatch.setattr(P, "run_model", spy)
    logs = []
    out = P.predict_file(None, str(path), str(tmp_path / "out"), model=model, log=logs.append)
    # the model input keeps the 1 cm resolution
    assert seen["xyz"].dtype == np.float32
    for ax in range(3):
        assert len(np.unique(seen["xyz"][:, ax])) == len(np.unique(xyz[:, ax]))
    # the output PLYs: the coordinates as read, to the micrometre, stored as float64
    for kind in ("instances", "semantic"):
        vx = plyfile.PlyData.read(tmp_path / "out" / f"site_{kind}.ply")["vertex"].data
        assert vx["x"].dtype == np.float64
        np.testing.assert_allclose(np.stack([vx["x"], vx["y"], vx["z"]], 1), xyz, rtol=0, atol=1e-6)
    summary, _ = _check_outputs(str(tmp_path / "out"), "site", xyz, scene.faces, out.summary)
    # the origin: the whole-metre floor of the bounding-box minimum
    assert summary["scene"]["origin"] == np.floor(xyz.min(0)).tolist()
    assert summary["scene"]["origin"][:2] == [5e5, 4e6]
    np.testing.assert_allclose(summary["scene"]["box"]["min"], xyz.min(0), rtol=0, atol=1e-6)
    np.testing.assert_allclose(summary["scene"]["box"]["max"], xyz.max(0), rtol=0, atol=1e-6)
    for inst in summary["instances"]:
        if inst["box"]:
            assert inst["box"]["min"][1] >= 4e6
    assert any("origin" in m for m in logs)


def test_implausible_extent_warning_reaches_the_summary(tmp_path, model):
    """A scan spanning more than a room (here 300 m: millimetres read as metres, or a whole
    site) is predicted, with a warning in the log and the summary."""
    rng = np.random.default_rng(2)
    xyz = rng.uniform(0, 1, (500, 3)) * np.array([300.0, 6.0, 3.0])
    path = tmp_path / "wide.npz"
    np.savez(path, xyz=xyz, rgb=rng.integers(0, 255, (500, 3)).astype(np.uint8))
    logs = []
    out = P.predict_file(
        None, str(path), str(tmp_path / "o"), model=model, superpoints="none", log=logs.append
    )
    assert any(m.startswith("warning: ") and "more than a room" in m for m in logs)
    assert any(
        "more than a room (x/y up to 100 m, z up to 20 m)" in w for w in out.summary["warnings"]
    )


def _hand_pred(name="hand"):
    xyz = np.array([[0, 0, 0], [1, 0, 0], [1, 2, 0], [3, 3, 1], [5, 5, 5]], np.float32)
    masks = np.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 0]], bool)
    scores = np.array([0.9, 0.4], np.float32)
    return P.Prediction(
        name=name,
        xyz=xyz,
        rgb=np.zeros((5, 3), np.uint8),
        faces=np.array([[0, 1, 2]], np.int32),
        masks=masks,
        labels=np.array([4, 16], np.int32),
        scores=scores,
        sem_pred=np.array([4, 4, 4, 16, 0], np.int32),
        instance=P.instance_per_point(masks, scores),
        superpoint=np.arange(5),
        inferred=5,
        bucket=8,
        warnings=[],
    )


def test_stale_masks_of_an_earlier_run_are_removed(tmp_path):
    md = tmp_path / "predicted_masks"
    md.mkdir()
    for f in ("hand_002.txt", "hand_099.txt", "hand_1000.txt"):  # this scene's, stale
        (md / f).write_text("1\n" * 5)
    for f in ("other_099.txt", "hand_x_001.txt", "hand_099.txt.bak", "notes.txt"):
        (md / f).write_text("keep")  # not this scene's mask pattern: left alone
    P.write_outputs(str(tmp_path), _hand_pred(), base_config())
    assert sorted(os.listdir(md)) == [
        "hand_000.txt",
        "hand_001.txt",
        "hand_099.txt.bak",
        "hand_x_001.txt",
        "notes.txt",
        "other_099.txt",
    ]
    listed = [ln.split()[0] for ln in open(tmp_path / "hand.txt").read().splitlines()]
    assert listed == ["predicted_masks/hand_000.txt", "predicted_masks/hand_001.txt"]


@pytest.mark.parametrize("target", ["ply", "png", "mask", "list"])
def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch, target):
    """A writer that dies after writing part of its output leaves no truncated final file
    and no temp file: every output is either complete (from the earlier run) or absent."""
    P.write_outputs(str(tmp_path / "ref"), _hand_pred(), base_config())
    ref = {
        os.path.relpath(os.path.join(d, f), tmp_path / "ref"): open(os.path.join(d, f), "rb").read()
        for d, _, fs in os.walk(tmp_path / "ref")
        for f in fs
    }

    class Boom(RuntimeError):
        pass

    def partial(fh):  # write part of the output, then die (a path: open it, as before)
        if isinstance(fh, (str, os.PathLike)):
            with open(fh, "wb") as f:
                f.write(b"partial")
        else:
            fh.write(b"partial" if "b" in getattr(fh, "mode", "b") else "partial")
        raise Boom("disk full")

    if target == "ply":
        monkeypatch.setattr(P, "write_ply", lambda fh, *a, **k: partial(fh))
    elif target == "png":
        monkeypatch.setattr(Image.Image, "save", lambda self, fh, *a, **k: partial(fh))
    else:
        import dknet_jax.io_atomic as A

        real, masks_seen = A.write_atomic, []

        def wrapped(path, write, mode):
            if os.path.basename(os.path.dirname(path)) == "predicted_masks":
                masks_seen.append(path)
            if (target == "list" and path.endswith("hand.txt")) or (
                target == "mask" and len(masks_seen) == 2 and masks_seen[-1] == path
            ):
                return real(path, partial, mode)
            return real(path, write, mode)

        monkeypatch.setattr(A, "write_atomic", wrapped)
    out = tmp_path / "out"
    with pytest.raises(Boom):
        P.write_outputs(str(out), _hand_pred(), base_config())
    for d, _, fs in os.walk(out):
        for f in fs:
            rel = os.path.relpath(os.path.join(d, f), out)
            assert not f.endswith(".tmp"), rel
            assert open(os.path.join(d, f), "rb").read() == ref[rel], rel  # complete


def test_predict_file_uses_the_configured_voxel_origin(tmp_path, model, scene, monkeypatch):
    """predict.py packs the scan with ``config.data.voxel_origin``: the voxels handed to the
    model are ``floor(p / voxel) - min`` (centre) or, released, ``floor(p * scale -
    min(p * scale))`` (scale = 1 / voxel) of the centred scan; both runs finish."""
    import dataclasses

    from dknet_jax.inference import predictor

    scan = tmp_path / "room.txt"
    rows = _write_txt_scan(scan, scene, step=2)
    centred = rows[:, :3].astype(np.float32).astype(np.float64)
    centred = (centred - centred.mean(0)).astype(np.float32).astype(np.float64)
    seen = []
    infer = predictor._infer

    def spy(loaded, batch, ratio, timings):
        seen.append(batch)
        return infer(loaded, batch, ratio, timings)

    monkeypatch.setattr(predictor, "_infer", spy)
    vs = model.config.data.voxel_size
    vox = {}
    for origin in ("centre", "scene_min"):
        config = model.config.copy_and_resolve_references()
        config.data.voxel_origin = origin
        loaded = dataclasses.replace(model, config=config)  # shares the compiled cache
        seen.clear()
        out = P.predict_file(
            None, str(scan), str(tmp_path / origin), model=loaded, log=lambda m: None
        )
        assert out.summary["scene"]["points"] == len(rows)
        batch = seen[-1]
        rows_ok = np.asarray(batch.valid)
        xyz = np.asarray(batch.xyz)[rows_ok].astype(np.float64)
        np.testing.assert_allclose(xyz, centred, atol=1e-5)
        if origin == "scene_min":
            p = xyz * (1.0 / vs)
            want = np.floor(p - p.min(0))
        else:
            c = np.floor(xyz / vs)
            want = c - c.min(0)
        vox[origin] = np.asarray(batch.vox)[rows_ok]
        np.testing.assert_array_equal(vox[origin], want)
    assert (vox["centre"] != vox["scene_min"]).any()

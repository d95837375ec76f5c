"""Benchmark file formats and ``scripts/eval_scannet.py`` on temporary folders."""

import importlib.util
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from dknet_jax.eval import (
    BenchmarkFormatError,
    evaluate_dirs,
    load_dirs,
    read_ids,
    read_prediction,
    results_to_json,
    write_gt_ids,
    write_prediction,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "eval_scannet.py")
CHAIR, TABLE = 5, 7
N = 500


def load_script():
    spec = importlib.util.spec_from_file_location("eval_scannet_cli", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_set(tmp_path, with_second_pred=False):
    """scene0000_00: chair [0,200) + table [200,400); scene0001_00: chair [0,150).
    Predictions: perfect chair (0.9) and table (0.8) in scene 0 only."""
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    gt0 = np.zeros(N, np.int64)
    gt0[:200], gt0[200:400] = CHAIR * 1000 + 1, TABLE * 1000 + 2
    gt1 = np.zeros(N, np.int64)
    gt1[:150] = CHAIR * 1000 + 1
    write_gt_ids(gt_dir / "scene0000_00.txt", gt0)
    write_gt_ids(gt_dir / "scene0001_00.txt", gt1)
    masks = np.zeros((2, N), bool)
    masks[0, :200], masks[1, 200:400] = True, True
    write_prediction(str(pred_dir), "scene0000_00", masks, [CHAIR, TABLE], [0.9, 0.8])
    if with_second_pred:
        write_prediction(str(pred_dir), "scene0001_00", np.zeros((0, N), bool), [], [])
    return str(gt_dir), str(pred_dir)


def test_round_trip(tmp_path):
    ids = np.array([0, 5001, 7002, 1000, 39005], np.int64)
    write_gt_ids(tmp_path / "g.txt", ids)
    np.testing.assert_array_equal(read_ids(tmp_path / "g.txt"), ids)
    rng = np.random.default_rng(0)
    masks = rng.random((3, 50)) < 0.5
    scores = np.array([0.123456789012345, 0.5, 1 / 3])
    path = write_prediction(str(tmp_path), "sc", masks, [5, 1, 39], scores)
    assert open(path).read().splitlines()[0].startswith("predicted_masks/sc_000.txt 5 ")
    # wall (1) is not an instance class: skipped, like the official script, with a note
    with pytest.warns(UserWarning, match=r"1 prediction line\(s\) skipped.*label ids 1;"):
        m, lab, sc, paths = read_prediction(path, str(tmp_path), 50)
    np.testing.assert_array_equal(m, masks[[0, 2]])
    np.testing.assert_array_equal(lab, [5, 39])
    np.testing.assert_array_equal(sc, scores[[0, 2]])  # full precision kept
    assert len(paths) == 2 and all(os.path.isabs(p) for p in paths)


def test_cli_writes_json_and_table_and_skips_scene_without_predictions(tmp_path, capsys):
    gt_dir, pred_dir = make_set(tmp_path)
    out = tmp_path / "res" / "results.json"
    with pytest.warns(UserWarning, match="1 GT scene"):
        rc = load_script().main(
            ["--gt_dir", gt_dir, "--pred_dir", pred_dir, "--out", str(out), "--no_progress"]
        )
    assert rc == 0
    res = json.loads(out.read_text())
    assert set(res) == {"all_ap", "all_ap_50%", "all_ap_25%", "classes"}
    # scene0001_00 (an unmatched chair) is skipped, not counted as a miss: AP stays 1
    assert res["all_ap"] == 1.0 and res["classes"]["chair"] == {
        "ap": 1.0,
        "ap50%": 1.0,
        "ap25%": 1.0,
    }
    assert res["classes"]["sofa"] == {"ap": None, "ap50%": None, "ap25%": None}
    assert len(res["classes"]) == 18
    printed = capsys.readouterr().out
    assert "chair" in printed and "average" in printed


def test_empty_prediction_file_counts_the_scene(tmp_path):
    gt_dir, pred_dir = make_set(tmp_path, with_second_pred=True)
    res, skipped = evaluate_dirs(gt_dir, pred_dir, progress=False)
    assert skipped == []
    # chairs: TP (0.9) + one missed: (P=1, R=.5), (1, 0) -> 0.5; table 1 -> mean 0.75
    assert res["classes"]["chair"]["ap"] == pytest.approx(0.5)
    assert res["all_ap"] == pytest.approx(0.75)


def test_script_runs_as_a_command(tmp_path):
    gt_dir, pred_dir = make_set(tmp_path, with_second_pred=True)
    r = subprocess.run(
        [
            sys.executable,
            SCRIPT,
            "--gt_dir",
            gt_dir,
            "--pred_dir",
            pred_dir,
            "--out",
            str(tmp_path / "r.json"),
            "--no_progress",
        ],
        capture_output=True,
        text=True,
        cwd=str(tmp_path),
    )
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "r.json").read_text())["all_ap"] == pytest.approx(0.75)


def _error(gt_dir, pred_dir, capsys):
    rc = load_script().main(["--gt_dir", gt_dir, "--pred_dir", pred_dir, "--no_progress"])
    assert rc == 2
    return capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:.*no prediction file")
def test_clear_errors(tmp_path, capsys):
    gt_dir, pred_dir = make_set(tmp_path)
    assert "does not exist" in _error(gt_dir + "_nope", pred_dir, capsys)
    assert "does not exist" in _error(gt_dir, str(tmp_path / "nope"), capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no prediction files" in _error(gt_dir, str(empty), capsys)

    mask0 = os.path.join(pred_dir, "predicted_masks", "scene0000_00_000.txt")
    good = open(mask0).read()
    open(mask0, "w").write(good + "1\n")  # one line too many
    err = _error(gt_dir, pred_dir, capsys)
    assert "wrong number of lines" in err and "501 vs 500" in err
    open(mask0, "w").write(good.replace("1\n", "0.5\n", 1))
    assert "one integer (0/1) per line" in _error(gt_dir, pred_dir, capsys)
    open(mask0, "w").write(good)

    scene = os.path.join(pred_dir, "scene0000_00.txt")
    lines = open(scene).read()
    # a label the official script cannot parse (41 or 0 it skips: see the test below)
    open(scene, "w").write(lines.replace(" 5 ", " chair ", 1))
    assert "label id / confidence not numbers" in _error(gt_dir, pred_dir, capsys)
    open(scene, "w").write(lines.replace("predicted_masks/", "../", 1))
    assert "outside" in _error(gt_dir, pred_dir, capsys)
    open(scene, "w").write(lines.replace(" 0.9", "", 1))
    assert "expected '<relative mask path>" in _error(gt_dir, pred_dir, capsys)
    open(scene, "w").write(lines.replace("predicted_masks/scene0000_00_000", "nope/x", 1))
    assert "cannot read mask file" in _error(gt_dir, pred_dir, capsys)
    open(scene, "w").write(lines)

    write_prediction(pred_dir, "scene0099_00", np.zeros((0, N), bool), [], [])
    assert "without a GT file" in _error(gt_dir, pred_dir, capsys)
    with pytest.raises(BenchmarkFormatError):
        evaluate_dirs(gt_dir, pred_dir, progress=False)


def test_mask_path_listed_twice_keeps_the_last_line(tmp_path):
    gt_dir, pred_dir = make_set(tmp_path, with_second_pred=True)
    scene = os.path.join(pred_dir, "scene0000_00.txt")
    first = open(scene).read().splitlines()[0]  # chair mask, 0.9
    # the same mask listed again with label table: the official dict keeps the last line,
    # so the chair prediction becomes a table prediction (chair AP 0, table: TP + FP)
    with open(scene, "a") as f:
        f.write(first.replace(" 5 ", " 7 ") + "\n")
    with pytest.warns(UserWarning, match="listed twice"):
        res, _ = evaluate_dirs(gt_dir, pred_dir, progress=False)
    assert res["classes"]["chair"]["ap"] == 0.0
    # table: TP 0.8 and FP 0.9 (the chair mask) -> u=.8 (P=.5,R=1), u=.9 (0,0), (1,0): 0.25
    assert res["classes"]["table"]["ap"] == pytest.approx(0.25)


REF = os.environ.get(
    "DKNET_SCANNET_EVAL_REF",
    os.path.join(ROOT, "..", "shared", "reference", "scannet_official_eval"),
)
HAVE_REF = os.path.isdir(os.path.join(REF, "BenchmarkScripts"))


def test_label_ids_outside_the_instance_classes_are_skipped_like_the_benchmark(tmp_path):
    """The official script skips (without reading the mask) every line whose label id is
    not one of the 18 instance classes' nyu40 ids, 0 and 41 included; so must we, with
    one warning that counts them, and the same AP."""
    gt_dir, pred_dir = make_set(tmp_path, with_second_pred=True)
    scene = os.path.join(pred_dir, "scene0000_00.txt")
    with open(scene, "a") as f:
        # masks that do not exist: the official script never opens them for these labels;
        # a non-finite confidence on a skipped line is never used either
        f.write(
            "predicted_masks/unlabelled.txt 0 0.95\n"
            "predicted_masks/beyond_nyu40.txt 41 nan\n"
            "predicted_masks/negative.txt -1 0.5\n"
            "predicted_masks/float_zero.txt 0.0 0.7\n"
        )
    with pytest.warns(UserWarning) as record:
        res, skipped = evaluate_dirs(gt_dir, pred_dir, progress=False)
    notes = [str(w.message) for w in record if "not an instance class" in str(w.message)]
    assert len(notes) == 1, [str(w.message) for w in record]  # one warning per run
    assert "4 prediction line" in notes[0] and "label ids -1, 0, 41;" in notes[0]
    assert skipped == []
    # hand-worked (as test_empty_prediction_file_counts_the_scene): chairs TP 0.9 + one
    # missed -> 0.5, table 1.0, mean over the two classes with GT 0.75
    assert res["classes"]["chair"]["ap"] == pytest.approx(0.5)
    assert res["classes"]["table"]["ap"] == pytest.approx(1.0)
    assert res["all_ap"] == pytest.approx(0.75)

    # the command accepts the set too (exit 0), as the benchmark does
    with pytest.warns(UserWarning, match="not an instance class"):
        assert (
            load_script().main(["--gt_dir", gt_dir, "--pred_dir", pred_dir, "--no_progress"]) == 0
        )

    if not HAVE_REF:
        pytest.skip("official ScanNet evaluation scripts not available")
    spec = importlib.util.spec_from_file_location(
        "crosscheck_official_eval", os.path.join(ROOT, "scripts", "crosscheck_official_eval.py")
    )
    cc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cc)
    official, crashes = cc.official_ap(cc.load_official(REF), gt_dir, pred_dir)
    with pytest.warns(UserWarning, match="not an instance class"):
        ev, _ = load_dirs(gt_dir, pred_dir, progress=False)
    ap = ev.compute_ap_matrix()
    assert crashes == 0
    np.testing.assert_array_equal(np.isnan(official), np.isnan(ap))
    np.testing.assert_allclose(np.nan_to_num(official), np.nan_to_num(ap), atol=1e-12)


@pytest.mark.filterwarnings("ignore:.*no prediction file")
def test_empty_gt_file_is_named_not_the_mask_file(tmp_path):
    gt_dir, pred_dir = make_set(tmp_path)
    open(os.path.join(gt_dir, "scene0000_00.txt"), "w").close()
    with pytest.raises(BenchmarkFormatError, match=r"GT file .*scene0000_00\.txt is empty"):
        evaluate_dirs(gt_dir, pred_dir, progress=False)


@pytest.mark.filterwarnings("ignore:.*no prediction file")
def test_byte_order_marks_are_dropped(tmp_path):
    gt_dir, pred_dir = make_set(tmp_path)
    want, _ = evaluate_dirs(gt_dir, pred_dir, progress=False)
    for path in (
        os.path.join(gt_dir, "scene0000_00.txt"),
        os.path.join(pred_dir, "scene0000_00.txt"),
        os.path.join(pred_dir, "predicted_masks", "scene0000_00_000.txt"),
    ):
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(b"\xef\xbb\xbf" + data)
    got, _ = evaluate_dirs(gt_dir, pred_dir, progress=False)
    assert results_to_json(got) == results_to_json(want)  # JSON: NaN -> None
    assert results_to_json(want)["all_ap"] == 1.0


def test_comment_line_in_a_prediction_list_is_a_clear_error(tmp_path):
    # the official read_instance_prediction_file stops on such a line as well
    gt_dir, pred_dir = make_set(tmp_path, with_second_pred=True)
    path = os.path.join(pred_dir, "scene0001_00.txt")
    with open(path, "w") as f:
        f.write("# predictions of scene0001_00\n")
    with pytest.raises(
        BenchmarkFormatError, match=r"scene0001_00\.txt line 1: comment line .*delete it"
    ):
        evaluate_dirs(gt_dir, pred_dir, progress=False)


def test_all_gt_instances_below_the_minimum_gives_a_note(tmp_path, capsys):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    gt = np.zeros(N, np.int64)
    gt[:60], gt[60:150] = CHAIR * 1000 + 1, TABLE * 1000 + 2  # 60 and 90 vertices
    write_gt_ids(gt_dir / "scene0000_00.txt", gt)
    write_prediction(str(pred_dir), "scene0000_00", gt[None] > 0, [CHAIR], [0.9])
    with pytest.warns(
        UserWarning,
        match=r"all 2 GT instance\(s\) have fewer than 100 "
        r"vertices \(largest 90\)",
    ):
        results, _ = evaluate_dirs(str(gt_dir), str(pred_dir), progress=False)
    assert np.isnan(results["all_ap"])
    # no note when an instance counts
    gt[:200] = CHAIR * 1000 + 1
    write_gt_ids(gt_dir / "scene0000_00.txt", gt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate_dirs(str(gt_dir), str(pred_dir), progress=False)


def test_nonzero_mask_values_and_infinite_confidences_like_the_benchmark(tmp_path):
    """The official script reads a mask as ``load_ids(...) != 0`` (any non-zero integer is
    set) and ranks ``float(conf)`` with ``np.argsort``, so +-inf confidences are valid;
    NaN makes its ranking ill-defined, so it stays an error that says so."""
    gt_dir, pred_dir = make_set(tmp_path, with_second_pred=True)
    scene = os.path.join(pred_dir, "scene0000_00.txt")
    mask0 = os.path.join(pred_dir, "predicted_masks", "scene0000_00_000.txt")
    vals = np.zeros(N, np.int64)
    vals[:100], vals[100:200] = 2, -1  # the perfect chair mask, written as 2 / -1
    open(mask0, "w").write("".join(f"{v}\n" for v in vals))
    fp = np.zeros(N, np.int64)
    fp[250:400] = 7  # a chair on the table: a false positive
    open(os.path.join(pred_dir, "predicted_masks", "fp.txt"), "w").write(
        "".join(f"{v}\n" for v in fp)
    )
    lines = open(scene).read().replace(" 0.9\n", " -inf\n", 1)
    open(scene, "w").write(lines + "predicted_masks/fp.txt 5 inf\n")
    res, _ = evaluate_dirs(gt_dir, pred_dir, progress=False)
    # hand-worked chair: sorted scores [-inf TP, inf FP], one missed chair (scene 1):
    # thresholds -inf (P=.5, R=.5), inf (P=0, R=0), then (1, 0): AP = .5*.25 + 0*.25 = .125
    assert res["classes"]["chair"]["ap"] == pytest.approx(0.125)
    assert res["classes"]["table"]["ap"] == pytest.approx(1.0)
    assert res["all_ap"] == pytest.approx((0.125 + 1.0) / 2)

    if HAVE_REF:
        spec = importlib.util.spec_from_file_location(
            "crosscheck_official_eval", os.path.join(ROOT, "scripts", "crosscheck_official_eval.py")
        )
        cc = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(cc)
        official, crashes = cc.official_ap(cc.load_official(REF), gt_dir, pred_dir)
        ap = load_dirs(gt_dir, pred_dir, progress=False)[0].compute_ap_matrix()
        assert crashes == 0
        np.testing.assert_array_equal(np.isnan(official), np.isnan(ap))
        np.testing.assert_allclose(np.nan_to_num(official), np.nan_to_num(ap), atol=1e-12)

    open(scene, "w").write(lines.replace(" -inf\n", " nan\n", 1))
    with pytest.raises(BenchmarkFormatError, match="NaN.*ill-defined"):
        evaluate_dirs(gt_dir, pred_dir, progress=False)

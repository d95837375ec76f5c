"""Dev tool: cross-check dknet_jax's ScanNet instance AP against the official script.

Generates random GT / prediction file sets that stress every rule of the protocol
(several scenes, many classes, overlapping and duplicate masks, void area, GT and
predictions around the 100-vertex minimum, IoU and void-share exactly at thresholds,
confidence ties, a mask listed twice, scenes without a prediction file, empty
prediction files), runs the benchmark's own ``evaluate_semantic_instance.py`` (imported
from --ref, its full-precision AP matrix, not the rounded printout) and
``dknet_jax.eval.load_dirs``, and asserts equal AP per class and threshold and equal means
to 1e-6.

Where the official script crashes on an "empty curve" it is rerun per class and threshold
and the crashing cells are expected to be 0 (the project's documented guard).

    python scripts/crosscheck_official_eval.py --ref /path/to/scannet_official_eval --trials 200
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import tempfile
import warnings

import numpy as np

from dknet_jax.eval import load_dirs
from dknet_jax.eval.scannet_instance import CLASS_IDS, OVERLAPS, summarize


def _load_file(name: str, path: str, register: bool = True):
    """Execute the module at ``path`` as ``name`` (registered in ``sys.modules`` so the
    official code's ``import util`` / ``import util_3d`` find it without a path search)."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    if register:
        sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def load_official(ref: str):
    """Imports the official module (its argparse needs argv; stubs only if deps are absent).

    Its helper modules (``util``, ``util_3d``, and the ``imageio`` / ``plyfile`` stubs when
    those packages are missing) are loaded from their files and registered by name first,
    so no search path is added; they are unregistered afterwards, and ``sys.argv`` and the
    ``sys.path`` entry the official script inserts for itself are restored, so nothing
    else is shadowed.
    """
    bench = os.path.join(ref, "BenchmarkScripts")
    script = os.path.join(bench, "3d_evaluation", "evaluate_semantic_instance.py")
    if not os.path.isfile(script):
        raise FileNotFoundError(
            f"{script} not found; --ref must be the scannet_official_eval folder"
        )
    saved_path, saved_argv, saved_mods = list(sys.path), sys.argv, set(sys.modules)
    sys.argv = ["evaluate_semantic_instance.py", "--pred_path", ".", "--gt_path", "."]
    try:
        for dep in ("imageio", "plyfile"):
            if importlib.util.find_spec(dep) is None:
                _load_file(dep, os.path.join(ref, "_stubs", f"{dep}.py"))
        _load_file("util", os.path.join(bench, "util.py"))
        _load_file("util_3d", os.path.join(bench, "util_3d.py"))
        mod = _load_file("official_scannet_eval", script, register=False)
    finally:
        sys.path[:], sys.argv = saved_path, saved_argv  # the official script inserts its dir
        for name in ("util", "util_3d", "imageio", "plyfile"):
            if name not in saved_mods:
                sys.modules.pop(name, None)
    return mod


def official_ap(mod, gt_dir: str, pred_dir: str) -> tuple[np.ndarray, int]:
    """(f64[18, 10] AP from the official code, number of crashing cells)."""
    names = sorted(f for f in os.listdir(pred_dir) if f.endswith(".txt"))
    matches = {}
    for n in names:
        gt2pred, pred2gt = mod.assign_instances_for_scan(
            os.path.join(pred_dir, n), os.path.join(gt_dir, n), pred_dir
        )
        matches[os.path.abspath(os.path.join(gt_dir, n))] = {"gt": gt2pred, "pred": pred2gt}
    try:
        return mod.evaluate_matches(matches)[0], 0
    except IndexError:  # empty curve somewhere: evaluate cell by cell
        pass
    labels, overlaps = mod.CLASS_LABELS, mod.opt.overlaps
    ap = np.zeros((len(labels), len(overlaps)))
    crashes = 0
    try:
        for li, lab in enumerate(labels):
            mod.CLASS_LABELS = [lab]
            for oi, th in enumerate(overlaps):
                mod.opt.overlaps = np.array([th])
                try:
                    ap[li, oi] = mod.evaluate_matches(matches)[0, 0, 0]
                except IndexError:
                    ap[li, oi] = 0.0
                    crashes += 1
    finally:
        mod.CLASS_LABELS, mod.opt.overlaps = labels, overlaps
    return ap, crashes


def _write_ids(path, ids):
    with open(path, "w") as f:
        f.write("\n".join(str(int(v)) for v in ids) + "\n")


def make_trial(rng: np.random.Generator, root: str) -> None:
    """Writes <root>/gt and <root>/pred for one random trial."""
    gt_dir, pred_dir = os.path.join(root, "gt"), os.path.join(root, "pred")
    os.makedirs(gt_dir)
    os.makedirs(os.path.join(pred_dir, "masks"))
    classes = rng.choice(CLASS_IDS, size=rng.integers(2, 10), replace=False)
    num_scenes = int(rng.integers(1, 5))
    conf_pool = np.array([0.25, 0.5, 0.75])
    for s in range(num_scenes):
        scene = f"scene{s:04d}_00"
        n = int(rng.integers(600, 2500))
        gt = np.zeros(n, dtype=np.int64)
        perm = rng.permutation(n)
        pos, inst = 0, 1
        gts = []  # (vertex indices, label)
        while pos < n:
            size = int(
                rng.choice(
                    [
                        rng.integers(20, 99),
                        99,
                        100,
                        101,
                        rng.integers(100, 400),
                        rng.integers(100, 400),
                    ]
                )
            )
            idx = perm[pos : pos + size]
            pos += size
            kind = rng.random()
            if kind < 0.55:
                lab = int(rng.choice(classes))
                gt[idx] = lab * 1000 + inst
                gts.append((idx, lab))
                inst += 1
            elif kind < 0.65:  # labelled without instance: the script sees id lab*1000
                lab = int(rng.choice(classes))
                gt[idx] = lab * 1000
                gts.append((idx, lab))
            elif kind < 0.8:
                gt[idx] = 0  # unannotated
            else:  # non-instance classes (wall, floor, blinds, otherprop) are void
                lab = int(rng.choice([1, 2, 13, 40]))
                gt[idx] = lab * 1000 + (inst if rng.random() < 0.5 else 0)
                inst += 1
        _write_ids(os.path.join(gt_dir, scene + ".txt"), gt)
        r = rng.random()
        if r < 0.1:
            continue  # no prediction file
        lines = []
        num_pred = 0 if r < 0.15 else int(rng.integers(1, 25))
        void_idx = np.flatnonzero(~np.isin(gt // 1000, CLASS_IDS))
        for k in range(num_pred):
            mask = np.zeros(n, dtype=bool)
            idx, lab = gts[int(rng.integers(len(gts)))] if gts else (perm[:150], int(classes[0]))
            mode = rng.random()
            if mode < 0.35:  # noisy copy
                keep = idx[rng.random(idx.size) < rng.uniform(0.5, 1.0)]
                mask[keep] = True
                mask[rng.integers(0, n, size=int(rng.integers(0, idx.size + 1)))] = True
            elif mode < 0.5 and idx.size >= 2:  # exact IoU at a threshold
                th = float(rng.choice([0.5, 0.25, 0.75, 0.6, 0.8]))
                take = int(round(th * idx.size))
                if abs(take / idx.size - th) < 1e-12:
                    mask[idx[:take]] = True
                else:
                    mask[idx] = True
            elif mode < 0.65:  # part on void area (share exactly 1/2 or 1/4 sometimes)
                m = int(rng.integers(50, 200))
                mask[idx[:m]] = True
                frac = float(rng.choice([0.5, 0.25, 0.9]))
                nv = int(round(mask.sum() * frac / (1 - frac)))
                if void_idx.size:
                    mask[rng.choice(void_idx, size=min(nv, void_idx.size), replace=False)] = True
            elif mode < 0.8:  # union of two instances
                idx2, _ = gts[int(rng.integers(len(gts)))] if gts else (idx, lab)
                mask[idx] = True
                mask[idx2[: idx2.size // 2]] = True
            else:  # random blob
                mask[rng.choice(n, size=int(rng.integers(50, 400)), replace=False)] = True
            u = rng.random()
            plab = (
                lab
                if u < 0.7
                else (int(rng.choice(classes)) if u < 0.9 else int(rng.choice([1, 2, 13, 40, 3])))
            )
            conf = float(rng.choice(conf_pool)) if rng.random() < 0.4 else float(rng.random())
            name = f"masks/{scene}_{k:03d}.txt"
            _write_ids(os.path.join(pred_dir, name), mask.astype(np.int64))
            lines.append(f"{name} {plab} {conf!r}")
            if rng.random() < 0.15:  # duplicate prediction in its own file
                name2 = f"masks/{scene}_{k:03d}_dup.txt"
                _write_ids(os.path.join(pred_dir, name2), mask.astype(np.int64))
                c2 = conf if rng.random() < 0.5 else float(rng.random())
                lines.append(f"{name2} {plab} {c2!r}")
        if lines and rng.random() < 0.2:  # a mask path listed twice: the later line wins
            again = lines[int(rng.integers(len(lines)))].split()[0]
            lines.append(f"{again} {int(rng.choice(classes))} {float(rng.random())!r}")
        with open(os.path.join(pred_dir, scene + ".txt"), "w") as f:
            f.write("".join(line + "\n" for line in lines))


def same(a: float, b: float, tol: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= tol


def crosscheck(ref_dir: str, trials: int, seed: int = 0, tol: float = 1e-6) -> dict:
    """Runs ``trials`` random trials; raises AssertionError on the first disagreement.

    Returns counts and the largest absolute difference seen.
    """
    mod = load_official(os.path.abspath(ref_dir))
    rng = np.random.default_rng(seed)
    max_diff, compared, crash_trials, crash_cells, nan_cells, cells, mid_cells = (
        0.0,
        0,
        0,
        0,
        0,
        0,
        0,
    )
    for t in range(trials):
        with tempfile.TemporaryDirectory() as root:
            make_trial(rng, root)
            gt_dir, pred_dir = os.path.join(root, "gt"), os.path.join(root, "pred")
            if not any(f.endswith(".txt") for f in os.listdir(pred_dir)):
                continue
            ref, crashes = official_ap(mod, gt_dir, pred_dir)  # f64[18, 10]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ev, _ = load_dirs(gt_dir, pred_dir, progress=False)
            ours = ev.compute_ap_matrix()
        compared += 1
        crash_trials += crashes > 0
        crash_cells += crashes
        nan_cells += int(np.isnan(ref).sum())
        mid_cells += int(np.sum((ref > 0) & (ref < 1)))
        cells += ref.size
        if not np.array_equal(np.isnan(ref), np.isnan(ours)):
            raise AssertionError(f"trial {t}: NaN pattern differs\nofficial\n{ref}\nours\n{ours}")
        diff = np.nanmax(np.abs(np.nan_to_num(ref - ours)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            ref_avg = mod.compute_averages(ref[None])
        our_avg = summarize(ours)
        pairs = [(ref_avg[k], our_avg[k]) for k in ("all_ap", "all_ap_50%", "all_ap_25%")]
        for name, d in ref_avg["classes"].items():
            pairs += [(d[k], our_avg["classes"][name][k]) for k in ("ap", "ap50%", "ap25%")]
        for a, b in pairs:
            if not same(float(a), float(b), tol):
                raise AssertionError(f"trial {t}: mean differs: official {a} ours {b}")
            if not (math.isnan(a) or math.isnan(b)):
                diff = max(diff, abs(float(a) - float(b)))
        if diff > tol:
            bad = np.argwhere(np.abs(np.nan_to_num(ref - ours)) > tol)
            raise AssertionError(
                f"trial {t}: AP differs by {diff} at (class, overlap) "
                f"{bad[:5].tolist()} with overlaps {OVERLAPS.tolist()}"
            )
        max_diff = max(max_diff, diff)
    return dict(
        trials=trials,
        compared=compared,
        cells=cells,
        nan_cells=nan_cells,
        mid_cells=mid_cells,
        crash_trials=crash_trials,
        crash_cells=crash_cells,
        max_diff=max_diff,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref", required=True, help="folder of the official ScanNet eval scripts")
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tol", type=float, default=1e-6)
    args = ap.parse_args()
    try:
        r = crosscheck(args.ref, args.trials, args.seed, args.tol)
    except (AssertionError, FileNotFoundError) as e:
        sys.exit(f"FAILED: {e}")
    print(
        f"{r['trials']} trials ({r['compared']} with prediction files), {r['cells']} AP "
        f"cells ({r['nan_cells']} NaN, {r['mid_cells']} strictly between 0 and 1); the "
        f"official script crashed on an empty curve in {r['crash_trials']} trials "
        f"({r['crash_cells']} cells, ours 0 there); max |official - ours| = "
        f"{r['max_diff']:.3g}"
    )


if __name__ == "__main__":
    main()

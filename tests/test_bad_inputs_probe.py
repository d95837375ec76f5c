"""The bad-input probes of issue 11, rerun through the real command-line scripts.

About 100 bad or unusual inputs and interruptions (missing and malformed files, empty and
non-finite scans, map coordinates, scans larger than a bucket, wrong config keys and
values, unwritable outputs, corrupt or foreign checkpoints, an output that is an input,
spaces in names, a stopped preparation, a resumed training), each run as a subprocess of
``scripts/*.py``. Every probe checks the same contract:

- a user error exits 2 with one short ``error:`` line that names the thing (no traceback);
  a usable input exits 0 with the result checked;
- no input file is modified (every input is hashed before and after);
- no partial output is left (no temp files, no output folder or file from a failed start).

argparse's own errors (a bad or missing argument) keep argparse's format: the usage and
``<script>: error: ...``, exit 2. The whole module is ``slow`` (about 20 minutes on 2 busy
cores: 150 interpreter starts, a few trainings and compilations); the behaviours it checks
are unit-tested in the fast suite (test_cli_errors, test_predict, test_prepare, ...).
``DKNET_PROBE_TABLE=<file>`` appends one JSON line per probe (name, script, exit status,
outcome, first error or warning line) for a summary.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import pytest

from tests.test_checkpoint import _corrupt
from tests.test_cli_errors import ROOT, TINY, run
from tests.test_predict import _random_state, _tiny_config, _write_mesh_ply
from tests.test_prepare_interrupt import _alive, _descendants

# --- the harness -----------------------------------------------------------------------


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _digest(paths) -> dict[str, str]:
    """sha256 of every file under ``paths`` (files or folders)."""
    out = {}
    for p in map(str, paths):
        if os.path.isdir(p):
            for d, _, files in os.walk(p):
                for f in files:
                    out[os.path.join(d, f)] = _sha(os.path.join(d, f))
        elif os.path.isfile(p):
            out[p] = _sha(p)
    return out


def _temp_files(paths) -> list[str]:
    """Leftovers of an interrupted atomic write (``.<name>.<random>.tmp``) under ``paths``."""
    found = []
    for p in map(str, paths):
        for d, _, files in os.walk(p):
            found += [os.path.join(d, f) for f in files if f.endswith(".tmp")]
    return found


def _record(name: str, script: str, r: subprocess.CompletedProcess, outcome: str) -> None:
    table = os.environ.get("DKNET_PROBE_TABLE")
    if table:
        first = next(
            (ln for ln in r.stderr.splitlines() if _ERROR.match(ln)),
            next((ln for ln in r.stderr.splitlines() if "warning" in ln.lower()), ""),
        )
        with open(table, "a") as f:
            f.write(
                json.dumps(
                    {
                        "probe": name,
                        "script": script,
                        "rc": r.returncode,
                        "outcome": outcome,
                        "stderr": first[:200],
                    }
                )
                + "\n"
            )


MAX_ERROR_LINES = 4  # "short": the error line plus at most a few warnings before it
MAX_USAGE_LINES = 8  # argparse: its usage (a few lines) and the error
_ERROR = re.compile(r"^(?:[\w.]+\.py: )?error: ")  # ours, or argparse's "<prog>: error: "


def probe(
    script: str,
    *args: str,
    rc: int = 2,
    says=(),
    inputs=(),
    absent=(),
    clean=(),
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """Run ``scripts/<script> args``; check the exit status ``rc``, that the error line (or,
    for rc != 2, stdout + stderr) names every string in ``says``, that no file under
    ``inputs`` changed or vanished, that no path in ``absent`` exists afterwards and that
    no temp file is left under ``clean``."""
    before = _digest(inputs)
    r = run(script, *args, env=env)
    name = os.environ.get("PYTEST_CURRENT_TEST", "?").split("::")[-1].split(" ")[0]
    outcome = {0: "result", 2: "clear error"}.get(r.returncode, f"exit {r.returncode}")
    if r.returncode == 0 and "warning" in r.stderr.lower() + r.stdout.lower():
        outcome = "result + warning"
    _record(name, script, r, outcome)
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.returncode == rc, (r.returncode, r.stdout[-1500:], r.stderr[-3000:])
    if rc == 2:
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        errors = [ln for ln in lines if _ERROR.match(ln)]
        assert len(errors) == 1, r.stderr[-3000:]
        usage = lines[0].startswith("usage:")
        assert len(lines) <= (MAX_USAGE_LINES if usage else MAX_ERROR_LINES), r.stderr[-3000:]
        text = errors[0]
    else:
        text = r.stdout + r.stderr
    for s in says:
        assert str(s) in text, (s, text[-3000:])
    after = _digest(inputs)
    changed = sorted(p for p, h in before.items() if after.get(p) != h)
    assert not changed, f"inputs modified or removed: {changed}"
    for p in absent:
        assert not os.path.exists(p), f"{p} was left behind"
    assert not _temp_files(clean), _temp_files(clean)
    return r


@dataclass
class World:
    """Shared read-only inputs (every probe hashes them before and after)."""

    raw: str  # raw ScanNet layout, 3 tiny rooms (2 train, 1 val)
    s3raw: str  # raw S3DIS layout, 2 tiny rooms (Area_1 train, Area_5 val)
    prep: str  # `raw` prepared
    ckpt: str  # a tiny DKNet checkpoint (random weights, test_predict's config)
    other: str  # a checkpoint of another config (other widths)
    mesh: str  # a tiny synthetic room as a mesh PLY (ScanNet-like name)
    txt: str  # the same room as `x y z r g b` text rows

    @property
    def all(self):
        return [self.raw, self.s3raw, self.prep, self.ckpt, self.other, self.mesh, self.txt]


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    from dknet_jax.checkpoint import Checkpoints
    from dknet_jax.data.scannet import prepare_scannet
    from dknet_jax.synthetic import generate_scene, make_dataset

    base = tmp_path_factory.mktemp("probe_world")
    make_dataset(
        str(base / "raw"),
        scenes=3,
        seed=3,
        format="scannet",
        size="tiny",
        val_fraction=0.34,
        progress=False,
    )
    make_dataset(
        str(base / "s3raw"),
        scenes=2,
        seed=3,
        format="s3dis",
        size="tiny",
        val_fraction=0.5,
        progress=False,
    )
    prepare_scannet(str(base / "raw"), str(base / "prep"), progress=False, workers=1)
    for name, widths in (("ckpt", None), ("other", (8, 24))):
        config = _tiny_config()
        if widths:
            config.model.widths = widths
        ck = Checkpoints(str(base / name))
        ck.save(
            3,
            _random_state(config),
            {"step": 3, "data": None, "best": None, "config": config.to_json_best_effort()},
        )
        ck.close()
    scene = generate_scene(np.random.default_rng(0), "tiny")
    scans = base / "scans"
    scans.mkdir()
    _write_mesh_ply(str(scans / "scene0707_00.ply"), scene)
    _write_txt(scans / "room.txt", scene.vertices, scene.colors)
    return World(
        str(base / "raw"),
        str(base / "s3raw"),
        str(base / "prep"),
        str(base / "ckpt"),
        str(base / "other"),
        str(scans / "scene0707_00.ply"),
        str(scans / "room.txt"),
    )


def _write_txt(path, xyz, rgb=None, fmt="%.6f"):
    cols = [xyz] if rgb is None else [xyz, rgb]
    np.savetxt(str(path), np.concatenate(cols, 1), fmt=fmt)


def _copy(src, dst) -> str:
    (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, dst)
    return str(dst)


CASES: dict[str, tuple] = {}


def case(slow: bool = False):
    def deco(f):
        CASES[f.__name__] = (f, slow)
        return f

    return deco


# --- scripts/train.py ------------------------------------------------------------------


def _train_error(w, tmp_path, *overrides, says=(), root=None):
    work = tmp_path / "work"
    root = w.prep if root is None else root
    probe(
        "train.py",
        TINY,
        f"--config.data.root={root}",
        *overrides,
        f"--workdir={work}",
        says=says,
        inputs=w.all + [root],
        absent=[work],
    )


@case()
def train_unknown_key(w, tmp_path):
    _train_error(w, tmp_path, "--config.model.candidate=nms", says=["'candidate'"])


@case()
def train_unknown_section(w, tmp_path):
    _train_error(w, tmp_path, "--config.modle.widths=(8,16)", says=["'modle'"])


@case()
def train_bad_enum(w, tmp_path):
    _train_error(w, tmp_path, "--config.model.candidates=foo", says=["candidates", "foo"])


@case()
def train_negative_lr(w, tmp_path):
    _train_error(w, tmp_path, "--config.train.lr=-1", says=["config.train.lr"])


@case()
def train_lr_not_a_number(w, tmp_path):
    _train_error(w, tmp_path, "--config.train.lr=abc", says=["--config.train.lr", "abc"])


@case()
def train_lr_nan(w, tmp_path):
    _train_error(w, tmp_path, "--config.train.lr=nan", says=["config.train.lr"])


@case()
def train_zero_batch(w, tmp_path):
    _train_error(w, tmp_path, "--config.data.batch_size=0", says=["batch_size"])


@case()
def train_batch_size_float(w, tmp_path):
    _train_error(w, tmp_path, "--config.data.batch_size=2.5", says=["batch_size"])


@case()
def train_missing_workdir_flag(w, tmp_path):
    probe("train.py", TINY, f"--config.data.root={w.prep}", says=["--workdir"], inputs=w.all)


@case()
def train_missing_config_file(w, tmp_path):
    probe(
        "train.py",
        "--config=configs/nosuch.py",
        f"--workdir={tmp_path / 'work'}",
        says=["configs/nosuch.py"],
        inputs=w.all,
        absent=[tmp_path / "work"],
    )


@case()
def train_unknown_flag(w, tmp_path):
    _train_error(w, tmp_path, "--epochs=3", says=["epochs"])


@case()
def train_extra_argument(w, tmp_path):
    _train_error(w, tmp_path, "extra", says=["extra"])


@case()
def train_missing_data_root(w, tmp_path):
    _train_error(w, tmp_path, says=["does not exist"], root=tmp_path / "nope")


@case()
def train_data_root_is_a_file(w, tmp_path):
    _train_error(w, tmp_path, says=["room.txt"], root=w.txt)


@case()
def train_empty_train_split(w, tmp_path):
    root = tmp_path / "prep"
    _copy(w.prep, root)
    (root / "train.txt").write_text("")
    _train_error(w, tmp_path, says=["'train'", "empty"], root=root)


@case()
def train_no_train_list(w, tmp_path):
    root = tmp_path / "prep"
    _copy(w.prep, root)
    (root / "train.txt").unlink()
    _train_error(w, tmp_path, says=["'train'"], root=root)


@case()
def train_split_names_missing_scene(w, tmp_path):
    root = tmp_path / "prep"
    _copy(w.prep, root)
    (root / "train.txt").write_text("scene0000_00\nscene9999_00\n")
    _train_error(w, tmp_path, says=["scene9999_00"], root=root)


@case()
def train_split_binary(w, tmp_path):
    root = tmp_path / "prep"
    _copy(w.prep, root)
    (root / "train.txt").write_bytes(bytes(range(128, 256)))
    _train_error(w, tmp_path, says=["train.txt"], root=root)


@case()
def train_truncated_scene(w, tmp_path):
    root = tmp_path / "prep"
    _copy(w.prep, root)
    f = root / "scene0000_00.npz"
    f.write_bytes(f.read_bytes()[:100])
    _train_error(w, tmp_path, says=["scene0000_00"], root=root)


@case()
def train_scene_with_nan(w, tmp_path):
    root = tmp_path / "prep"
    _copy(w.prep, root)
    f = root / "scene0000_00.npz"
    d = dict(np.load(f))
    d["xyz"] = d["xyz"].copy()
    d["xyz"][5] = np.nan
    np.savez(f, **d)
    _train_error(w, tmp_path, says=["scene0000_00"], root=root)


@case()
def train_workdir_is_a_file(w, tmp_path):
    probe(
        "train.py",
        TINY,
        f"--config.data.root={w.prep}",
        f"--workdir={w.txt}",
        says=["--workdir", w.txt, "is a file"],
        inputs=w.all,
    )


@case()
def train_workdir_of_another_config(w, tmp_path):
    """Resuming into a work dir whose checkpoint has other shapes names the mismatch."""
    work = _copy(w.other, tmp_path / "work")
    probe(
        "train.py",
        TINY,
        f"--config.data.root={w.prep}",
        f"--workdir={work}",
        says=["does not match", "checkpoints/3"],
        inputs=w.all + [work],
    )


def _trained(tmp_path, w, epochs=2):
    work = tmp_path / "work"
    probe(
        "train.py",
        TINY,
        f"--config.data.root={w.prep}",
        "--config.data.augment=False",
        f"--config.train.epochs={epochs}",
        f"--workdir={work}",
        rc=0,
        inputs=w.all,
        clean=[work],
    )
    return work


def _metric_steps(work):
    rows = [json.loads(ln) for ln in open(work / "metrics.jsonl") if ln.strip()]
    return [r["step"] for r in rows if "step" in r]


@case(slow=True)
def train_then_resume(w, tmp_path):
    work = _trained(tmp_path, w)
    probe(
        "train.py",
        TINY,
        f"--config.data.root={w.prep}",
        "--config.data.augment=False",
        "--config.train.epochs=3",
        f"--workdir={work}",
        rc=0,
        says=["3"],
        inputs=w.all,
        clean=[work],
    )
    steps = _metric_steps(work)
    assert steps == sorted(steps) and max(steps) == 3, steps
    assert (work / "checkpoints" / "3").is_dir()


@case(slow=True)
def train_resume_past_corrupt_latest(w, tmp_path):
    work = _trained(tmp_path, w)
    _corrupt(work / "checkpoints" / "2")
    r = probe(
        "train.py",
        TINY,
        f"--config.data.root={w.prep}",
        "--config.data.augment=False",
        "--config.train.epochs=3",
        f"--workdir={work}",
        rc=0,
        says=["corrupt"],
        inputs=w.all,
        clean=[work],
    )
    assert "checkpoints/2" in r.stdout + r.stderr
    assert (work / "checkpoints" / "3").is_dir()
    steps = _metric_steps(work)
    assert steps == sorted(steps), steps


@case(slow=True)
def train_empty_val_split_warns(w, tmp_path):
    root = tmp_path / "prep"
    _copy(w.prep, root)
    (root / "val.txt").write_text("")
    work = tmp_path / "work"
    probe(
        "train.py",
        TINY,
        f"--config.data.root={root}",
        "--config.data.augment=False",
        f"--workdir={work}",
        rc=0,
        says=["'val'", "best"],
        inputs=w.all,
        clean=[work],
    )


# --- scripts/evaluate.py ---------------------------------------------------------------


def _evaluate(w, tmp_path, *args, rc=2, says=(), ckpt=None, root=None, extra_inputs=()):
    ckpt = w.ckpt if ckpt is None else ckpt
    root = w.prep if root is None else root
    return probe(
        "evaluate.py",
        TINY,
        f"--config.data.root={root}",
        f"--checkpoint={ckpt}",
        *args,
        rc=rc,
        says=says,
        inputs=w.all + [root, ckpt, *extra_inputs],
    )


@case()
def evaluate_missing_checkpoint(w, tmp_path):
    _evaluate(w, tmp_path, says=["no_run"], ckpt=tmp_path / "no_run")


@case()
def evaluate_checkpoint_is_a_file(w, tmp_path):
    _evaluate(w, tmp_path, says=[w.txt], ckpt=w.txt)


@case()
def evaluate_empty_workdir(w, tmp_path):
    (tmp_path / "empty").mkdir()
    _evaluate(w, tmp_path, says=["empty"], ckpt=tmp_path / "empty")


@case()
def evaluate_missing_split(w, tmp_path):
    _evaluate(w, tmp_path, "--split=nosuch", says=["'nosuch'"])


@case()
def evaluate_missing_data_root(w, tmp_path):
    _evaluate(w, tmp_path, says=["does not exist"], root=tmp_path / "nope")


@case()
def evaluate_another_config(w, tmp_path):
    _evaluate(
        w, tmp_path, "--split=val", f"--out={tmp_path / 'o'}", says=["does not match"], ckpt=w.other
    )
    assert not (tmp_path / "o").exists()


@case()
def evaluate_corrupt_checkpoint(w, tmp_path):
    ckpt = _copy(w.ckpt, tmp_path / "ck")
    _corrupt(tmp_path / "ck" / "checkpoints" / "3")
    r = _evaluate(w, tmp_path, "--split=val", says=["corrupt"], ckpt=ckpt)
    assert "does not match" not in r.stderr


@case()
def evaluate_best_without_best(w, tmp_path):
    _evaluate(w, tmp_path, "--split=val", "--best", says=["best"])


@case()
def evaluate_out_is_a_file(w, tmp_path):
    out = tmp_path / "o.txt"
    out.write_text("x")
    _evaluate(
        w,
        tmp_path,
        "--split=val",
        f"--out={out}",
        says=["--out", str(out), "is a file"],
        extra_inputs=[out],
    )


@case()
def evaluate_bad_config_value(w, tmp_path):
    _evaluate(w, tmp_path, "--config.test.score_threshold=abc", says=["score_threshold"])


@case(slow=True)
def evaluate_runs(w, tmp_path):
    out = tmp_path / "eval"
    _evaluate(w, tmp_path, "--split=val", f"--out={out}", rc=0)
    assert (out / "results.json").is_file() or list(out.glob("*.json")), os.listdir(out)
    assert not _temp_files([out])


# --- scripts/predict.py ----------------------------------------------------------------


def _predict(
    w, tmp_path, inp, *args, rc=2, says=(), ckpt=None, out=None, absent=None, extra_inputs=()
):
    out = tmp_path / "out" if out is None else out
    absent = [out] if absent is None and rc == 2 else (absent or [])
    return probe(
        "predict.py",
        f"--checkpoint={w.ckpt if ckpt is None else ckpt}",
        f"--input={inp}",
        f"--out={out}",
        *args,
        rc=rc,
        says=says,
        inputs=w.all + [inp, *extra_inputs],
        absent=absent,
        clean=[out],
    )


def _bad_scan(tmp_path, name, content: bytes | str):
    p = tmp_path / name
    (p.write_bytes if isinstance(content, bytes) else p.write_text)(content)
    return p


def _predict_bad_scan(w, tmp_path, name, content, says=None):
    p = _bad_scan(tmp_path, name, content)
    # the output folder is created before the scan is read (its check comes first), but
    # nothing may be written into it
    r = _predict(w, tmp_path, p, says=[name] if says is None else says, absent=[])
    out = tmp_path / "out"
    assert not out.exists() or not os.listdir(out), os.listdir(out)
    return r


@case()
def predict_missing_input(w, tmp_path):
    _predict(w, tmp_path, tmp_path / "nope.ply", says=["nope.ply"], absent=[])


@case()
def predict_input_is_a_folder(w, tmp_path):
    (tmp_path / "scan.ply").mkdir()
    _predict(w, tmp_path, tmp_path / "scan.ply", says=["scan.ply", "is a folder"], absent=[])


@case()
def predict_unknown_extension(w, tmp_path):
    _predict_bad_scan(w, tmp_path, "scan.las", b"LASF" + bytes(200))


@case()
def predict_empty_ply(w, tmp_path):
    _predict_bad_scan(
        w,
        tmp_path,
        "e.ply",
        "ply\nformat ascii 1.0\nelement vertex 0\n"
        "property float x\nproperty float y\nproperty float z\nend_header\n",
    )


@case()
def predict_ply_without_xyz(w, tmp_path):
    _predict_bad_scan(
        w,
        tmp_path,
        "n.ply",
        "ply\nformat ascii 1.0\nelement vertex 2\n"
        "property float a\nproperty float b\nend_header\n1 2\n3 4\n",
    )


@case()
def predict_truncated_ply(w, tmp_path):
    data = open(w.mesh, "rb").read()
    _predict_bad_scan(w, tmp_path, "t.ply", data[: len(data) // 2])


@case()
def predict_junk_ply(w, tmp_path):
    _predict_bad_scan(w, tmp_path, "j.ply", bytes(range(256)) * 8)


@case()
def predict_ply_header_only(w, tmp_path):
    _predict_bad_scan(w, tmp_path, "h.ply", "ply\nformat ascii 1.0\n")


@case()
def predict_nan_ply(w, tmp_path):
    from dknet_jax.data.ply import write_ply

    xyz = np.random.default_rng(0).uniform(0, 3, (200, 3)).astype(np.float32)
    xyz[7, 1] = np.nan
    write_ply(str(tmp_path / "nan.ply"), {"x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2]})
    _predict(w, tmp_path, tmp_path / "nan.ply", says=["nan.ply"], absent=[])


@case(slow=True)
def predict_inf_txt(w, tmp_path):
    """A text row with inf is a malformed row: skipped with a warning naming the line."""
    p = _bad_scan(tmp_path, "inf.txt", "0 0 0\n1 inf 1\n2 2 2\n" * 20)
    _predict(w, tmp_path, p, "--superpoints=none", rc=0, says=["inf.txt:2"])
    _check_prediction(tmp_path / "out", "inf", "inf", 40)


@case()
def predict_empty_txt(w, tmp_path):
    _predict_bad_scan(w, tmp_path, "empty.txt", "")


@case()
def predict_txt_two_columns(w, tmp_path):
    _predict_bad_scan(w, tmp_path, "two.txt", "0 0\n1 1\n2 2\n")


@case()
def predict_txt_all_rows_bad(w, tmp_path):
    _predict_bad_scan(w, tmp_path, "words.txt", "x y z\nhello world again\n")


@case()
def predict_txt_binary(w, tmp_path):
    _predict_bad_scan(w, tmp_path, "bin.txt", bytes(range(256)) * 8)


@case()
def predict_npz_without_xyz(w, tmp_path):
    np.savez(tmp_path / "a.npz", points=np.zeros((10, 3)))
    _predict(w, tmp_path, tmp_path / "a.npz", says=["a.npz"], absent=[])


@case()
def predict_npz_wrong_shape(w, tmp_path):
    np.savez(tmp_path / "b.npz", xyz=np.zeros((10, 2)))
    _predict(w, tmp_path, tmp_path / "b.npz", says=["b.npz"], absent=[])


@case()
def predict_npz_corrupt(w, tmp_path):
    _predict_bad_scan(w, tmp_path, "c.npz", b"PK\x03\x04" + b"\0" * 50)


@case()
def predict_missing_checkpoint(w, tmp_path):
    _predict(w, tmp_path, w.mesh, says=["no_run"], ckpt=tmp_path / "no_run", absent=[])


@case()
def predict_corrupt_checkpoint(w, tmp_path):
    ckpt = _copy(w.ckpt, tmp_path / "ck")
    _corrupt(tmp_path / "ck" / "checkpoints" / "3")
    r = _predict(w, tmp_path, w.mesh, says=["corrupt"], ckpt=ckpt, absent=[], extra_inputs=[ckpt])
    assert "does not match" not in r.stderr


@case()
def predict_checkpoint_meta_corrupt(w, tmp_path):
    ckpt = _copy(w.ckpt, tmp_path / "ck")
    for f in (tmp_path / "ck" / "checkpoints" / "3").rglob("*"):
        if f.is_file() and "meta" in str(f.relative_to(tmp_path / "ck" / "checkpoints")):
            f.write_bytes(b"{")
    _predict(w, tmp_path, w.mesh, says=["checkpoint"], ckpt=ckpt, absent=[], extra_inputs=[ckpt])


@case()
def predict_checkpoint_of_another_config(w, tmp_path):
    """The other checkpoint's own saved config loads it; forcing the tiny config on it is
    the mismatch."""
    _predict(w, tmp_path, w.mesh, TINY, says=["does not match"], ckpt=w.other, absent=[])


@case()
def predict_out_is_a_file(w, tmp_path):
    out = tmp_path / "o.txt"
    out.write_text("x")
    _predict(w, tmp_path, w.mesh, says=["is a file"], out=out, absent=[], extra_inputs=[out])


@case()
def predict_out_is_the_input(w, tmp_path):
    inp = _copy(w.txt, tmp_path / "room.txt")
    _predict(w, tmp_path, inp, says=["room.txt"], out=inp, absent=[])


@case()
def predict_out_under_a_file(w, tmp_path):
    (tmp_path / "f").write_text("x")
    _predict(
        w,
        tmp_path,
        w.mesh,
        says=["cannot create"],
        out=tmp_path / "f" / "o",
        absent=[tmp_path / "f" / "o"],
        extra_inputs=[tmp_path / "f"],
    )


@case()
def predict_out_read_only(w, tmp_path):
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        pytest.skip("root can write to a read-only folder")
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        _predict(w, tmp_path, w.mesh, says=["not writable"], out=out, absent=[])
    finally:
        out.chmod(0o700)


@case()
def predict_bad_scene_id(w, tmp_path):
    _predict(w, tmp_path, w.mesh, "--scene_id=bad id", says=["bad id"], absent=[])


@case()
def predict_bad_superpoints_enum(w, tmp_path):
    _predict(w, tmp_path, w.mesh, "--superpoints=mesh", says=["superpoints"])


@case()
def predict_unknown_config_key(w, tmp_path):
    _predict(w, tmp_path, w.mesh, TINY, "--config.test.treshold=0.3", says=["treshold"])


@case()
def predict_missing_flag(w, tmp_path):
    probe("predict.py", f"--checkpoint={w.ckpt}", f"--input={w.mesh}", says=["--out"], inputs=w.all)


@case()
def predict_scan_larger_than_the_bucket(w, tmp_path):
    xyz = np.random.default_rng(1).uniform(0, 4, (9000, 3))
    _write_txt(tmp_path / "big.txt", xyz)
    _predict(w, tmp_path, tmp_path / "big.txt", says=["--subsample"], absent=[])


@case()
def predict_out_would_overwrite_input(w, tmp_path):
    """Item 1: the submission list <out>/<scene id>.txt would replace the input scan."""
    inp = _copy(w.txt, tmp_path / "room.txt")
    _predict(w, tmp_path, inp, says=["room.txt"], out=tmp_path, absent=[])
    assert sorted(os.listdir(tmp_path)) == ["room.txt"], os.listdir(tmp_path)


@case()
def predict_scene_id_clash_with_input(w, tmp_path):
    inp = _copy(w.mesh, tmp_path / "scan.ply")
    # the instance PLY name cannot clash, but the submission list of --scene_id=scan does not
    # either (.txt): a .txt input named like the scene id does
    txt = _copy(w.txt, tmp_path / "scene0001_00.txt")
    _predict(
        w,
        tmp_path,
        txt,
        "--scene_id=scene0001_00",
        says=["scene0001_00.txt"],
        out=tmp_path,
        absent=[],
        extra_inputs=[inp],
    )


def _check_prediction(out, scene_id, stem, n):
    from dknet_jax import eval as E

    summary = json.load(open(out / f"{stem}_summary.json"))
    assert summary["scene"]["points"] == n
    lines = (out / f"{scene_id}.txt").read_text().splitlines()
    for ln in lines:
        assert len(ln.split()) == 3, ln
    E.read_prediction(str(out / f"{scene_id}.txt"), str(out), n)
    assert (out / f"{stem}_instances.ply").is_file()
    assert not _temp_files([out])
    return summary


@case(slow=True)
def predict_mesh_runs(w, tmp_path):
    out = tmp_path / "out"
    _predict(w, tmp_path, w.mesh, rc=0)
    import plyfile

    n = len(plyfile.PlyData.read(w.mesh)["vertex"].data)
    _check_prediction(out, "scene0707_00", "scene0707_00", n)


@case(slow=True)
def predict_spaces_in_names(w, tmp_path):
    inp = _copy(w.txt, tmp_path / "my room 1.txt")
    out = tmp_path / "out dir"
    _predict(w, tmp_path, inp, rc=0, out=out)
    n = len(np.loadtxt(inp))
    _check_prediction(out, "my_room_1", "my room 1", n)


@case(slow=True)
def predict_georeferenced(w, tmp_path):
    from dknet_jax.data.ply import write_ply

    xyz = np.loadtxt(w.txt)[:, :3] + np.array([512345.678, 4123456.789, 250.0])
    write_ply(str(tmp_path / "geo.ply"), {"x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2]})
    out = tmp_path / "out"
    _predict(w, tmp_path, tmp_path / "geo.ply", "--superpoints=none", rc=0)
    summary = _check_prediction(out, "geo", "geo", len(xyz))
    # the whole-metre floor of the bounding-box minimum (dknet_jax/data/readers.py)
    assert summary["scene"]["origin"] == np.floor(xyz.min(0)).tolist(), summary["scene"]
    import plyfile

    v = plyfile.PlyData.read(str(out / "geo_instances.ply"))["vertex"].data
    np.testing.assert_allclose(np.stack([v["x"], v["y"], v["z"]], 1), xyz, atol=1e-6)


@case(slow=True)
def predict_subsample_large_scan(w, tmp_path):
    xyz = np.random.default_rng(1).uniform(0, 4, (9000, 3))
    _write_txt(tmp_path / "big.txt", xyz)
    _predict(w, tmp_path, tmp_path / "big.txt", "--subsample", "--superpoints=none", rc=0)
    _check_prediction(tmp_path / "out", "big", "big", 9000)


@case(slow=True)
def predict_txt_with_bom_comments_and_a_bad_row(w, tmp_path):
    rows = open(w.txt).read().splitlines()
    text = (
        "\ufeff# exported scan\n" + "\n".join(rows[:10] + ["1.0 2.0 oops 1 2 3"] + rows[10:]) + "\n"
    )
    p = _bad_scan(tmp_path, "odd.txt", text)
    _predict(w, tmp_path, p, "--superpoints=none", rc=0)
    _check_prediction(tmp_path / "out", "odd", "odd", len(rows))


@case(slow=True)
def predict_single_point(w, tmp_path):
    p = _bad_scan(tmp_path, "one.txt", "1 2 0.5\n")
    _predict(w, tmp_path, p, "--superpoints=none", rc=0)
    _check_prediction(tmp_path / "out", "one", "one", 1)


@case(slow=True)
def predict_rerun_removes_stale_masks(w, tmp_path):
    out = tmp_path / "out"
    stale = out / "predicted_masks" / "scene0707_00_099.txt"
    stale.parent.mkdir(parents=True)
    stale.write_text("1\n")
    _predict(w, tmp_path, w.mesh, "--superpoints=none", rc=0)
    assert not stale.exists()


# --- scripts/prepare_scannet.py --------------------------------------------------------


def _prep(w, tmp_path, root, *args, rc=2, says=(), out=None, absent=None):
    out = tmp_path / "out" if out is None else out
    absent = [out] if absent is None and rc == 2 else (absent or [])
    return probe(
        "prepare_scannet.py",
        f"--scannet_root={root}",
        f"--out={out}",
        "--workers=1",
        *args,
        rc=rc,
        says=says,
        inputs=w.all + [root],
        absent=absent,
        clean=[out],
    )


def _raw_copy(w, tmp_path):
    return _copy(w.raw, tmp_path / "raw")


@case()
def prepare_scannet_missing_root(w, tmp_path):
    _prep(w, tmp_path, tmp_path / "nope", says=["--scannet_root", "does not exist"])


@case()
def prepare_scannet_root_is_a_file(w, tmp_path):
    _prep(w, tmp_path, w.txt, says=["--scannet_root", "is a file"])


@case()
def prepare_scannet_out_is_a_file(w, tmp_path):
    _prep(w, tmp_path, w.raw, says=["--out", "is a file"], out=w.txt, absent=[])


@case()
def prepare_scannet_empty_root(w, tmp_path):
    (tmp_path / "raw").mkdir()
    _prep(w, tmp_path, tmp_path / "raw", says=["scannetv2-labels.combined.tsv"], absent=[])


@case()
def prepare_scannet_no_label_table(w, tmp_path):
    root = _raw_copy(w, tmp_path)
    os.remove(os.path.join(root, "scannetv2-labels.combined.tsv"))
    _prep(w, tmp_path, root, says=["scannetv2-labels.combined.tsv"], absent=[])


@case()
def prepare_scannet_label_table_binary(w, tmp_path):
    root = _raw_copy(w, tmp_path)
    with open(os.path.join(root, "scannetv2-labels.combined.tsv"), "wb") as f:
        f.write(bytes(range(128, 256)) * 4)
    _prep(w, tmp_path, root, says=["scannetv2-labels.combined.tsv"], absent=[])


@case()
def prepare_scannet_unknown_scene(w, tmp_path):
    """A scene that cannot be prepared is a failed scene (exit 1, named in the report)."""
    _prep(w, tmp_path, w.raw, "--scenes", "scene9999_00", rc=1, says=["scene9999_00"])


@case()
def prepare_scannet_zero_workers(w, tmp_path):
    """--workers 0 or 1: no pool, the scenes are prepared in the process itself."""
    _prep(w, tmp_path, w.raw, "--workers=0", rc=0, says=["prepared 3"])


@case()
def prepare_scannet_workers_not_int(w, tmp_path):
    _prep(w, tmp_path, w.raw, "--workers=two", says=["--workers"])


def _scene_failure(w, tmp_path, damage, says):
    """One broken scene: the others are prepared, the broken one is named, exit 1."""
    root = _raw_copy(w, tmp_path)
    damage(os.path.join(root, "scans", "scene0000_00"))
    out = tmp_path / "out"
    _prep(w, tmp_path, root, rc=1, says=["scene0000_00", *says])
    assert not (out / "scene0000_00.npz").exists()
    assert (out / "scene0001_00.npz").is_file()
    report = json.load(open(out / "prepare_report.json"))
    assert "scene0000_00" in json.dumps(report)
    for split in ("train", "val"):
        if (out / f"{split}.txt").exists():
            listed = (out / f"{split}.txt").read_text().split()
            assert listed and all((out / f"{s}.npz").is_file() for s in listed)


def _truncate(path, keep=0.5):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


@case()
def prepare_scannet_truncated_mesh(w, tmp_path):
    _scene_failure(
        w,
        tmp_path,
        lambda d: _truncate(os.path.join(d, "scene0000_00_vh_clean_2.ply")),
        ["vh_clean_2.ply"],
    )


@case()
def prepare_scannet_missing_labels_ply(w, tmp_path):
    _scene_failure(
        w,
        tmp_path,
        lambda d: os.remove(os.path.join(d, "scene0000_00_vh_clean_2.labels.ply")),
        ["labels.ply"],
    )


@case()
def prepare_scannet_malformed_aggregation(w, tmp_path):
    def damage(d):
        with open(os.path.join(d, "scene0000_00.aggregation.json"), "w") as f:
            f.write('{"segGroups": [')

    _scene_failure(w, tmp_path, damage, ["aggregation.json"])


@case()
def prepare_scannet_aggregation_wrong_schema(w, tmp_path):
    """A malformed object group is skipped with a warning naming the file and counted."""
    root = _raw_copy(w, tmp_path)
    with open(
        os.path.join(root, "scans", "scene0000_00", "scene0000_00.aggregation.json"), "w"
    ) as f:
        f.write('{"segGroups": [{"label": "chair"}]}')
    _prep(w, tmp_path, root, rc=0, says=["aggregation.json", "malformed_groups"])


@case()
def prepare_scannet_malformed_segs(w, tmp_path):
    def damage(d):
        with open(os.path.join(d, "scene0000_00_vh_clean_2.0.010000.segs.json"), "w") as f:
            f.write("[1, 2")

    _scene_failure(w, tmp_path, damage, ["segs.json"])


@case()
def prepare_scannet_segs_wrong_length(w, tmp_path):
    def damage(d):
        with open(os.path.join(d, "scene0000_00_vh_clean_2.0.010000.segs.json"), "w") as f:
            json.dump({"segIndices": [0, 1, 2]}, f)

    _scene_failure(w, tmp_path, damage, ["segs.json"])


@case()
def prepare_scannet_nan_vertex(w, tmp_path):
    def damage(d):
        import plyfile

        p = os.path.join(d, "scene0000_00_vh_clean_2.ply")
        ply = plyfile.PlyData.read(p, mmap=False)
        ply["vertex"].data["x"][3] = np.nan
        ply.write(p)

    _scene_failure(w, tmp_path, damage, [])


@case()
def prepare_scannet_split_list_bom_and_comment(w, tmp_path):
    root = _raw_copy(w, tmp_path)
    p = os.path.join(root, "scannetv2_train.txt")
    names = open(p).read().split()
    with open(p, "w", encoding="utf-8-sig") as f:
        f.write("# training scenes\n" + "\n".join(names) + "\n")
    out = tmp_path / "out"
    _prep(w, tmp_path, root, rc=0)
    assert sorted((out / "train.txt").read_text().split()) == sorted(names)


@case()
def prepare_scannet_out_is_the_root(w, tmp_path):
    """Input == output folder: the npz land beside scans/, no input file changes."""
    root = _raw_copy(w, tmp_path)
    _prep(w, tmp_path, root, rc=0, out=root)
    assert os.path.isfile(os.path.join(root, "scene0000_00.npz"))


@case()
def prepare_scannet_spaces_in_paths(w, tmp_path):
    root = _copy(w.raw, tmp_path / "raw data")
    out = tmp_path / "pre pared"
    _prep(w, tmp_path, root, rc=0, out=out)
    assert (out / "train.txt").is_file()


@case()
def prepare_scannet_rerun_is_idempotent(w, tmp_path):
    out = tmp_path / "out"
    _copy(w.prep, out)
    r = _prep(w, tmp_path, w.raw, rc=0, out=out)
    assert "already present 3" in r.stdout + r.stderr
    report = json.load(open(out / "prepare_report.json"))
    assert report["stats"]["scenes"] == 3, report


@case()
def prepare_scannet_rerun_with_other_label_table(w, tmp_path):
    root = _raw_copy(w, tmp_path)
    out = _copy(w.prep, tmp_path / "out")
    with open(os.path.join(root, "scannetv2-labels.combined.tsv"), "a") as f:
        f.write("999\tthing\tthing\t1\t40\t0\tthing\totherprop\n")
    _prep(w, tmp_path, root, says=["--overwrite"], out=out, absent=[])


# --- scripts/prepare_s3dis.py ----------------------------------------------------------


def _s3(w, tmp_path, root, *args, rc=2, says=(), out=None, absent=None):
    out = tmp_path / "out" if out is None else out
    absent = [out] if absent is None and rc == 2 else (absent or [])
    return probe(
        "prepare_s3dis.py",
        f"--s3dis_root={root}",
        f"--out={out}",
        "--workers=1",
        *args,
        rc=rc,
        says=says,
        inputs=w.all + [root],
        absent=absent,
        clean=[out],
    )


@case()
def prepare_s3dis_missing_root(w, tmp_path):
    _s3(w, tmp_path, tmp_path / "nope", says=["--s3dis_root", "does not exist"])


@case()
def prepare_s3dis_out_is_a_file(w, tmp_path):
    _s3(w, tmp_path, w.s3raw, says=["--out", "is a file"], out=w.txt, absent=[])


@case()
def prepare_s3dis_no_areas(w, tmp_path):
    (tmp_path / "raw").mkdir()
    _s3(w, tmp_path, tmp_path / "raw", says=["Area"], absent=[])


@case()
def prepare_s3dis_unknown_area(w, tmp_path):
    _s3(w, tmp_path, w.s3raw, "--areas", "9", says=["9"], absent=[])


@case()
def prepare_s3dis_negative_voxel(w, tmp_path):
    _s3(w, tmp_path, w.s3raw, "--voxel_size=-1", says=["--voxel_size"])


@case()
def prepare_s3dis_scannet_layout(w, tmp_path):
    """The ScanNet layout given to the S3DIS script."""
    _s3(w, tmp_path, w.raw, says=["Area_N"], absent=[])


@case()
def prepare_s3dis_zero_k(w, tmp_path):
    _s3(w, tmp_path, w.s3raw, "--k=0", says=["--k"])


@case()
def prepare_s3dis_k_not_a_number(w, tmp_path):
    _s3(w, tmp_path, w.s3raw, "--k=ten", says=["--k"])


def _room(root, area="Area_1"):
    """The (only) room of ``area`` in the synthetic S3DIS layout."""
    return os.path.join(root, area, sorted(os.listdir(os.path.join(root, area)))[0])


def _s3_room_failure(w, tmp_path, damage, says):
    root = _copy(w.s3raw, tmp_path / "raw")
    room = _room(root)
    damage(room)
    out = tmp_path / "out"
    name = "Area_1_" + os.path.basename(room)
    _s3(w, tmp_path, root, rc=1, says=[name, *says])
    assert not (out / f"{name}.npz").exists()
    assert (out / f"Area_5_{os.path.basename(_room(root, 'Area_5'))}.npz").is_file()


@case()
def prepare_s3dis_missing_annotations(w, tmp_path):
    _s3_room_failure(
        w, tmp_path, lambda d: shutil.rmtree(os.path.join(d, "Annotations")), ["Annotations"]
    )


@case()
def prepare_s3dis_empty_annotation_folder(w, tmp_path):
    def damage(d):
        shutil.rmtree(os.path.join(d, "Annotations"))
        os.mkdir(os.path.join(d, "Annotations"))

    _s3_room_failure(w, tmp_path, damage, ["Annotations"])


@case()
def prepare_s3dis_all_rows_malformed(w, tmp_path):
    def damage(d):
        for f in os.listdir(os.path.join(d, "Annotations")):
            with open(os.path.join(d, "Annotations", f), "w") as fh:
                fh.write("a b c d e f\n")

    _s3_room_failure(w, tmp_path, damage, [])


@case()
def prepare_s3dis_binary_annotation(w, tmp_path):
    def damage(d):
        for f in os.listdir(os.path.join(d, "Annotations")):
            with open(os.path.join(d, "Annotations", f), "wb") as fh:
                fh.write(bytes(range(256)) * 4)

    _s3_room_failure(w, tmp_path, damage, [])


def _s3_room_ok(w, tmp_path, damage, says=()):
    """A recoverable problem: the room is prepared with a warning naming the file."""
    root = _copy(w.s3raw, tmp_path / "raw")
    room = _room(root)
    damage(room)
    out = tmp_path / "out"
    _s3(w, tmp_path, root, rc=0, says=says)
    return np.load(out / f"Area_1_{os.path.basename(room)}.npz")


def _first_annotation(d):
    return os.path.join(d, "Annotations", sorted(os.listdir(os.path.join(d, "Annotations")))[0])


@case()
def prepare_s3dis_malformed_row(w, tmp_path):
    def damage(d):
        with open(_first_annotation(d), "a") as f:
            f.write("1.0 2.0 x 1 2 3\n")

    _s3_room_ok(w, tmp_path, damage, says=["'rows_skipped': 1"])


@case()
def prepare_s3dis_nan_row(w, tmp_path):
    def damage(d):
        with open(_first_annotation(d), "a") as f:
            f.write("nan 2.0 1.0 1 2 3\n")

    scene = _s3_room_ok(w, tmp_path, damage)
    assert np.isfinite(scene["xyz"]).all()


@case()
def prepare_s3dis_bom_and_crlf(w, tmp_path):
    def damage(d):
        p = _first_annotation(d)
        text = open(p).read().replace("\n", "\r\n")
        with open(p, "w", encoding="utf-8-sig", newline="") as f:
            f.write(text)

    _s3_room_ok(w, tmp_path, damage)


@case()
def prepare_s3dis_empty_annotation_file(w, tmp_path):
    def damage(d):
        open(_first_annotation(d), "w").close()

    _s3_room_ok(w, tmp_path, damage)


@case()
def prepare_s3dis_unknown_class_file(w, tmp_path):
    def damage(d):
        shutil.copy(_first_annotation(d), os.path.join(d, "Annotations", "sofa_9.txt"))

    _s3_room_ok(w, tmp_path, damage)


@case()
def prepare_s3dis_rerun_other_settings(w, tmp_path):
    out = tmp_path / "out"
    _s3(w, tmp_path, w.s3raw, rc=0)
    _s3(w, tmp_path, w.s3raw, "--k=12", says=["--overwrite"], absent=[])
    r = _s3(w, tmp_path, w.s3raw, "--k=12", "--overwrite", rc=0)
    assert "failed 0" in r.stdout + r.stderr
    assert json.load(open(out / "prepare_report.json"))["stats"]["scenes"] == 2


# --- interrupting a preparation --------------------------------------------------------


# Runs a script the way a terminal would: with Python's own Ctrl-C handler. A child
# inherits an ignored SIGINT from a test run that ignores it (e.g. started as a background
# job of a non-interactive shell) and would never see the Ctrl-C sent below.
_WITH_CTRL_C = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def _interrupt(w, tmp_path, how):
    from dknet_jax.synthetic import make_dataset

    raw = tmp_path / "raw"
    make_dataset(str(raw), scenes=10, seed=5, format="s3dis", size="tiny", progress=False)
    out = tmp_path / "out"
    before = _digest([raw])
    env = {k: v for k, v in os.environ.items() if k != "DKNET_DEBUG"}
    log = open(tmp_path / "log", "w")
    cmd = [
        sys.executable,
        "-c",
        _WITH_CTRL_C,
        os.path.join("scripts", "prepare_s3dis.py"),
        f"--s3dis_root={raw}",
        f"--out={out}",
        "--workers=2",
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**env, "JAX_PLATFORMS": "cpu"},
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    kids: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while not (out.is_dir() and any(f.endswith(".npz") for f in os.listdir(out))):
            assert proc.poll() is None, open(tmp_path / "log").read()
            assert time.monotonic() < deadline
            kids |= _descendants(proc.pid)
            time.sleep(0.02)
        kids |= _descendants(proc.pid)
        if how == "sigterm":
            os.kill(proc.pid, signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=15)
        deadline = time.monotonic() + 5
        while any(_alive(k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [k for k in kids if _alive(k)], "workers alive after the stop"
    finally:
        for k in kids | _descendants(proc.pid) | {proc.pid}:
            if _alive(k):
                os.kill(k, signal.SIGKILL)
        proc.wait()
        log.close()
    text = open(tmp_path / "log").read()
    assert rc != 0
    assert "Traceback" not in text, text[-3000:]
    assert _digest([raw]) == before
    assert not _temp_files([out]), _temp_files([out])
    for f in os.listdir(out):  # every scene written is complete
        if f.endswith(".npz"):
            assert len(np.load(out / f)["xyz"]) > 0
    written = sorted(os.listdir(out))
    time.sleep(1.0)
    assert sorted(os.listdir(out)) == written, "written after the stop"
    # the same command again finishes the job
    r = subprocess.run(
        cmd,
        cwd=ROOT,
        env={**env, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert len([f for f in os.listdir(out) if f.endswith(".npz")]) == 10


@case(slow=True)
def prepare_interrupted_by_sigterm_then_rerun(w, tmp_path):
    _interrupt(w, tmp_path, "sigterm")


@case(slow=True)
def prepare_interrupted_by_ctrl_c_then_rerun(w, tmp_path):
    _interrupt(w, tmp_path, "ctrl-c")


# --- scripts/eval_scannet.py -----------------------------------------------------------

N_GT = 300


def _bench(tmp_path, pred_lines=("masks/m0.txt 5 0.9",), mask=None):
    """GT: one chair (label 5) on the first 150 of 300 vertices; one prediction of it."""
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    (pred / "masks").mkdir(parents=True)
    gt.mkdir()
    ids = np.zeros(N_GT, int)
    ids[:150] = 5001
    (gt / "scene0000_00.txt").write_text("\n".join(map(str, ids)) + "\n")
    m = (ids > 0).astype(int) if mask is None else mask
    (pred / "masks" / "m0.txt").write_text("\n".join(map(str, m)) + "\n")
    (pred / "scene0000_00.txt").write_text("\n".join(pred_lines) + "\n")
    return gt, pred


def _eval(tmp_path, gt, pred, *args, rc=2, says=(), out=None):
    out = tmp_path / "results.json" if out is None else out
    return probe(
        "eval_scannet.py",
        f"--gt_dir={gt}",
        f"--pred_dir={pred}",
        f"--out={out}",
        "--no_progress",
        *args,
        rc=rc,
        says=says,
        inputs=[gt, pred],
        absent=[out] if rc == 2 else [],
        clean=[tmp_path],
    )


def _ap(tmp_path):
    return json.load(open(tmp_path / "results.json"))


@case()
def eval_scannet_correct(w, tmp_path):
    gt, pred = _bench(tmp_path)
    _eval(tmp_path, gt, pred, rc=0)
    assert _ap(tmp_path)["all_ap_50%"] == 1.0 and _ap(tmp_path)["all_ap"] == 1.0


@case()
def eval_scannet_missing_gt_dir(w, tmp_path):
    _, pred = _bench(tmp_path)
    _eval(tmp_path, tmp_path / "nope", pred, says=["nope"])


@case()
def eval_scannet_missing_pred_dir(w, tmp_path):
    gt, _ = _bench(tmp_path)
    _eval(tmp_path, gt, tmp_path / "nope", says=["nope"])


@case()
def eval_scannet_empty_pred_dir(w, tmp_path):
    gt, _ = _bench(tmp_path)
    (tmp_path / "empty").mkdir()
    _eval(tmp_path, gt, tmp_path / "empty", says=["empty"])


@case()
def eval_scannet_binary_list(w, tmp_path):
    gt, pred = _bench(tmp_path)
    (pred / "scene0000_00.txt").write_bytes(bytes(range(128, 256)))
    _eval(tmp_path, gt, pred, says=["scene0000_00.txt"])


@case()
def eval_scannet_bom_list(w, tmp_path):
    gt, pred = _bench(tmp_path)
    (pred / "scene0000_00.txt").write_bytes(b"\xef\xbb\xbfmasks/m0.txt 5 0.9\n")
    _eval(tmp_path, gt, pred, rc=0)
    assert _ap(tmp_path)["all_ap_50%"] == 1.0


@case()
def eval_scannet_comment_line(w, tmp_path):
    gt, pred = _bench(tmp_path, ("# my predictions", "masks/m0.txt 5 0.9"))
    _eval(tmp_path, gt, pred, says=["scene0000_00.txt", "#"])


@case()
def eval_scannet_label_id_zero_skipped(w, tmp_path):
    gt, pred = _bench(tmp_path, ("masks/m1.txt 0 0.5", "masks/m0.txt 5 0.9"))
    (pred / "masks" / "m1.txt").write_text("1\n" * N_GT)
    _eval(tmp_path, gt, pred, rc=0, says=["label ids 0"])


@case()
def eval_scannet_non_instance_label_skipped(w, tmp_path):
    gt, pred = _bench(tmp_path, ("masks/m1.txt 1 0.5", "masks/m0.txt 5 0.9"))
    (pred / "masks" / "m1.txt").write_text("1\n" * N_GT)
    _eval(tmp_path, gt, pred, rc=0, says=["label ids 1"])


@case()
def eval_scannet_label_not_a_number(w, tmp_path):
    gt, pred = _bench(tmp_path, ("masks/m0.txt chair 0.9",))
    _eval(tmp_path, gt, pred, says=["scene0000_00.txt"])


@case()
def eval_scannet_nan_confidence(w, tmp_path):
    gt, pred = _bench(tmp_path, ("masks/m0.txt 5 nan",))
    _eval(tmp_path, gt, pred, says=["scene0000_00.txt", "NaN"])


@case()
def eval_scannet_inf_confidence(w, tmp_path):
    gt, pred = _bench(tmp_path, ("masks/m0.txt 5 inf",))
    _eval(tmp_path, gt, pred, rc=0)


@case()
def eval_scannet_two_fields(w, tmp_path):
    gt, pred = _bench(tmp_path, ("masks/m0.txt 5",))
    _eval(tmp_path, gt, pred, says=["scene0000_00.txt"])


@case()
def eval_scannet_missing_mask_file(w, tmp_path):
    gt, pred = _bench(tmp_path, ("masks/nope.txt 5 0.9",))
    _eval(tmp_path, gt, pred, says=["nope.txt"])


@case()
def eval_scannet_mask_wrong_length(w, tmp_path):
    gt, pred = _bench(tmp_path, mask=np.ones(N_GT - 1, int))
    _eval(tmp_path, gt, pred, says=["m0.txt"])


@case()
def eval_scannet_mask_not_numeric(w, tmp_path):
    gt, pred = _bench(tmp_path)
    (pred / "masks" / "m0.txt").write_text("yes\n" * N_GT)
    _eval(tmp_path, gt, pred, says=["m0.txt"])


@case()
def eval_scannet_mask_values_two(w, tmp_path):
    """A non-zero mask value is a set vertex (the official reader's `!= 0`)."""
    gt, pred = _bench(tmp_path, mask=np.r_[np.full(150, 2), np.zeros(150, int)])
    _eval(tmp_path, gt, pred, rc=0)
    assert _ap(tmp_path)["all_ap_50%"] == 1.0


@case()
def eval_scannet_absolute_mask_path(w, tmp_path):
    gt, pred = _bench(tmp_path)
    (pred / "scene0000_00.txt").write_text(f"{pred / 'masks' / 'm0.txt'} 5 0.9\n")
    _eval(tmp_path, gt, pred, says=["must be relative"])


@case()
def eval_scannet_space_in_mask_path(w, tmp_path):
    gt, pred = _bench(tmp_path)
    os.rename(pred / "masks" / "m0.txt", pred / "masks" / "m 0.txt")
    (pred / "scene0000_00.txt").write_text("masks/m 0.txt 5 0.9\n")
    _eval(tmp_path, gt, pred, says=["scene0000_00.txt"])


@case()
def eval_scannet_empty_gt_file(w, tmp_path):
    gt, pred = _bench(tmp_path)
    (gt / "scene0000_00.txt").write_text("")
    _eval(tmp_path, gt, pred, says=["gt", "scene0000_00.txt", "empty"])


@case()
def eval_scannet_binary_gt_file(w, tmp_path):
    gt, pred = _bench(tmp_path)
    (gt / "scene0000_00.txt").write_bytes(bytes(range(128, 256)))
    _eval(tmp_path, gt, pred, says=["scene0000_00.txt"])


@case()
def eval_scannet_prediction_without_gt(w, tmp_path):
    gt, pred = _bench(tmp_path)
    (pred / "scene0001_00.txt").write_text("masks/m0.txt 5 0.9\n")
    _eval(tmp_path, gt, pred, says=["scene0001_00"])


@case()
def eval_scannet_gt_without_prediction(w, tmp_path):
    gt, pred = _bench(tmp_path)
    (gt / "scene0001_00.txt").write_text("0\n" * N_GT)
    _eval(tmp_path, gt, pred, rc=0, says=["scene0001_00", "skipped"])


@case()
def eval_scannet_all_instances_small(w, tmp_path):
    gt, pred = _bench(tmp_path)
    ids = np.zeros(N_GT, int)
    ids[:50] = 5001
    (gt / "scene0000_00.txt").write_text("\n".join(map(str, ids)) + "\n")
    (pred / "masks" / "m0.txt").write_text("\n".join(map(str, (ids > 0).astype(int))) + "\n")
    _eval(tmp_path, gt, pred, rc=0, says=["100"])


@case()
def eval_scannet_out_is_a_folder(w, tmp_path):
    gt, pred = _bench(tmp_path)
    (tmp_path / "res").mkdir()
    probe(
        "eval_scannet.py",
        f"--gt_dir={gt}",
        f"--pred_dir={pred}",
        f"--out={tmp_path / 'res'}",
        "--no_progress",
        says=["is a folder"],
        inputs=[gt, pred],
        clean=[tmp_path],
    )
    assert not os.listdir(tmp_path / "res")


@case()
def eval_scannet_out_is_a_gt_file(w, tmp_path):
    """Input == output: the results must never replace a GT (or prediction) file."""
    gt, pred = _bench(tmp_path)
    probe(
        "eval_scannet.py",
        f"--gt_dir={gt}",
        f"--pred_dir={pred}",
        f"--out={gt / 'scene0000_00.txt'}",
        "--no_progress",
        says=["scene0000_00.txt"],
        inputs=[gt, pred],
        clean=[tmp_path],
    )


@case()
def eval_scannet_out_is_a_prediction_file(w, tmp_path):
    gt, pred = _bench(tmp_path)
    probe(
        "eval_scannet.py",
        f"--gt_dir={gt}",
        f"--pred_dir={pred}",
        f"--out={pred / 'masks' / 'm0.txt'}",
        "--no_progress",
        says=["m0.txt"],
        inputs=[gt, pred],
        clean=[tmp_path],
    )


@case()
def eval_scannet_out_under_a_file(w, tmp_path):
    gt, pred = _bench(tmp_path)
    (tmp_path / "f").write_text("x")
    _eval(tmp_path, gt, pred, says=["f is a file"], out=tmp_path / "f" / "r.json")


@case()
def eval_scannet_missing_required_flag(w, tmp_path):
    gt, _ = _bench(tmp_path)
    probe("eval_scannet.py", f"--gt_dir={gt}", says=["--pred_dir"], inputs=[gt])


# --- scripts/make_synthetic.py ---------------------------------------------------------


def _synth(tmp_path, *args, rc=2, says=(), out=None, inputs=()):
    out = tmp_path / "synth" if out is None else out
    return probe(
        "make_synthetic.py",
        f"--out={out}",
        *args,
        rc=rc,
        says=says,
        inputs=list(inputs),
        absent=[out] if rc == 2 and not inputs else [],
        clean=[out] if os.path.isdir(out) or rc == 0 else [],
    )


@case()
def make_synthetic_zero_scenes(w, tmp_path):
    _synth(tmp_path, "--scenes=0", says=["--scenes"])


@case()
def make_synthetic_bad_val_fraction(w, tmp_path):
    _synth(tmp_path, "--scenes=2", "--val_fraction=1.5", says=["--val_fraction"])


@case()
def make_synthetic_bad_size(w, tmp_path):
    _synth(tmp_path, "--scenes=2", "--size=huge", says=["--size"])


@case()
def make_synthetic_out_is_a_file(w, tmp_path):
    _synth(tmp_path, "--scenes=1", "--size=tiny", says=["is a file"], out=w.txt, inputs=[w.txt])


@case()
def make_synthetic_into_a_raw_dataset(w, tmp_path):
    """Into an existing dataset of the same seed: the same bytes, nothing else touched."""
    root = _copy(w.raw, tmp_path / "raw")
    _synth(
        tmp_path,
        "--scenes=3",
        "--seed=3",
        "--size=tiny",
        "--val_fraction=0.34",
        rc=0,
        out=root,
        inputs=[root],
    )


@case()
def make_synthetic_spaces_in_path(w, tmp_path):
    out = tmp_path / "my data"
    _synth(tmp_path, "--scenes=1", "--size=tiny", rc=0, out=out)
    assert (out / "scans").is_dir()


# --- scripts/overfit.py ----------------------------------------------------------------


@case()
def overfit_unknown_key(w, tmp_path):
    probe(
        "overfit.py",
        "--config.model.candidate=nms",
        f"--workdir={tmp_path / 'o'}",
        says=["'candidate'"],
        inputs=w.all,
        absent=[tmp_path / "o"],
    )


@case()
def overfit_bad_steps(w, tmp_path):
    probe(
        "overfit.py",
        "--steps=0",
        f"--workdir={tmp_path / 'o'}",
        says=["steps"],
        inputs=w.all,
        absent=[tmp_path / "o"],
    )


@case()
def overfit_steps_not_a_number(w, tmp_path):
    probe(
        "overfit.py",
        "--steps=many",
        f"--workdir={tmp_path / 'o'}",
        says=["steps"],
        inputs=w.all,
        absent=[tmp_path / "o"],
    )


@case()
def overfit_workdir_is_a_file(w, tmp_path):
    probe("overfit.py", "--steps=1", f"--workdir={w.txt}", says=[w.txt], inputs=w.all)


# --- the test --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_probe(name, w, tmp_path):
    CASES[name][0](w, tmp_path)

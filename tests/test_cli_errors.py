"""User errors of the command-line scripts: one ``error:`` line, exit status 2, no traceback
(issue 11, items 11 and 12). Every case fails before any model work, so they stay fast."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "--config=configs/synthetic.py:tiny"


def run(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "DKNET_DEBUG"}
    full_env.update({"JAX_PLATFORMS": "cpu", **(env or {})})
    return subprocess.run(
        [sys.executable, os.path.join("scripts", script), *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_user_error(r: subprocess.CompletedProcess, *names: str) -> str:
    """Exit status 2, no traceback, exactly one ``error:`` line naming ``names``."""
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, r.stderr[-3000:]
    for name in names:
        assert name in errors[0], (name, errors[0])
    return errors[0]


@pytest.fixture
def data_root(tmp_path):
    """A prepared-data folder whose splits are empty lists."""
    root = tmp_path / "prepared"
    root.mkdir()
    (root / "train.txt").write_text("")
    (root / "val.txt").write_text("")
    return root


# --- scripts/train.py ------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, names",
    [
        ("--config.model.candidate=nms", ["candidate", "dknet_jax/config.py"]),  # unknown key
        ("--config.model.candidates=foo", ["config.model.candidates", "'foo'"]),  # bad enum
        ("--config.train.lr=-1", ["config.train.lr", "> 0"]),  # impossible value
    ],
)
def test_train_config_errors(tmp_path, override, names):
    work = tmp_path / "work"
    r = run("train.py", TINY, override, f"--workdir={work}")
    assert_user_error(r, *names)
    assert not work.exists()


@pytest.mark.parametrize(
    "args, names",
    [
        (["--config.train.lr=abc"], ["--config.train.lr=abc", "'abc'"]),  # absl cannot convert
        (["--epochs=3"], ["'epochs'", "--helpshort"]),  # unknown flag
        (["extra"], ["'extra'"]),  # a stray argument (absl's UsageError)
    ],
)
def test_train_flag_parsing_errors(tmp_path, args, names):
    """Errors absl raises itself are ours too: one line and exit 2, not absl's 'FATAL Flags
    parsing error' (exit 1) or its full usage text."""
    work = tmp_path / "work"
    r = run("train.py", TINY, *args, f"--workdir={work}")
    assert_user_error(r, *names)
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not work.exists()


def test_train_missing_required_flag():
    r = run("train.py", TINY)
    assert_user_error(r, "--workdir")


@pytest.mark.parametrize(
    "args, names",
    [
        (["--num_processes=2"], ["--coordinator_address", "--process_id", "--distributed"]),
        (
            ["--coordinator_address=localhost:1", "--num_processes=2", "--process_id=2"],
            ["--process_id", "0..1"],
        ),
    ],
)
def test_train_multihost_flag_errors(tmp_path, args, names):
    """Partial or impossible multi-host flags: one line before jax.distributed starts."""
    work = tmp_path / "work"
    r = run("train.py", TINY, *args, f"--workdir={work}")
    assert_user_error(r, *names)
    assert not work.exists()


def test_train_workdir_is_a_file(tmp_path, data_root):
    """Checked before the data: it was a bare 'File exists' from makedirs."""
    work = tmp_path / "work"
    work.write_text("x")
    r = run("train.py", TINY, f"--config.data.root={data_root}", f"--workdir={work}")
    assert_user_error(r, "--workdir", str(work), "is a file")


def test_overfit_unknown_key_is_one_line(tmp_path):
    """overfit.py's default config was loaded while its flag was defined, so a bad
    override was a traceback (exit 1) before run_absl could report it."""
    r = run("overfit.py", "--config.model.candidate=nms", f"--workdir={tmp_path / 'o'}")
    assert_user_error(r, "'candidate'")
    assert not (tmp_path / "o").exists()


def test_train_missing_data_root_creates_no_workdir(tmp_path):
    work = tmp_path / "work"
    missing = tmp_path / "no_such_data"
    r = run("train.py", TINY, f"--config.data.root={missing}", f"--workdir={work}")
    line = assert_user_error(r, str(missing), "does not exist")
    assert "config.data.root" in line  # what to do
    assert not work.exists(), "a failed start must not leave an empty work dir"


def test_train_empty_train_split(tmp_path, data_root):
    work = tmp_path / "work"
    r = run("train.py", TINY, f"--config.data.root={data_root}", f"--workdir={work}")
    assert_user_error(r, str(data_root), "'train'", "empty")
    assert not work.exists()


def test_debug_flag_and_env_keep_the_traceback(tmp_path):
    for args, env in ((["--debug"], None), ([], {"DKNET_DEBUG": "1"})):
        r = run(
            "train.py", TINY, "--config.train.lr=-1", f"--workdir={tmp_path / 'w'}", *args, env=env
        )
        assert r.returncode != 0
        assert "Traceback" in r.stderr and "config.train.lr" in r.stderr


# --- scripts/evaluate.py ---------------------------------------------------------------


def test_evaluate_missing_checkpoint(tmp_path, data_root):
    missing = tmp_path / "no_run"
    r = run(
        "evaluate.py",
        TINY,
        f"--config.data.root={data_root}",
        f"--checkpoint={missing}",
        "--split=val",
    )
    assert_user_error(r, str(missing))


def test_evaluate_out_is_a_file(tmp_path, data_root):
    out = tmp_path / "o.txt"
    out.write_text("x")
    r = run(
        "evaluate.py",
        TINY,
        f"--config.data.root={data_root}",
        f"--checkpoint={tmp_path / 'no_run'}",
        f"--out={out}",
    )
    assert_user_error(r, "--out", str(out), "is a file")
    assert out.read_text() == "x"


def test_evaluate_missing_split_is_checked_before_the_checkpoint(tmp_path, data_root):
    r = run(
        "evaluate.py",
        TINY,
        f"--config.data.root={data_root}",
        f"--checkpoint={tmp_path / 'no_run'}",
        "--split=nosuchsplit",
    )
    assert_user_error(r, "'nosuchsplit'", str(data_root))


# --- scripts/prepare_*.py --------------------------------------------------------------


@pytest.mark.parametrize(
    "script, root_flag",
    [("prepare_scannet.py", "--scannet_root"), ("prepare_s3dis.py", "--s3dis_root")],
)
def test_prepare_missing_root(tmp_path, script, root_flag):
    missing = tmp_path / "raw"
    r = run(script, f"{root_flag}={missing}", f"--out={tmp_path / 'out'}", "--workers=1")
    assert_user_error(r, root_flag, str(missing), "does not exist")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "script, root_flag",
    [("prepare_scannet.py", "--scannet_root"), ("prepare_s3dis.py", "--s3dis_root")],
)
def test_prepare_out_is_a_file(tmp_path, script, root_flag):
    (tmp_path / "raw").mkdir()
    out = tmp_path / "out.txt"
    out.write_text("x")
    r = run(script, f"{root_flag}={tmp_path / 'raw'}", f"--out={out}", "--workers=1")
    assert_user_error(r, "--out", str(out), "is a file")


@pytest.mark.parametrize(
    "arg, name",
    [("--voxel_size=-1", "--voxel_size"), ("--k=0", "--k"), ("--k_thresh=-0.5", "--k_thresh")],
)
def test_prepare_s3dis_bad_settings_fail_before_any_room(tmp_path, arg, name):
    """These failed every room on its own (exit 1) or ran (--k 0)."""
    (tmp_path / "raw").mkdir()
    r = run("prepare_s3dis.py", f"--s3dis_root={tmp_path / 'raw'}", f"--out={tmp_path / 'o'}", arg)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"error: {name} must be" in r.stderr
    assert not (tmp_path / "o").exists()


# --- scripts/eval_scannet.py -----------------------------------------------------------


@pytest.fixture
def bench_dirs(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    pred.mkdir()
    (gt / "scene0000_00.txt").write_text("5001\n5001\n0\n")
    (pred / "masks").mkdir()
    (pred / "masks" / "m0.txt").write_text("1\n1\n0\n")
    (pred / "scene0000_00.txt").write_text("masks/m0.txt 5 0.9\n")
    return gt, pred


def test_eval_scannet_binary_list_file(tmp_path, bench_dirs):
    gt, pred = bench_dirs
    (pred / "scene0000_00.txt").write_bytes(bytes(range(128, 256)))
    r = run("eval_scannet.py", f"--gt_dir={gt}", f"--pred_dir={pred}", "--no_progress")
    assert_user_error(r, "scene0000_00.txt", "not a text file")


def test_eval_scannet_out_is_a_directory_fails_before_scoring(tmp_path, bench_dirs):
    gt, pred = bench_dirs
    out = tmp_path / "results"
    out.mkdir()
    r = run(
        "eval_scannet.py", f"--gt_dir={gt}", f"--pred_dir={pred}", f"--out={out}", "--no_progress"
    )
    assert_user_error(r, "--out", str(out), "is a folder")
    assert "AP" not in r.stdout  # nothing was scored


@pytest.mark.parametrize(
    "target", ["gt/scene0000_00.txt", "pred/scene0000_00.txt", "pred/masks/m0.txt"]
)
def test_eval_scannet_out_never_replaces_an_input(tmp_path, bench_dirs, target):
    """--out pointing at a file the evaluation reads was overwritten with the JSON."""
    before = (tmp_path / target).read_bytes()
    r = run(
        "eval_scannet.py",
        f"--gt_dir={tmp_path / 'gt'}",
        f"--pred_dir={tmp_path / 'pred'}",
        f"--out={tmp_path / target}",
        "--no_progress",
    )
    assert_user_error(r, "--out", "is an input file")
    assert (tmp_path / target).read_bytes() == before


def test_eval_scannet_warnings_are_one_line(tmp_path, bench_dirs):
    """Python warnings print as 'warning: ...', without the source file and line."""
    gt, pred = bench_dirs
    (pred / "scene0000_00.txt").write_text("masks/m0.txt 0 0.5\n")
    r = run("eval_scannet.py", f"--gt_dir={gt}", f"--pred_dir={pred}", "--no_progress")
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines and all(ln.startswith("warning: ") for ln in lines), r.stderr
    assert "label ids 0" in r.stderr and "UserWarning" not in r.stderr


def test_eval_scannet_writes_results(tmp_path, bench_dirs):
    gt, pred = bench_dirs
    out = tmp_path / "new" / "results.json"
    r = run(
        "eval_scannet.py", f"--gt_dir={gt}", f"--pred_dir={pred}", f"--out={out}", "--no_progress"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert out.is_file()


# --- scripts/predict.py ----------------------------------------------------------------


def test_predict_out_is_a_file_fails_before_loading(tmp_path):
    out = tmp_path / "out.txt"
    out.write_text("x")
    # the checkpoint and input do not exist either: the output is checked first
    r = run(
        "predict.py",
        f"--checkpoint={tmp_path / 'no_run'}",
        f"--input={tmp_path / 'scan.ply'}",
        f"--out={out}",
    )
    assert_user_error(r, "--out", str(out), "is a file")


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write to a read-only folder"
)
def test_predict_out_read_only(tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        r = run(
            "predict.py",
            f"--checkpoint={tmp_path / 'no_run'}",
            f"--input={tmp_path / 'scan.ply'}",
            f"--out={out}",
        )
    finally:
        out.chmod(0o700)
    assert_user_error(r, "--out", str(out), "not writable")


def test_predict_out_under_a_file(tmp_path):
    """A folder that cannot be created (its parent is a file) is the same early error;
    unlike a read-only folder this can be checked when running as root."""
    parent = tmp_path / "file"
    parent.write_text("x")
    out = parent / "sub"
    r = run(
        "predict.py",
        f"--checkpoint={tmp_path / 'no_run'}",
        f"--input={tmp_path / 'scan.ply'}",
        f"--out={out}",
    )
    assert_user_error(r, "--out", str(out), "cannot create")


def test_ctrl_c_is_one_line_and_status_130(capsys):
    """Ctrl-C of a script: 'interrupted' and the shell's status 130, no traceback."""
    from dknet_jax.cli import run_cli

    def main(argv):
        raise KeyboardInterrupt

    assert run_cli(main, []) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_prepare_scannet_binary_label_table(tmp_path):
    """It was a ValueError treated as a bug (a traceback)."""
    raw = tmp_path / "raw"
    (raw / "scans").mkdir(parents=True)
    (raw / "scannetv2-labels.combined.tsv").write_bytes(bytes(range(128, 256)))
    r = run(
        "prepare_scannet.py", f"--scannet_root={raw}", f"--out={tmp_path / 'out'}", "--workers=1"
    )
    assert_user_error(r, "scannetv2-labels.combined.tsv", "not a text file")

"""Checkpoint round trip, keep-last-k, best-by-metric, and the missing-dir error."""

import os

import numpy as np
import pytest

from dknet_jax.checkpoint import Checkpoints, find_checkpoint_dir


def _state(v):
    return {"params": {"w": np.full((3, 2), v, np.float32)}, "step": np.asarray(v, np.int32)}


def test_roundtrip_keep_and_best(tmp_path):
    ck = Checkpoints(str(tmp_path), keep=2)
    for step, metric in [(1, 0.1), (2, 0.5), (3, 0.2), (4, None)]:
        ck.save(
            step, _state(step), {"step": step, "data": {"epoch": 0, "pos": step}}, metric=metric
        )
    assert ck.latest_step() == 4
    kept = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert kept == [3, 4]
    state, meta = ck.restore(_state(0))
    np.testing.assert_array_equal(state["params"]["w"], np.full((3, 2), 4, np.float32))
    assert meta["data"] == {"epoch": 0, "pos": 4}
    best_state, best_meta = ck.restore(_state(0), best=True)
    assert best_meta["step"] == 2 and best_meta["metric"] == pytest.approx(0.5)
    np.testing.assert_array_equal(best_state["params"]["w"], np.full((3, 2), 2, np.float32))
    ck.close()
    # a fresh manager on the same dir sees the same latest step (resume after a kill)
    assert Checkpoints(str(tmp_path)).latest_step() == 4
    assert find_checkpoint_dir(str(tmp_path / "checkpoints")) == str(tmp_path)


def test_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="--workdir"):
        find_checkpoint_dir(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Checkpoints(str(tmp_path / "w")).restore(_state(0))


def test_shape_mismatch_is_a_clear_error(tmp_path):
    ck = Checkpoints(str(tmp_path))
    ck.save(1, _state(1), {"step": 1})
    other = {"params": {"w": np.zeros((4, 2), np.float32)}, "step": np.asarray(0, np.int32)}
    with pytest.raises(ValueError, match=r"shape \(3, 2\) there but \(4, 2\) here"):
        ck.restore(other)


def _corrupt(step_dir):
    """Truncate the array data files of a saved step (a crash or full disk mid-copy)."""
    files = list((step_dir / "state" / "d").iterdir())
    assert files
    for f in files:
        f.write_bytes(f.read_bytes()[:5])


def _saved(tmp_path, steps=(1, 2, 3)):
    ck = Checkpoints(str(tmp_path))
    for s in steps:
        ck.save(s, _state(s), {"step": s}, metric=0.1 * s)
    ck.close()
    return tmp_path


def test_corrupt_step_is_named_as_corrupt_not_a_config_mismatch(tmp_path):
    _corrupt(_saved(tmp_path) / "checkpoints" / "3")
    ck = Checkpoints(str(tmp_path))
    with pytest.raises(ValueError, match=r"checkpoints/3 is corrupt or incomplete") as e:
        ck.restore(_state(0))
    ck.close()
    assert "does not match" not in str(e.value) and "older step" in str(e.value)
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no orbax stack


def _truncate_tail(step_dir):
    """Cut the second half of the largest data file only (a copy that stopped midway):
    the tree still lists, one array cannot be read."""
    files = [f for f in (step_dir / "state").rglob("d/*") if f.is_file()]
    big = max(files, key=lambda f: f.stat().st_size)
    data = big.read_bytes()
    big.write_bytes(data[: len(data) // 2])


def test_unreadable_finds_a_truncated_array_and_passes_a_whole_step(tmp_path):
    from dknet_jax.checkpoint import _unreadable

    ck = Checkpoints(str(tmp_path))
    w = np.random.default_rng(0).random(40_000, dtype=np.float32)  # incompressible
    big = {"params": {"w": w}, "step": np.asarray(1)}
    ck.save(1, big, {"step": 1})
    ck.save(2, big, {"step": 2})
    ck.close()
    assert _unreadable(str(tmp_path / "checkpoints" / "1")) is None
    _truncate_tail(tmp_path / "checkpoints" / "2")
    assert _unreadable(str(tmp_path / "checkpoints" / "2")) is not None
    ck = Checkpoints(str(tmp_path))
    with pytest.raises(ValueError, match=r"checkpoints/2 is corrupt or incomplete"):
        ck.restore({"params": {"w": np.zeros(40_000, np.float32)}, "step": np.asarray(0)})
    ck.close()


_RESTORE_CORRUPT = """
import pathlib, sys
import numpy as np
from tests.test_checkpoint import _corrupt
from dknet_jax.checkpoint import Checkpoints
tmp = pathlib.Path(sys.argv[1])
tree = lambda v: {f"w{i}": np.full((64, 8), v, np.float32) for i in range(64)}
ck = Checkpoints(str(tmp))
ck.save(1, tree(1), {"step": 1})
ck.close()
_corrupt(tmp / "checkpoints" / "1")
ck = Checkpoints(str(tmp))
try:
    ck.restore(tree(0))
except ValueError as e:
    print("raised:", e)
ck.close()
"""


def test_corrupt_step_leaves_no_reads_in_flight(tmp_path):
    """orbax abandons its other reads on the first failure; they used to print
    'Task exception was never retrieved' / 'Event loop is closed' tracebacks after the
    clear error (the slow probe tests of the CLIs caught it)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run(
        [sys.executable, "-c", _RESTORE_CORRUPT, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"},
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "checkpoints/1 is corrupt or incomplete" in r.stdout
    assert "Traceback" not in r.stderr and "never retrieved" not in r.stderr, r.stderr[-2000:]


def test_structure_mismatch_is_a_config_error(tmp_path):
    _saved(tmp_path, steps=(1,))
    other = {
        "params": {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)},
        "step": np.asarray(0, np.int32),
    }
    with pytest.raises(
        ValueError,
        match=r"params/b: missing from the checkpoint.*use the "
        r"config it was trained with",
    ):
        Checkpoints(str(tmp_path)).restore(other)


def test_per_leaf_optimiser_state_names_the_layout_change(tmp_path):
    # a checkpoint with per-leaf AdamW moments (before optax.flatten) against a target
    # with flat ones: the error says it is the optimiser layout, not the config
    w = np.zeros((3, 2), np.float32)
    old = {"params": {"w": w}, "opt": {"mu": {"w": w}, "nu": {"w": w}}}
    Checkpoints(str(tmp_path)).save(1, old, {"step": 1})
    flat = np.zeros(6, np.float32)
    new = {"params": {"w": w}, "opt": {"mu": flat, "nu": flat}}
    with pytest.raises(ValueError, match=r"optimiser state does not match.*flat vectors"):
        Checkpoints(str(tmp_path)).restore(new)


def test_resume_falls_back_past_a_corrupt_latest_and_best_is_replaced(tmp_path, capsys):
    _corrupt(_saved(tmp_path) / "checkpoints" / "3")
    ck = Checkpoints(str(tmp_path))
    state, meta = ck.restore_latest_readable(_state(0))
    assert meta["step"] == 2
    np.testing.assert_array_equal(state["params"]["w"], np.full((3, 2), 2, np.float32))
    err = capsys.readouterr().err
    assert "checkpoints/3 is corrupt" in err and "3.corrupt" in err
    assert (tmp_path / "checkpoints" / "3.corrupt").is_dir()
    assert ck.latest_step() == 2
    # the resumed run reaches step 3 again: best/3 (of the abandoned run) is replaced
    ck.save(3, _state(30), {"step": 3}, metric=0.05)
    assert ck.latest_step() == 3
    best_state, best_meta = ck.restore(_state(0), best=True)
    assert best_meta["metric"] == pytest.approx(0.05)
    np.testing.assert_array_equal(best_state["params"]["w"], np.full((3, 2), 30, np.float32))
    assert sorted(os.listdir(tmp_path / "best")) == ["3"]
    ck.close()


def test_best_step_reached_again_after_a_hand_deleted_checkpoint(tmp_path):
    import shutil

    _saved(tmp_path)
    shutil.rmtree(tmp_path / "checkpoints" / "3")  # the user removed the bad step by hand
    ck = Checkpoints(str(tmp_path))
    ck.save(3, _state(33), {"step": 3}, metric=0.9)  # was StepAlreadyExistsError
    _, best_meta = ck.restore(_state(0), best=True)
    assert best_meta["step"] == 3 and best_meta["metric"] == pytest.approx(0.9)
    ck.close()
    # a replacement killed midway is finished by the next Checkpoints()
    os.rename(tmp_path / "best" / "3", tmp_path / "best" / "3.replaced")
    assert Checkpoints(str(tmp_path)).restore(_state(0), best=True)[1]["step"] == 3


def test_all_steps_corrupt(tmp_path):
    _saved(tmp_path, steps=(1,))
    _corrupt(tmp_path / "checkpoints" / "1")
    with pytest.raises(ValueError, match="no readable checkpoint.*1.corrupt"):
        Checkpoints(str(tmp_path)).restore_latest_readable(_state(0), log=lambda m: None)


def test_predict_and_evaluate_report_corruption(tmp_path):
    from dknet_jax.inference.predictor import load_model
    from tests.test_predict import _random_state, _tiny_config

    config = _tiny_config()
    ck = Checkpoints(str(tmp_path))
    ck.save(
        3,
        _random_state(config),
        {"step": 3, "data": None, "best": None, "config": config.to_json_best_effort()},
    )
    ck.close()
    _corrupt(tmp_path / "checkpoints" / "3")
    # predict.py (config from the checkpoint) and evaluate.py (config given, latest step)
    for load in (
        lambda: load_model(str(tmp_path), log=lambda m: None),
        lambda: load_model(str(tmp_path), config, which="latest"),
    ):
        with pytest.raises(ValueError, match="checkpoints/3 is corrupt or incomplete") as e:
            load()
        assert "does not match" not in str(e.value)

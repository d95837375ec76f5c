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
        ck.save(step, _state(step), {"step": step, "data": {"epoch": 0, "pos": step}},
                metric=metric)
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

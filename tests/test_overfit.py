"""The overfit check as a test (slow: ~15 CPU-minutes; `python -m pytest -q -m slow`).

Two synthetic rooms, no augmentation, evaluated on the same rooms: a model whose instance
stages work memorises them (AP50 >= 0.9). Run it after any change to the model, the
losses or a config; `scripts/overfit.py` is the same check with its diagnostics printed.
"""

import importlib.util
import pathlib

import pytest

from dknet_jax.training.overfit import run_overfit

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def _synthetic_config():
    spec = importlib.util.spec_from_file_location("synthetic", CONFIGS / "synthetic.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


@pytest.mark.slow
def test_two_memorised_rooms_reach_ap50_0_9(tmp_path):
    results = run_overfit(_synthetic_config(), str(tmp_path), steps=200, progress=False)
    inst, diag = results["instance"], results["diagnostics"]
    assert inst["all_ap_50%"] >= 0.9, (inst, diag)
    # every stage did its job on the memorised rooms
    assert diag["candidate_recall"] >= 0.95, diag
    assert diag["semantic_acc"] >= 0.9, diag

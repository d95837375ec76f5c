"""Evaluate a trained DKNet on a prepared split (batched, jit-compiled).

  python scripts/evaluate.py --config=configs/scannet.py --checkpoint W --split val \
      [--out W/eval_val] [--best]

Prints the metrics table (ScanNet AP / mIoU, or S3DIS mCov/mWCov/mPrec/mRec), writes
<out>/results.json and, for ScanNet-style data, benchmark-format predictions in <out>/pred
and GT files in <out>/gt (score them with scripts/eval_scannet.py).
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from dknet_jax.cli import check_output_dir, run_absl
from dknet_jax.inference.evaluate import evaluate_checkpoint

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file", lock_config=True)
_CKPT = flags.DEFINE_string("checkpoint", None, "work dir of scripts/train.py")
_SPLIT = flags.DEFINE_string("split", "val", "split name under config.data.root")
_OUT = flags.DEFINE_string("out", None, "output folder (default: <checkpoint>/eval_<split>)")
_BEST = flags.DEFINE_bool("best", False, "use the best-by-mAP checkpoint, not the latest")
flags.mark_flags_as_required(["config", "checkpoint"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint op at INFO
    out = _OUT.value or os.path.join(_CKPT.value, f"eval_{_SPLIT.value}")
    check_output_dir(out, "--out")  # before the model is restored and run
    evaluate_checkpoint(
        _CONFIG.value, _CKPT.value, split=_SPLIT.value, out_dir=out, best=_BEST.value
    )
    return 0


if __name__ == "__main__":
    run_absl(main)

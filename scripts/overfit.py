"""The overfit check: train on two synthetic rooms and evaluate on the same rooms.

  python scripts/overfit.py [--config=configs/synthetic.py] [--workdir work_dirs/overfit] \
      [--steps 200] [--min_ap50 0.9] [--config.model.max_candidates=150 ...]

Run it first after any change to the model, the losses or a config: a working model
memorises the two rooms (AP50 >= 0.9). Exits 1 below --min_ap50. The printed per-stage
diagnostics say which stage loses instances. Rerunning resumes from --workdir/train.
"""

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from dknet_jax.cli import check_output_dir, run_absl
from dknet_jax.io_atomic import clean_json, write_json
from dknet_jax.training.overfit import run_overfit

# the default config goes on the command line rather than into the flag: ml_collections
# loads a default config file (and applies the --config.<key> overrides) while the flag is
# defined, before run_absl can report a bad override as one line
if not any(a == "--config" or a.startswith("--config=") for a in sys.argv[1:]):
    sys.argv.insert(
        1,
        "--config="
        + os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "synthetic.py"),
    )
_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "config file (get_config()); default: configs/synthetic.py",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", "work_dirs/overfit", "rooms, checkpoints and logs")
_STEPS = flags.DEFINE_integer(
    "steps", 200, "training steps (one room pair per step)", lower_bound=1
)
_MIN_AP50 = flags.DEFINE_float("min_ap50", 0.9, "exit 1 when AP50 on the rooms is below this")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    check_output_dir(_WORKDIR.value, "--workdir")
    results = run_overfit(_CONFIG.value, _WORKDIR.value, steps=_STEPS.value)
    path = os.path.join(_WORKDIR.value, "overfit.json")
    write_json(path, clean_json(results))
    ap50 = results["instance"].get("all_ap_50%")
    print(json.dumps({"AP50": ap50, "AP": results["instance"].get("all_ap")}))
    print(f"wrote {path}")
    if ap50 is None or ap50 < _MIN_AP50.value:
        print(f"FAILED: AP50 {ap50} < {_MIN_AP50.value} on the memorised rooms", flush=True)
        sys.exit(1)
    print(f"OK: AP50 {ap50:.3f} >= {_MIN_AP50.value}")


if __name__ == "__main__":
    run_absl(main)

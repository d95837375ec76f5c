"""Train DKNet.

  python scripts/train.py --config=configs/scannet.py --workdir work_dirs/scannet \
      [--config.model.candidates=nms ...]

Rerunning the same command resumes from the latest checkpoint in --workdir.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from dknet_jax.cli import check_output_dir, run_absl
from dknet_jax.training.train import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "config file (get_config())", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints and logs go")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint op at INFO
    check_output_dir(_WORKDIR.value, "--workdir")  # created once the data is checked
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    run_absl(main)

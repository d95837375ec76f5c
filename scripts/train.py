"""Train DKNet.

  python scripts/train.py --config=configs/scannet.py --workdir work_dirs/scannet \
      [--config.model.candidates=nms ...]

Rerunning the same command resumes from the latest checkpoint in --workdir.

Several hosts (one process per host, README "Multiple hosts"): the same command on every
host plus ``--coordinator_address=HOST0:PORT --num_processes=N --process_id=I`` (I = 0 on
HOST0), or ``--distributed`` to let JAX detect the cluster (SLURM, Open MPI, ...).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from dknet_jax.cli import check_output_dir, run_absl

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "config file (get_config())", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints and logs go")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    None,
    "multi-host: HOST:PORT of process 0 (reachable from every host); with --num_processes "
    "and --process_id",
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-host: this process, 0..N-1")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "multi-host: start jax.distributed with the cluster JAX detects (SLURM, Open MPI, "
    "mpi4py, Kubernetes, Cloud TPU); the three flags above, when given, take precedence",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint op at INFO
    check_output_dir(_WORKDIR.value, "--workdir")  # created once the data is checked
    # before any JAX computation (the training module builds nothing at import)
    from dknet_jax.training import distributed

    distributed.initialize(
        _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, auto=_DISTRIBUTED.value
    )
    from dknet_jax.training.train import train_and_evaluate

    train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    run_absl(main)

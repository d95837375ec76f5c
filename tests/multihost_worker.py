"""One process of the 2-process CPU training run of ``tests/test_multihost.py``.

  python tests/multihost_worker.py PORT NUM_PROCESSES PROCESS_ID DATA_ROOT WORKDIR [kill]

Starts ``jax.distributed`` on localhost (CPU collectives: gloo), trains the tiny synthetic
config in WORKDIR with ``train_and_evaluate``; ``kill`` raises after the first checkpoint
is saved (a simulated kill, exit code 3) so the test can resume.
"""

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.pop("XLA_FLAGS", None)  # one CPU device per process

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_disable_most_optimizations", True)  # as tests/conftest.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "configs"))


def main(port, num_processes, process_id, root, workdir, *kill):
    from dknet_jax.training import distributed

    distributed.initialize(f"localhost:{port}", int(num_processes), int(process_id))
    assert jax.process_count() == int(num_processes), jax.process_count()
    import synthetic

    from dknet_jax import checkpoint as ckpt_lib
    from dknet_jax.training.train import train_and_evaluate

    if kill:
        real_save = ckpt_lib.Checkpoints.save

        def save_then_die(self, step, *a, **k):
            real_save(self, step, *a, **k)
            raise KeyboardInterrupt("simulated kill")

        ckpt_lib.Checkpoints.save = save_then_die
    config = synthetic.get_config("tiny")
    config.data.root = root
    try:
        train_and_evaluate(config, workdir)
    except KeyboardInterrupt:
        sys.exit(3)


if __name__ == "__main__":
    main(*sys.argv[1:])

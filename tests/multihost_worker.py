"""One process of the 2-process CPU training run of ``tests/test_multihost.py``.

  python tests/multihost_worker.py PORT NUM_PROCESSES PROCESS_ID DATA_ROOT WORKDIR VAL_SPLIT [kill]

Starts ``jax.distributed`` on localhost (CPU collectives: gloo), trains the tiny synthetic
config in WORKDIR with ``train_and_evaluate`` (validation on VAL_SPLIT); ``kill`` raises
after the first checkpoint is saved (a simulated kill, exit code 3) so the test can resume.
"""

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.pop("XLA_FLAGS", None)  # one CPU device per process

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
# as tests/conftest.py: cheap compiles and the persistent cache (the train step itself is
# not cached: it holds a host callback)
jax.config.update("jax_disable_most_optimizations", True)
_HERE = os.path.dirname(os.path.abspath(__file__))
jax.config.update("jax_compilation_cache_dir", os.path.join(_HERE, ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "configs"))


def main(port, num_processes, process_id, root, workdir, val_split, *kill):
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
    config.data.val_split = val_split
    try:
        train_and_evaluate(config, workdir)
    except KeyboardInterrupt:
        sys.exit(3)


if __name__ == "__main__":
    main(*sys.argv[1:])

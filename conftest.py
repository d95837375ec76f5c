"""Shared pytest set-up: CPU-only JAX with a persistent compilation cache (tests compile
many small programs; the cache makes reruns fast and is harmless on a fresh machine)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

_cache = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".jax_cache")
jax.config.update("jax_compilation_cache_dir", _cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
# Tests are dominated by XLA compile time on small shapes; most optimisation passes cost
# more than they save there (the flax examples' tests do the same).
jax.config.update("jax_disable_most_optimizations", True)

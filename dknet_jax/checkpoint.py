"""Checkpoints: orbax ``CheckpointManager`` keeping the last k steps plus the best by
validation mAP; atomic writes (orbax writes to a temporary folder and renames), exact
resume (step, parameters, optimiser state, RNG key, data-iterator state).

Part of the training flow: data -> losses -> optimiser -> **checkpoints**.

Layout under the work dir::

    W/checkpoints/<step>/{state,meta}   last ``keep`` checkpoints
    W/best/<step>/{state,meta}           the single best by ``meta["metric"]``
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpoints:
    """Saves/restores ``(state pytree, meta dict)`` pairs under ``workdir``.

    ``state``: any pytree of arrays (parameters, optimiser state, RNG key data).
    ``meta``: a JSON-serialisable dict (step, data-iterator state, metrics, config).
    """

    def __init__(self, workdir: str, keep: int = 3):
        workdir = os.path.abspath(workdir)
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                            enable_async_checkpointing=False)
        self._latest = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), options=opts)
        best_opts = ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, enable_async_checkpointing=False,
            best_fn=lambda m: m["metric"], best_mode="max")
        self._best = ocp.CheckpointManager(os.path.join(workdir, "best"), options=best_opts)

    def latest_step(self) -> int | None:
        return self._latest.latest_step()

    def save(self, step: int, state: Any, meta: dict, metric: float | None = None) -> None:
        """Save ``state``/``meta`` at ``step``; with ``metric`` also offer it to ``best/``."""
        state = jax.device_get(state)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  meta=ocp.args.JsonSave(meta))
        self._latest.save(step, args=args, force=True)
        if metric is not None:
            args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave({**meta, "metric": metric}))
            self._best.save(step, args=args, metrics={"metric": float(metric)}, force=True)
        self._latest.wait_until_finished()
        self._best.wait_until_finished()

    def restore(self, target: Any, step: int | None = None, best: bool = False):
        """Restore ``(state, meta)``; ``target`` is a pytree with the state's structure
        (arrays or ``jax.ShapeDtypeStruct``). Default: the latest step."""
        mgr = self._best if best else self._latest
        if step is None:
            step = mgr.best_step() if best else mgr.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {mgr.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        out = mgr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        # orbax restores the saved shapes even when the target's differ (a changed config)
        want = jax.tree_util.tree_leaves_with_path(abstract)
        got = jax.tree.leaves(out["state"])
        for (path, a), b in zip(want, got, strict=True):
            if tuple(a.shape) != tuple(b.shape):
                raise ValueError(
                    f"checkpoint {mgr.directory}/{step} does not match the model: "
                    f"{jax.tree_util.keystr(path)} has shape {tuple(b.shape)} there but "
                    f"{tuple(a.shape)} here; use the config it was trained with")
        return out["state"], out["meta"]

    def close(self) -> None:
        self._latest.close()
        self._best.close()


def find_checkpoint_dir(path: str) -> str:
    """Accept a work dir, its ``checkpoints/`` folder, or ``best/``; return the work dir.

    Raises FileNotFoundError with a clear message when nothing is there."""
    path = os.path.abspath(path)
    for cand in (path, os.path.dirname(path)):
        if os.path.isdir(os.path.join(cand, "checkpoints")):
            return cand
    raise FileNotFoundError(
        f"no checkpoints found under {path!r}: pass the --workdir used by scripts/train.py")

"""Checkpoints: orbax ``CheckpointManager`` keeping the last k steps plus the best by
validation mAP; atomic writes (orbax writes to a temporary folder and renames), exact
resume (step, parameters, optimiser state, RNG key, data-iterator state).

Part of the training flow: data -> losses -> optimiser -> **checkpoints**.

This module is the one home of the on-disk layout. Under the work dir::

    W/checkpoints/<step>/{state,meta}   last ``keep`` checkpoints
    W/best/<step>/{state,meta}           the single best by ``meta["metric"]``

``state`` is :func:`train_state`'s dict (``params``, ``rest`` = BatchNorm statistics and
other non-parameter model state, ``opt`` = optimiser state, ``key`` = RNG key); ``meta`` is
JSON: ``step``, ``data`` (iterator state), ``best``, ``config`` (the training config as
JSON, read back by :func:`config_from_meta`) and, in ``best/``, ``metric``. Inference
(:func:`restore_model`) reads ``params`` and ``rest`` only, without building an optimiser.

Unreadable steps (truncated/missing files) raise ``CorruptCheckpointError``; a checkpoint
whose arrays differ from the target (another config) raises ``CheckpointMismatchError``.
``restore_latest_readable`` (training resume) moves corrupt steps aside to
``checkpoints/<step>.corrupt`` and falls back to the newest readable one.

Multi-host (``jax.distributed``): every process builds ``Checkpoints`` on the same work
dir (a filesystem all hosts see) and calls ``save`` and ``restore`` in step; orbax writes
each file once (from process 0) and synchronises the processes itself. The folder moves
done here (a corrupt step, a replaced ``best/`` step) are made by process 0 only, with a
barrier before anyone reads the folder again.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from dknet_jax.config import base_config

STATE_KEYS = ("params", "rest", "opt", "key")


def train_state(params, rest, opt, key) -> dict:
    """The pytree a checkpoint's ``state`` item holds (see the module docstring)."""
    return dict(zip(STATE_KEYS, (params, rest, opt, key), strict=True))


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the step and what to do."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint is readable but its arrays do not match the target (another config)."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint step cannot be read (truncated, missing or undecodable files)."""


def _flat_shapes(tree) -> dict:
    return {k: tuple(v.shape) for k, v in ocp.tree.to_flat_dict(tree).items()}


def _differences(want: dict, have: dict) -> list[str]:
    """``want``/``have``: flat {path tuple: shape}; human-readable differences."""
    name = "/".join
    out = [f"{name(k)}: missing from the checkpoint" for k in want if k not in have]
    out += [f"{name(k)}: in the checkpoint but not in the model" for k in have if k not in want]
    out += [
        f"{name(k)} has shape {have[k]} there but {want[k]} here"
        for k in want
        if k in have and want[k] != have[k]
    ]
    return out


def _corrupt(where: str, what: str, err: Exception) -> CorruptCheckpointError:
    reason = " ".join(str(err).split())[:300]
    return CorruptCheckpointError(
        f"checkpoint {where} is corrupt or incomplete ({what}: {type(err).__name__}: "
        f"{reason}); delete or move that step folder aside and use an older step, or retrain"
    )


def _unreadable(where: str) -> Exception | None:
    """Read every key of the step's ``state`` database synchronously; the first error, or
    None when all can be read (or the item is not an OCDBT database, left to orbax).

    Why before orbax: orbax reads a step's arrays as asyncio tasks on a loop it closes on
    the first failure; the reads still in flight then complete into the closed loop and
    print ``Event loop is closed`` tracebacks at exit, after our clear error. Here every
    read is waited for, so a corrupt step fails with nothing left running. Costs one extra
    read of the step's files (from the page cache for the restore that follows)."""
    state = os.path.join(where, "state")
    if not os.path.exists(os.path.join(state, "manifest.ocdbt")):
        return None
    try:
        kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{state}/"}).result()
        reads = [kv.read(k) for k in kv.list().result()]
    except Exception as e:  # noqa: BLE001 - the manifest or the tree cannot be read
        return e
    first = None
    for r in reads:  # wait for every read, whatever fails
        try:
            if r.result().state != "value":
                first = first or FileNotFoundError(f"a listed key of {state} is missing")
        except Exception as e:  # noqa: BLE001 - tensorstore raises ValueError and others
            first = first or e
    return first


def _mismatch(where: str, diffs: list[str]) -> CheckpointMismatchError:
    more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
    if all(d.startswith("opt/") for d in diffs):
        return CheckpointMismatchError(
            f"checkpoint {where}: its optimiser state does not match this version's "
            f"optimiser ({diffs[0]}{more}). Since 2026-12-03 the AdamW moments are stored "
            f"as flat vectors (training/optim.py, optax.flatten); a checkpoint written "
            f"before cannot resume training, but its parameters still evaluate and "
            f"predict (scripts/evaluate.py, scripts/predict.py)"
        )
    return CheckpointMismatchError(
        f"checkpoint {where} does not match the network built from the config: "
        f"{diffs[0]}{more}; use the config it was trained with "
        f"(--config=configs/<name>.py)"
    )


def _sync(name: str) -> None:
    """A barrier across processes (nothing for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"dknet_checkpoint:{name}")


def _aside(path: str, suffix: str) -> str:
    """Rename ``path`` to a free ``path + suffix[.n]`` (ignored by orbax); return it.
    Several processes: process 0 renames, the others wait for it (all must call this)."""
    dst, n = path + suffix, 1
    while os.path.exists(dst):
        dst, n = f"{path}{suffix}.{n}", n + 1
    if jax.process_index() == 0:
        os.rename(path, dst)
    _sync("aside")  # the same name on every host, whatever its mount point
    return dst


class Checkpoints:
    """Saves/restores ``(state pytree, meta dict)`` pairs under ``workdir``.

    ``state``: any pytree of arrays (parameters, optimiser state, RNG key data).
    ``meta``: a JSON-serialisable dict (step, data-iterator state, metrics, config).
    """

    def __init__(self, workdir: str, keep: int = 3):
        workdir = os.path.abspath(workdir)
        opts = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False
        )
        self._latest = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), options=opts)
        best_opts = ocp.CheckpointManagerOptions(
            max_to_keep=1,
            create=True,
            enable_async_checkpointing=False,
            best_fn=lambda m: m["metric"],
            best_mode="max",
        )
        best_dir = os.path.join(workdir, "best")
        if jax.process_index() == 0:
            _recover_replaced(best_dir)
        _sync("recover")
        self._best = ocp.CheckpointManager(best_dir, options=best_opts)

    def latest_step(self) -> int | None:
        return self._latest.latest_step()

    def save(self, step: int, state: Any, meta: dict, metric: float | None = None) -> None:
        """Save ``state``/``meta`` at ``step``; with ``metric`` also offer it to ``best/``."""
        state = jax.tree.map(np.asarray, state)  # replicated (multi-host) arrays too
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self._latest.save(step, args=args, force=True)
        if metric is not None:
            args = ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                meta=ocp.args.JsonSave({**meta, "metric": metric}),
            )
            # a resumed run can reach a step that best/ already holds (from the run it
            # replaces): move the old one aside, save, then delete it (killed in between,
            # the next Checkpoints() puts it back if the new one is missing)
            old = None
            if step in self._best.all_steps():
                old = _aside(os.path.join(str(self._best.directory), str(step)), ".replaced")
                self._best.reload()
                print_ = print if jax.process_index() == 0 else (lambda *a, **k: None)
                print_(
                    f"note: best/{step} from an earlier run is replaced by this run's step {step}",
                    file=sys.stderr,
                    flush=True,
                )
            self._best.save(step, args=args, metrics={"metric": float(metric)}, force=True)
            self._best.wait_until_finished()
            if old is not None and jax.process_index() == 0:
                shutil.rmtree(old, ignore_errors=True)
        self._latest.wait_until_finished()
        self._best.wait_until_finished()

    def restore(
        self,
        target: Any,
        step: int | None = None,
        best: bool = False,
        *,
        files_checked: bool = False,
    ):
        """Restore ``(state, meta)``; ``target`` is a pytree with the state's structure
        (arrays or ``jax.ShapeDtypeStruct``). Default: the latest step.
        ``files_checked``: the caller has already read the step's files (``_unreadable``).

        Raises CheckpointMismatchError when the arrays differ from ``target`` (another
        config) and CorruptCheckpointError when the step cannot be read."""
        mgr = self._best if best else self._latest
        if step is None:
            step = mgr.best_step() if best else mgr.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {mgr.directory}")
        where = f"{mgr.directory}/{step}"
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        err = None if files_checked else _unreadable(where)
        if err is not None:
            raise _corrupt(where, "a file is truncated or missing", err) from None
        # Shapes first, from the saved metadata: a restore into other shapes fails inside
        # orbax's asynchronous reads, whose abandoned coroutines print tracebacks to stderr
        # at exit, after our clear error.
        diffs = self._metadata_diffs(where, abstract)
        if diffs:
            raise _mismatch(where, diffs)
        try:
            out = mgr.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
                ),
            )
        except Exception as e:  # noqa: BLE001 - classified below, orbax's stack dropped
            raise self._classify(where, abstract, e) from None
        # orbax restores the saved shapes even when the target's differ (a changed config)
        diffs = _differences(_flat_shapes(abstract), _flat_shapes(out["state"]))
        if diffs:
            raise _mismatch(where, diffs)
        return out["state"], out["meta"]

    @staticmethod
    def _metadata_diffs(where: str, abstract: Any) -> list[str]:
        """Differences between the saved tree's metadata and the target; [] when they
        agree or when the metadata cannot be read (the restore then reports it)."""
        try:
            meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(where) / "state")
            return _differences(_flat_shapes(abstract), _flat_shapes(meta.tree))
        except Exception:  # noqa: BLE001 - the metadata itself is unreadable
            return []

    @classmethod
    def _classify(cls, where: str, abstract: Any, err: Exception) -> ValueError:
        """Why restoring ``where`` failed: the tree metadata differs from the target (a
        config mismatch) or the step's files cannot be read (corruption)."""
        diffs = cls._metadata_diffs(where, abstract)
        if diffs:
            return _mismatch(where, diffs)
        return _corrupt(where, "a file is truncated or missing", err)

    def restore_latest_readable(self, target: Any, log: Callable[[str], None] | None = None):
        """Resume: restore the newest readable step of ``checkpoints/``. Corrupt steps are
        renamed to ``checkpoints/<step>.corrupt`` (kept for inspection, ignored from then
        on) with a warning; a config mismatch is raised as is. Returns ``(state, meta)``;
        FileNotFoundError when there is no step, CorruptCheckpointError when none is
        readable."""
        log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        bad = []
        for step in sorted(self._latest.all_steps(), reverse=True):
            try:
                return self.restore(target, step=step)
            except CorruptCheckpointError as e:
                path = os.path.join(str(self._latest.directory), str(step))
                moved = _aside(path, ".corrupt")
                self._latest.reload()
                bad.append(moved)
                log(
                    f"warning: {e}\nwarning: moved it to {moved}; falling back to the "
                    f"previous checkpoint"
                )
        if bad:
            raise CorruptCheckpointError(
                f"no readable checkpoint in {self._latest.directory}: all steps are corrupt "
                f"(moved to {', '.join(bad)}); delete the work dir to train from scratch"
            )
        raise FileNotFoundError(f"no checkpoint in {self._latest.directory}")

    def close(self) -> None:
        self._latest.close()
        self._best.close()


def _recover_replaced(best_dir: str) -> None:
    """Finish a best/ replacement that was killed midway (see ``Checkpoints.save``)."""
    if not os.path.isdir(best_dir):
        return
    for name in os.listdir(best_dir):
        step, _, rest = name.partition(".")
        if step.isdigit() and rest.startswith("replaced"):
            path = os.path.join(best_dir, name)
            if os.path.exists(os.path.join(best_dir, step)):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.rename(path, os.path.join(best_dir, step))


def find_checkpoint_dir(path: str) -> str:
    """Accept a work dir, its ``checkpoints/`` folder, or ``best/``; return the work dir.

    Raises FileNotFoundError with a clear message when nothing is there."""
    path = os.path.abspath(path)
    for cand in (path, os.path.dirname(path)):
        if os.path.isdir(os.path.join(cand, "checkpoints")):
            return cand
    raise FileNotFoundError(
        f"no checkpoints found under {path!r}: pass the --workdir used by scripts/train.py"
    )


def resolve(path: str) -> tuple[str, bool, int | None]:
    """(work dir, use ``best/``, step or None) for a work dir, its ``checkpoints/`` or
    ``best/`` folder, or one step folder inside them."""
    path = os.path.abspath(path).rstrip(os.sep)
    step = None
    base, parent = os.path.basename(path), os.path.dirname(path)
    if (
        base.isdigit()
        and os.path.basename(parent) in ("checkpoints", "best")
        and os.path.isdir(parent)
    ):
        step, path = int(base), parent
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"checkpoint not found: {path} (pass the --workdir of "
            f"scripts/train.py, or its checkpoints/ or best/ folder)"
        )
    best = os.path.basename(path) == "best"
    workdir = os.path.dirname(path) if best else find_checkpoint_dir(path)
    return workdir, best, step


def list_steps(folder: str) -> list[int]:
    """Sorted step numbers of the step folders in ``folder`` (``checkpoints/`` or
    ``best/``); [] when it does not exist."""
    if not os.path.isdir(folder):
        return []
    return sorted(
        int(d) for d in os.listdir(folder) if d.isdigit() and os.path.isdir(os.path.join(folder, d))
    )


def read_meta(folder: str, step: int) -> dict:
    """The JSON ``meta`` item of ``<folder>/<step>``, read without the state (so the config
    that builds the restore target is known first)."""
    path = os.path.join(folder, str(step), "meta")
    try:
        return dict(ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(path))
    except Exception as e:  # orbax raises several types for a missing/corrupt item
        raise ValueError(
            f"cannot read the checkpoint meta {path} ({type(e).__name__}: "
            f"{e}); is this a work dir of scripts/train.py?"
        ) from e


def _merge(dst: ml_collections.ConfigDict, src: dict, prefix: str, unknown: list) -> None:
    for key, value in src.items():
        name = f"{prefix}{key}"
        if key not in dst:
            unknown.append(name)
        elif isinstance(dst[key], ml_collections.ConfigDict):
            if isinstance(value, dict):
                _merge(dst[key], value, name + ".", unknown)
            else:
                unknown.append(name)
        elif isinstance(dst[key], tuple) and isinstance(value, list):
            dst[key] = tuple(value)
        elif isinstance(dst[key], float) and isinstance(value, int):
            dst[key] = float(value)
        else:
            dst[key] = value


def config_from_meta(
    meta: dict, log: Callable[[str], None] = print
) -> ml_collections.ConfigDict | None:
    """The training config saved in a checkpoint's meta (``meta["config"]``: the JSON of
    ``config.to_json_best_effort()``, or a dict), merged into ``base_config()`` so every
    field has its schema type; keys the schema no longer has are dropped with a note.
    Returns None when the meta holds no config."""
    raw = meta.get("config") if isinstance(meta, dict) else None
    if raw is None:
        return None
    values = json.loads(raw) if isinstance(raw, str) else dict(raw)
    config = base_config()
    unknown: list[str] = []
    _merge(config, values, "", unknown)
    if unknown:
        log(
            f"note: checkpoint config keys not in this version's schema were ignored: "
            f"{', '.join(unknown[:8])}"
        )
    return config


def _abstract_leaf(leaf):
    """A ShapeDtypeStruct for one leaf of orbax's saved-tree metadata."""
    return jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype)


def restore_model(workdir: str, step: int, best: bool, params: Any, rest: Any):
    """Restore the model part (``params``, ``rest``) of step ``step`` of ``checkpoints/``
    (or ``best/``). ``params`` / ``rest``: the model's trees (arrays or ShapeDtypeStruct).
    The optimiser state and key are restored as saved (their shapes come from the step's
    own metadata) and dropped, so inference needs no optimiser. Returns
    ``(params, rest, meta)``; raises CheckpointMismatchError / CorruptCheckpointError."""
    where = os.path.join(workdir, "best" if best else "checkpoints", str(step))
    err = _unreadable(where)
    if err is not None:
        raise _corrupt(where, "a file is truncated or missing", err) from None
    try:
        saved = ocp.PyTreeCheckpointHandler().metadata(epath.Path(where) / "state").tree
        others = {k: jax.tree.map(_abstract_leaf, saved[k]) for k in ("opt", "key")}
    except Exception as e:  # noqa: BLE001 - unreadable metadata: the step is corrupt
        raise _corrupt(where, "its metadata cannot be read", e) from None
    ckpt = Checkpoints(workdir)
    try:
        state, meta = ckpt.restore(
            train_state(params, rest, others["opt"], others["key"]),
            step=step,
            best=best,
            files_checked=True,  # read above, before the metadata
        )
    finally:
        ckpt.close()
    return state["params"], state["rest"], meta

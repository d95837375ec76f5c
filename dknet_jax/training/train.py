"""Training: ``train_and_evaluate(config, workdir)``, the whole loop as flat functions.

Data flow: TrainIterator (bucketed, augmented PointBatch) -> one jit-compiled train step
[DKNet forward -> objective (stage-gated Eq. 8; mask loss chunked over points unless
``config.model.chunked_mask_loss=False``) -> grads -> AdamW] -> JSON-lines log,
progress bar, periodic validation (mAP) and orbax checkpoints (last k + best), resumed
exactly after a kill (step, parameters, optimiser state, RNG key, data-iterator state).

Memory levers (docs/benchmarks.md, "Training step memory"): ``config.train.precision``
("bf16": the sparse UNet's activations in bfloat16, set on the merged model inside the
step, so evaluation stays f32) and ``config.model.remat`` (rematerialisation in the UNet).

Data parallelism: with several local devices the point axis of each batch is sharded over
a 1-D ``data`` mesh and parameters are replicated; XLA's SPMD partitioner inserts the
collectives, so the result equals the single-device computation (BatchNorm statistics
are global over the batch, as on one device).

Multi-host (``jax.distributed`` started by ``scripts/train.py``): each process loads its
share of every global batch and the global batch is assembled across processes
(``training.distributed``); process 0 logs, evaluates and prints, every process takes
part in checkpoint saves (written once) and restores its state from the same folder.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from dknet_jax.checkpoint import Checkpoints, train_state
from dknet_jax.config import ConfigError, is_overflow_safe, overflow_safe, validate
from dknet_jax.data import pipeline
from dknet_jax.data.dataset import SceneError, list_scenes
from dknet_jax.inference import evaluate as ev
from dknet_jax.inference.diagnostics import format_summary
from dknet_jax.io_atomic import clean_json
from dknet_jax.model import abstract_model, build_model, count_params
from dknet_jax.objective import compute_losses, loss_weights
from dknet_jax.objective.terms import mask_gate_threshold, stage_gates
from dknet_jax.training import distributed as dist
from dknet_jax.training.optim import make_optimizer


class TrainStep:
    """One training step, ``step(params, rest, opt_state, batch, key, epoch) -> (params,
    rest, opt_state, metrics)``, run as two compiled functions:

    - :attr:`grads` ``(params, rest, batch, key, epoch) -> (grads, new_rest, metrics)``:
      DKNet forward, objective and gradients; compiled once per batch shape (bucket);
    - :attr:`update` ``(params, rest, opt_state, grads, new_rest, loss) -> (params, rest,
      opt_state, metrics)``: gradient norm, the non-finite guard and AdamW; its shapes
      are the parameters', so it compiles once per run.

    Inside one function the optimiser cost every batch shape ~280 of the step's ~1,860
    compiled kernels (one per parameter leaf: XLA compiles identical kernels once, and
    the leaves' slices of the flat AdamW vector are all different), about 5 s of each
    shape's compile on the CPU (docs/benchmarks.md, "Train-step compile time"). The
    numbers are the same as one function's: the update reads the gradients the first
    function wrote.
    """

    def __init__(self, graphdef, tx, config, mesh: Mesh | None = None):
        weights = loss_weights(config.loss)
        t, m = config.train, config.model

        def grads_fn(params, rest, batch, key, epoch):
            def loss_fn(p, r):
                model = nnx.merge(graphdef, p, r, copy=True)
                model.train()
                # bf16 activations in the UNet (static attribute; f32 params and statistics)
                model.backbone.precision = t.precision
                # chunked: no [M, N] mask logits; compute_losses decodes chunk by chunk
                out = model(batch, key=key, decode_masks=not m.chunked_mask_loss)
                gates = stage_gates(
                    epoch, heatmap_epoch=t.stage_heatmap_epoch, mask_epoch=t.stage_mask_epoch
                )
                with jax.named_scope("losses"):
                    total, metrics = compute_losses(
                        out,
                        batch,
                        weights=weights,
                        gates=gates,
                        num_classes=m.num_classes,
                        offset_direction=m.offset_direction_loss,
                        mask_iou_threshold=mask_gate_threshold(
                            epoch, config.loss.mask_iou_threshold, config.loss.mask_iou_gate_epoch
                        ),
                        mask_iou_fallback=config.loss.mask_iou_fallback,
                        aggregation_loss=m.aggregation != "none",
                        mask_chunk=m.mask_chunk,
                    )
                metrics["voxel_overflow"] = out.voxel_overflow.astype(jnp.float32)
                metrics["pool_exhausted"] = jnp.sum(out.pool_exhausted).astype(jnp.float32)
                metrics["instance_overflow"] = jnp.sum(out.instance_overflow).astype(jnp.float32)
                new_rest = nnx.split(model, nnx.Param, ...)[2]
                return total, (metrics, new_rest)

            (_, (metrics, new_rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, rest
            )
            return grads, new_rest, metrics

        def update_fn(params, rest, opt_state, grads, new_rest, loss):
            # one norm over the raveled gradient (a reduction per leaf would be ~400 kernels)
            grad_norm = jnp.linalg.norm(ravel_pytree(grads)[0])
            # a non-finite step (e.g. a capacity overflow) leaves the state untouched; the
            # host loop reports it with a clear error instead of training on NaN. One cond
            # around the update, not a select per leaf: ~430 fewer kernels to compile.
            ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

            def commit(_):
                updates, new_opt = tx.update(grads, opt_state, params)
                return optax.apply_updates(params, updates), new_rest, new_opt

            state = lax.cond(ok, commit, lambda _: (params, rest, opt_state), None)
            metrics = {"grad_norm": grad_norm, "skipped": (~ok).astype(jnp.float32)}
            return (*state, metrics)

        if mesh is None:
            self.grads = jax.jit(grads_fn)
            self.update = jax.jit(update_fn, donate_argnums=(0, 1, 2))
        else:
            rep = NamedSharding(mesh, PartitionSpec())
            self.grads = jax.jit(grads_fn, out_shardings=(rep, rep, rep))
            self.update = jax.jit(
                update_fn, donate_argnums=(0, 1, 2), out_shardings=(rep, rep, rep, rep)
            )

    def __call__(self, params, rest, opt_state, batch, key, epoch):
        grads, new_rest, metrics = self.grads(params, rest, batch, key, epoch)
        params, rest, opt_state, more = self.update(
            params, rest, opt_state, grads, new_rest, metrics["loss"]
        )
        return params, rest, opt_state, {**metrics, **more}


def make_train_step(graphdef, tx, config, mesh: Mesh | None = None) -> TrainStep:
    """The :class:`TrainStep` of a model (``graphdef``), optimiser ``tx`` and config; with
    ``mesh``, batches sharded over its ``data`` axis and the state replicated."""
    return TrainStep(graphdef, tx, config, mesh)


def shard_batch(batch, mesh: Mesh | None):
    """Put a numpy PointBatch on the devices: point-axis arrays split over ``data``."""
    if mesh is None:
        return jax.device_put(batch)
    n = batch.valid.shape[0]
    pts = NamedSharding(mesh, PartitionSpec("data"))
    rep = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: jax.device_put(x, pts if x.shape[:1] == (n,) else rep), batch)


def _log(path: str, record: dict) -> None:
    if not dist.is_primary():
        return
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(path: str, step: int) -> float:
    """Drop the rows of ``metrics.jsonl`` past ``step`` (the step training restarts from).

    A run killed after its last checkpoint logged steps that the resumed run logs again;
    keeping only rows with ``"step" <= step`` (and dropping an unparseable last line of a
    killed write) leaves one clean curve. The file is rewritten through a temporary file
    and a rename. Returns the ``time`` of the last kept row (0.0 if none), so the resumed
    run's ``time`` continues from it instead of jumping back.
    """
    if not os.path.isfile(path):
        return 0.0
    kept, last_time = [], 0.0
    with open(path) as fh:
        for line in fh:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
                last_time = float(record.get("time", last_time))
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        fh.writelines(kept)
    os.replace(tmp, path)
    return last_time


def _validation_scenes(root: str, split: str) -> list[str]:
    """Scenes of the validation split; [] for an empty split list or folder (a missing
    split is `list_scenes`' error, raised before any training)."""
    folder = os.path.join(root, split)
    if os.path.isdir(folder) and not any(f.endswith(".npz") for f in os.listdir(folder)):
        return []
    return list_scenes(root, split)


def _remove_empty_dirs(top: str) -> None:
    """Remove ``top`` and the folders under it that hold no file (bottom-up)."""
    for d, _, _ in sorted(os.walk(top), key=lambda x: -len(x[0])):
        try:
            os.rmdir(d)
        except OSError:
            pass  # holds a file (or is gone)


def train_and_evaluate(config, workdir: str) -> dict:
    """Train ``config`` in ``workdir`` (resuming if it holds checkpoints); returns the last
    validation results (or {} if none ran).

    A run that created ``workdir`` and stops before writing anything (a scene that cannot
    be read at the first batch, Ctrl-C while compiling) removes the empty folders it
    created, so a failed start leaves no empty work dir. See `_train_and_evaluate`."""
    created = not os.path.exists(workdir)
    try:
        return _train_and_evaluate(config, workdir)
    except BaseException:
        if created:
            _remove_empty_dirs(workdir)
        raise


def _train_and_evaluate(config, workdir: str) -> dict:
    """Train ``config`` in ``workdir`` (resuming if it holds checkpoints); returns the last
    validation results (or {} if none ran).

    An empty validation split (e.g. a 0-byte ``val.txt``) warns at the start and skips the
    periodic evaluation (checkpoints are still saved; ``best/`` stays empty); a missing
    one is an error before training. On resume, ``metrics.jsonl`` rows past the restored
    step are dropped (`truncate_log`)."""
    validate(config)
    d, t = config.data, config.train
    primary = dist.is_primary()
    say = print if primary else (lambda *a, **k: None)
    # the data is checked before the work dir is created (a typo in the data root leaves
    # no empty work dir behind)
    train_paths = list_scenes(d.root, d.train_split)
    if not train_paths:
        raise SceneError(
            f"{d.root}: training split {d.train_split!r} is empty; prepare "
            f"scenes into it (scripts/prepare_*.py) or set config.data.train_split"
        )
    procs = jax.process_count()
    if d.batch_size % procs:
        raise ConfigError(
            f"config.data.batch_size={d.batch_size} (the global batch) does not divide by "
            f"the {procs} processes: each process loads an equal share of every batch; "
            f"use a multiple of {procs}"
        )
    # before any training: a missing split is an error now, not after the first epoch;
    # an empty one trains without evaluation (instead of logging NaN metrics)
    has_val = bool(_validation_scenes(d.root, d.val_split))
    os.makedirs(workdir, exist_ok=True)
    say("Resolved config:\n" + str(config), flush=True)
    if not has_val and primary:
        warnings.warn(
            f"no validation scenes in {os.path.join(d.root, d.val_split)} (split "
            f"{d.val_split!r} of {d.root} is empty): training runs without evaluation; "
            f"best/ will not be written. Prepare the split or set config.data.val_split",
            stacklevel=2,
        )
    steps_per_epoch = t.steps_per_epoch or max(len(train_paths) // d.batch_size, 1)
    total_steps = t.epochs * steps_per_epoch
    graphdef, params, rest = build_model(config)
    say(f"DKNet parameters: {count_params(nnx.merge(graphdef, params, rest)):,}", flush=True)
    tx, schedule = make_optimizer(t, total_steps, steps_per_epoch)
    opt_state = tx.init(params)
    key = jax.random.PRNGKey(config.seed)

    ckpt = Checkpoints(workdir, keep=t.keep_checkpoints)
    step, data_state, best = 0, None, float("-inf")
    if ckpt.latest_step() is not None:
        target = train_state(params, rest, opt_state, key)
        state, meta = ckpt.restore_latest_readable(target)  # skips corrupt steps
        params, rest, opt_state = state["params"], state["rest"], state["opt"]
        key = state["key"]
        step, data_state = int(meta["step"]), meta["data"]
        best = float(meta["best"]) if meta.get("best") is not None else best
        say(f"Resumed from step {step} in {workdir}", flush=True)

    # one process: shard 0 of 1 (the whole batch); multi-host: this process's share
    it = pipeline.train_iterator(
        train_paths,
        config,
        num_workers=1,
        prefetch=d.prefetch,
        state=data_state,
        num_shards=procs,
        shard_index=jax.process_index(),
    )
    mesh = dist.global_mesh()
    if procs > 1:
        # every process holds the same values (same seed or the same checkpoint)
        params, rest, opt_state = dist.replicate((params, rest, opt_state), mesh)
        say(f"multi-host: {procs} processes, {len(jax.devices())} devices", flush=True)
    train_step = make_train_step(graphdef, tx, config, mesh)
    log_path = os.path.join(workdir, "metrics.jsonl")
    # rows past the restored step (logged after the last checkpoint of a killed run) are
    # logged again below; time continues from the last kept row
    time_offset = truncate_log(log_path, step) if primary else 0.0
    shapes: set = set()
    last_eval: dict = {}
    pbar = tqdm(
        total=total_steps,
        initial=step,
        desc="train",
        unit="step",
        disable=not primary
        or (not sys.stderr.isatty() and os.environ.get("DKNET_PROGRESS") != "1"),
    )
    acc: dict = {}
    overflows, reruns, safe_step = 0, 0, None
    t_start = time.time() - time_offset
    while step < total_steps:
        batch = next(it)
        epoch = step // steps_per_epoch
        key, sub = jax.random.split(key)
        if procs > 1:
            # host values (numpy) are replicated global inputs in a multi-process jit
            args = (dist.global_batch(batch, mesh), np.asarray(sub), np.int32(epoch))
        else:
            args = (shard_batch(batch, mesh), sub, jnp.int32(epoch))
        shapes.add(tuple(args[0].valid.shape) + tuple(args[0].instance_class.shape))
        params, rest, opt_state, metrics = train_step(params, rest, opt_state, *args)
        step += 1
        pbar.update(1)
        metrics = dist.to_host(metrics)
        if metrics["voxel_overflow"] > 0 and not is_overflow_safe(config):
            # a UNet level or its conv tiles overflowed and the step left the state
            # untouched: the same batch again with room for everything (compiled once, on
            # the first such batch); a frequent rerun means the capacities are too tight
            if safe_step is None:
                safe = overflow_safe(config)
                safe_step = make_train_step(abstract_model(safe)[0], tx, safe, mesh)
            reruns += 1
            if primary and reruns in (1, 10, 100, 1000):
                warnings.warn(
                    f"step {step}: a UNet level or its conv tiles overflowed (batch of "
                    f"{batch.valid.shape[0]} points); reran it with "
                    f"model.level_capacity_ratio=1.0 and model.tile_fallback=True "
                    f"({reruns} such batches so far; frequent reruns cost time: raise "
                    f"config.model.level_capacity_ratio or config.model.pairs_per_voxel)",
                    stacklevel=1,
                )
            params, rest, opt_state, metrics = safe_step(params, rest, opt_state, *args)
            metrics = dist.to_host(metrics)
        if metrics["voxel_overflow"] > 0:
            # only the voxel key space (or non-finite features) is left: the step left the
            # state untouched; a rare one costs one batch, a frequent one is an error
            overflows += 1
            msg = (
                f"voxel overflow at step {step} (batch of {batch.valid.shape[0]} points) "
                f"with model.level_capacity_ratio=1.0 and model.tile_fallback=True: the "
                f"voxel key space (a scene spans too many voxels: crop it or raise "
                f"config.data.voxel_size) or non-finite features"
            )
            if overflows > max(5, step // 20):
                raise RuntimeError(f"{msg} ({overflows} overflowing batches so far)")
            if primary:
                warnings.warn(msg + "; batch skipped", stacklevel=1)
        elif metrics["skipped"] > 0:
            raise FloatingPointError(
                f"non-finite loss/gradient at step {step} (loss={metrics['loss']}); the update "
                f"was skipped. Lower config.train.lr or set config.train.grad_clip"
            )
        for name, value in metrics.items():
            acc.setdefault(name, []).append(float(value))
        if step % t.log_every == 0 or step == total_steps:
            record = {
                "step": step,
                "epoch": epoch,
                "lr": float(schedule(step)),
                "compiled_shapes": len(shapes),
                "time": time.time() - t_start,
            }
            record.update({k: float(np.mean(v)) for k, v in acc.items()})
            acc = {}
            _log(log_path, record)
            pbar.set_postfix(loss=f"{record['loss']:.3f}")
            say(
                " ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in record.items()
                ),
                flush=True,
            )
        end_of_epoch = step % steps_per_epoch == 0
        do_eval = (end_of_epoch and ((epoch + 1) % t.eval_every_epochs == 0)) or step == total_steps
        if do_eval or step % t.ckpt_every_steps == 0:
            metric = None
            if do_eval and has_val:
                # process 0 evaluates on its own devices; the others wait for its metric
                if primary:
                    host = (params, rest)
                    if procs > 1:  # local copies of the replicated global arrays
                        host = jax.device_put(dist.to_host(host), jax.local_devices()[0])
                    last_eval = ev.evaluate_split(
                        graphdef, *host, config, split=d.val_split, progress=False
                    )
                    metric = ev.headline(last_eval)
                metric = dist.broadcast(metric if primary else 0.0)
                metric = None if np.isnan(metric) else metric
                if primary:
                    _log(
                        log_path,
                        clean_json(
                            {
                                "step": step,
                                "epoch": epoch,
                                "val": last_eval["instance"],
                                "val_miou": last_eval["semantic"].get("miou"),
                                "diagnostics": last_eval["diagnostics"],
                            }
                        ),
                    )
                    if "table" in last_eval:
                        print(last_eval["table"], flush=True)
                    print(format_summary(last_eval["diagnostics"]), flush=True)
                best = max(best, metric) if metric is not None else best
            state = train_state(params, rest, opt_state, key)
            meta = {
                "step": step,
                "data": it.state(),
                "best": best if best > -1e30 else None,
                "config": config.to_json_best_effort(),
            }
            ckpt.save(step, state, meta, metric=metric)
    pbar.close()
    ckpt.close()
    it.close()
    return last_eval

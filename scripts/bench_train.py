"""Training-step benchmark: warm step time, compile time, peak memory, compile count.

Place in the data flow: a standalone measurement of the whole training path
(``pipeline.train_iterator`` -> ``training.train.make_train_step`` [DKNet forward ->
objective -> AdamW]) on synthetic rooms, for ``docs/benchmarks.md`` ("Training step").

    python scripts/bench_train.py               # ScanNet config, batch 4, 8 ScanNet-sized rooms
    python scripts/bench_train.py --quick       # synthetic config, small rooms, batch 2 (CPU)
    python scripts/bench_train.py --gpu_budget  # 4 rooms, 3 timed steps: ~2 minutes on a GPU
    python scripts/bench_train.py --quick --compare_mask_loss  # + XLA memory of both losses
    python scripts/bench_train.py --config=configs/scannet.py --config.model.candidates=nms
    python scripts/bench_train.py --scenes 4 --levers   # XLA memory per memory lever, compile only

Config: ``--config=<file>[:<arg>]`` (default ``configs/scannet.py``; with ``--quick``
``configs/synthetic.py``; a relative path is also looked up from the repository root) and
``--config.<key>=<value>`` overrides, as in ``scripts/train.py``.

Data: synthetic rooms (room i drawn from ``default_rng([0, i])``, as ``make_synthetic.py``
does), prepared through ``prepare_scannet``'s code and cached as
``<cache>/scene<NNNN>_00.npz`` (``dknet_jax.benchmarking.synthetic_scenes``).
``--data_dir`` uses already prepared scenes instead (``prepare_scannet.py`` output; its
``train/`` folder or split list if present).

Measured (model from ``--config``, randomly initialised, weights updated by every step):
- compile: ``jit(step).lower(...).compile()`` wall time for the first batch shape
  (the later ``jit`` call reuses that executable), and XLA's memory analysis of it;
- mask loss: ``config.model.chunked_mask_loss`` (default True: the loss decodes the masks
  chunk by chunk, no f32[M, N] logits; ``--mask_loss dense`` or
  ``--config.model.chunked_mask_loss=false`` for the dense path); ``--compare_mask_loss``
  also compiles the step with the other path and reports both XLA memory estimates;
- warm step: median over ``--steps`` steps on one device-resident batch (no input
  pipeline in the timing) after one untimed step;
- stage gates: the timed steps cycle through the first epoch of each of the three loss
  stages (semantic+offset, +heatmap+aggregation, +mask; ``--no_stages``: mask stage only)
  with the same jit function, whose cache size must stay 1 (the gates are traced);
- epoch: one pass of the iterator (augmentation, packing, transfer, steps) over all
  scenes, the distinct (points, instances) batch shapes and the compiles it caused;
- ``--levers``: compile only (nothing runs), one line per memory lever on the same rooms:
  the config as given but without the levers (``model.remat="none"``,
  ``train.precision="f32"``, powers-of-2 point buckets), then each lever alone
  (``+remat`` = ``--lever_remat``, default "block"; ``+bf16``; ``+ladder`` = the x{1, 1.5}
  point buckets, which changes the batch's row bucket) and all of them; XLA's memory
  estimate, the row bucket and its fill, and the compile time of each;
- peak memory: host ``ru_maxrss``; device ``memory_stats()["peak_bytes_in_use"]`` when
  the backend reports it (GPU).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from dknet_jax.benchmarking import (
    GiB,
    available_gib,
    bench_config,
    bench_scenes,
    cache_size,
    compiled_gib,
    device_line,
    device_peak_gib,
    flag_given,
    host_peak_gib,
    scope_times,
    table,
    with_default_config,
)
from dknet_jax.cli import UserError, prepare_output_file, run_absl

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "config file[:arg] (default configs/scannet.py; --quick: configs/synthetic.py); "
    "override keys with --config.<key>=<value>",
    lock_config=True,
)
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", None, "scenes per step (default: the config's data.batch_size; --quick 2)"
)
_STEPS = flags.DEFINE_integer("steps", None, "timed warm steps (default 5; --quick 3)")
_SCENES = flags.DEFINE_integer("scenes", None, "rooms (default 8; --quick, --gpu_budget 4)")
_SIZE = flags.DEFINE_enum(
    "size",
    None,
    ["tiny", "small", "scannet"],
    "synthetic room size (default scannet; --quick: small)",
)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "use these prepared scenes instead")
_CACHE_DIR = flags.DEFINE_string(
    "cache_dir", None, "where synthetic rooms are cached (default $TMP/dknet_bench/<size>_s0)"
)
_WORKERS = flags.DEFINE_integer(
    "workers", min(4, os.cpu_count() or 1), "processes generating rooms"
)
_IMPL = flags.DEFINE_enum(
    "impl", None, ["auto", "xla", "pallas"], "sparse-conv kernels (config.kernels.impl)"
)
_MASK_LOSS = flags.DEFINE_enum(
    "mask_loss",
    None,
    ["chunked", "dense"],
    "training mask loss (config.model.chunked_mask_loss): chunked (default, no [M, N] "
    "logits) or dense",
)
_COMPARE = flags.DEFINE_bool(
    "compare_mask_loss",
    False,
    "also compile the step with the other mask loss and report the XLA memory estimate of both",
)
_NO_EPOCH = flags.DEFINE_bool("no_epoch", False, "skip the epoch measurement")
_NO_STAGES = flags.DEFINE_bool(
    "no_stages", False, "time every step in the mask stage instead of cycling the stages"
)
_QUICK = flags.DEFINE_bool("quick", False, "synthetic config, small rooms, batch 2, 3 steps")
_GPU_BUDGET = flags.DEFINE_bool(
    "gpu_budget", False, "4 ScanNet-sized rooms, 3 timed steps (~2 min on one GPU)"
)
_JSON = flags.DEFINE_string("json", None, "also write the numbers to this JSON file")
_PROFILE = flags.DEFINE_string(
    "profile_dir",
    None,
    "after the timed steps, trace --steps more steps with jax.profiler into this folder and "
    "print the kernel time per step by named scope (backbone, heads, ...; fwd / bwd)",
)
_PROFILE_DEPTH = flags.DEFINE_integer(
    "profile_depth", 1, "scope levels in the --profile_dir table (2: encode1, decode0, ...)"
)
_LEVERS = flags.DEFINE_bool(
    "levers",
    False,
    "compile only: XLA memory estimate per memory lever (none, +remat, +bf16, +ladder, all)",
)
_LEVER_REMAT = flags.DEFINE_enum(
    "lever_remat", "block", ["block", "level"], "model.remat of the +remat and all rows"
)

POW2_BUCKETS = (16_384, 32_768, 65_536, 131_072, 262_144, 524_288, 1_048_576)


def mask_loss_name(chunked: bool) -> str:
    """``config.model.chunked_mask_loss`` -> the name the report uses."""
    return "chunked" if chunked else "dense"


def settings() -> dict:
    """The flags with --quick / --gpu_budget defaults filled in."""
    quick, budget = _QUICK.value, _GPU_BUDGET.value
    pick = lambda value, default: default if value is None else value
    return dict(
        batch_size=pick(_BATCH_SIZE.value, 2 if quick else None),
        steps=pick(_STEPS.value, 3 if quick or budget else 5),
        scenes=pick(_SCENES.value, 4 if quick or budget else 8),
        size=pick(_SIZE.value, "small" if quick else "scannet"),
    )


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _JSON.value:
        prepare_output_file(_JSON.value, "--json")
    benchmark()
    return 0


def benchmark() -> dict:
    """Run the measurements the flags ask for; print the table, return the numbers."""
    opts = settings()
    own = {} if opts["batch_size"] is None else {"data.batch_size": opts["batch_size"]}
    if _IMPL.value:
        own["kernels.impl"] = _IMPL.value
    if _MASK_LOSS.value:
        own["model.chunked_mask_loss"] = _MASK_LOSS.value == "chunked"
    config, overrides = bench_config(flags.FLAGS["config"], own)
    if _LEVERS.value:
        return lever_table(config, overrides, opts)

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dknet_jax.data.pipeline import train_iterator
    from dknet_jax.model import build_model, count_params
    from dknet_jax.sparse.conv import resolve_impl
    from dknet_jax.training.optim import make_optimizer
    from dknet_jax.training.train import make_train_step, shard_batch

    print(device_line(), flush=True)
    paths = bench_scenes(
        opts["scenes"],
        opts["size"],
        data_dir=_DATA_DIR.value,
        cache_dir=_CACHE_DIR.value,
        workers=_WORKERS.value,
    )
    d, m, t = config.data, config.model, config.train
    if len(paths) < d.batch_size:
        raise UserError(f"{len(paths)} scenes < batch size {d.batch_size}; raise --scenes")
    sizes = [int(np.load(p, mmap_mode="r")["xyz"].shape[0]) for p in paths]

    graphdef, params, rest = build_model(config)
    n_params = count_params(nnx.merge(graphdef, params, rest))
    tx, _ = make_optimizer(t, total_steps=t.epochs * 1000, steps_per_epoch=1000)
    opt_state = tx.init(params)
    step = make_train_step(graphdef, tx, config)

    def iterator(num_epochs):
        return train_iterator(paths, config, num_epochs=num_epochs, num_workers=2, prefetch=2)

    key = jax.random.PRNGKey(0)
    stages = {
        "1 semantic+offset": 0,
        "2 +heatmap+aggregation": t.stage_heatmap_epoch,
        "3 +mask": t.stage_mask_epoch,
    }

    # --- compile on the first batch --------------------------------------------------
    it = iterator(1)
    batch_np = next(it)
    it.close()  # no prefetch threads competing with the timed steps
    shape = (int(batch_np.valid.shape[0]), int(batch_np.instance_class.shape[0]))
    batch = shard_batch(batch_np, None)
    epoch_mask = jnp.int32(t.stage_mask_epoch)
    compiled, t_lower, t_compile, est, t_update = compile_step(
        step, params, rest, opt_state, batch, key, epoch_mask
    )
    avail = available_gib()
    mode = mask_loss_name(m.chunked_mask_loss)
    print(
        f"compiled batch shape (points, instances) = {shape} in {t_compile:.1f}s "
        f"(trace+lower {t_lower:.1f}s; the optimiser update, compiled once per run: "
        f"{t_update:.1f}s); XLA estimate {est if est is None else round(est, 2)}"
        f" GiB ({mode} mask loss), available {avail:.1f} GiB",
        flush=True,
    )
    results = {
        "device": device_line(),
        "config": config_flags.get_config_filename(flags.FLAGS["config"]),
        "overrides": overrides,
        "impl": resolve_impl(config.kernels.impl),
        "params": n_params,
        "batch_size": d.batch_size,
        "scenes": len(paths),
        "scene_points": [min(sizes), int(np.median(sizes)), max(sizes)],
        "batch_shape": shape,
        "compile_s": t_compile,
        "lower_s": t_lower,
        "update_compile_s": t_update,
        "mask_loss": mode,
        "xla_memory_gib": est,
    }
    if _COMPARE.value:  # same model, batch and shapes; only the mask-loss path differs
        other_mode = mask_loss_name(not m.chunked_mask_loss)
        other = copy.deepcopy(config)
        other.model.chunked_mask_loss = not m.chunked_mask_loss
        tc = time.perf_counter()
        other_est = compile_step(
            make_train_step(graphdef, tx, other), params, rest, opt_state, batch, key, epoch_mask
        )[3]
        print(
            f"compiled the {other_mode} mask loss in {time.perf_counter() - tc:.1f}s; XLA "
            f"estimate {other_est if other_est is None else round(other_est, 2)} GiB",
            flush=True,
        )
        results["xla_memory_gib_by_mask_loss"] = {mode: est, other_mode: other_est}
    if est is not None and est > 0.9 * avail:
        results["error"] = (
            f"the step needs ~{est:.1f} GiB but only {avail:.1f} GiB are free; lower --batch_size"
        )
        print(results["error"], flush=True)
        return _report(results)

    # --- warm steps, cycling through the three loss stages (same executable) ----------
    def run(epoch_value):
        nonlocal params, rest, opt_state
        t0 = time.perf_counter()
        params, rest, opt_state, metrics = step(
            params, rest, opt_state, batch, key, jnp.int32(epoch_value)
        )
        metrics = jax.device_get(metrics)
        return time.perf_counter() - t0, metrics

    first, metrics = run(t.stage_mask_epoch)  # first call: executable already compiled
    order = [t.stage_mask_epoch] if _NO_STAGES.value else list(stages.values())
    names = {e: n for n, e in stages.items()}
    times, per_stage = [], {}
    for i in range(opts["steps"]):
        e = order[i % len(order)]
        dt, _ = run(e)
        times.append(dt)
        per_stage.setdefault(names[e], []).append(dt)
    results.update(
        first_step_s=first,
        step_s=float(np.median(times)),
        step_min_s=float(np.min(times)),
        steps_timed=len(times),
        loss=float(metrics["loss"]),
        voxel_overflow=bool(metrics["voxel_overflow"]),
        candidates=float(metrics["candidates"]),
        instances=float(metrics["instances"]),
        gt_instances=float(metrics["gt_instances"]),
        stage_step_s={k: float(np.median(v)) for k, v in per_stage.items()},
        compiles_after_stages=cache_size(step.grads),
    )
    print(
        f"warm step: median {results['step_s']:.3f}s over {len(times)} "
        f"(min {results['step_min_s']:.3f}s); loss {results['loss']:.3f}; per stage "
        + ", ".join(f"{k} {v:.3f}s" for k, v in results["stage_step_s"].items())
        + f"; jit cache size {cache_size(step.grads)}",
        flush=True,
    )

    if _PROFILE.value:
        results["scope_ms"] = profile_steps(compiled, lambda: run(t.stage_mask_epoch), opts)

    # --- one epoch through the pipeline ------------------------------------------------
    if not _NO_EPOCH.value:
        it = iterator(1)
        n_batches = it.batches_per_epoch(0)
        shapes = []
        before = cache_size(step.grads)
        te = time.perf_counter()
        for b in it:
            shapes.append((int(b.valid.shape[0]), int(b.instance_class.shape[0])))
            params, rest, opt_state, metrics = step(
                params, rest, opt_state, shard_batch(b, None), key, jnp.int32(t.stage_mask_epoch)
            )
            jax.block_until_ready(metrics)
        results.update(
            epoch_s=time.perf_counter() - te,
            epoch_batches=n_batches,
            epoch_shapes=sorted(set(shapes)),
            epoch_new_compiles=None if before is None else cache_size(step.grads) - before,
            total_compiles=cache_size(step.grads),
        )
        print(
            f"epoch: {n_batches} batches in {results['epoch_s']:.1f}s, shapes "
            f"{results['epoch_shapes']}, new compiles {results['epoch_new_compiles']}",
            flush=True,
        )
        it.close()
    results["host_peak_gib"] = host_peak_gib()
    results["device_peak_gib"] = device_peak_gib()
    return _report(results)


def compile_step(step, params, rest, opt_state, batch, key, epoch, update: bool = True):
    """Compile a ``TrainStep`` for these arguments: ``(compiled per-shape function, trace +
    lower s, trace + lower + compile s, XLA memory estimate GiB, optimiser-update compile
    s)``. The estimate is the per-shape function's (arguments, outputs, temporaries)
    plus the optimiser state, which stays in memory while it runs without being one of
    its arguments: the footprint of the one-function step it replaces."""
    import jax
    import jax.numpy as jnp

    tc = time.perf_counter()
    lowered = step.grads.lower(params, rest, batch, key, epoch)
    t_lower = time.perf_counter() - tc
    compiled = lowered.compile()
    t_compile = time.perf_counter() - tc
    est = compiled_gib(compiled)
    if est is not None:
        est += sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(opt_state)) / GiB
    t_update = None
    if update:  # the gradients have the parameters' shapes
        tc = time.perf_counter()
        step.update.lower(params, rest, opt_state, params, rest, jnp.float32(0)).compile()
        t_update = time.perf_counter() - tc
    return compiled, t_lower, t_compile, est, t_update


def profile_steps(compiled, run_step, opts) -> list:
    """Trace ``opts["steps"]`` calls of ``run_step`` (the compiled step); print and return
    the kernel time per step by named scope (``benchmarking.scope_times``)."""
    import jax

    jax.profiler.start_trace(_PROFILE.value, create_perfetto_trace=True)
    for _ in range(opts["steps"]):
        run_step()
    jax.profiler.stop_trace()
    rows = scope_times(_PROFILE.value, compiled.as_text(), opts["steps"], _PROFILE_DEPTH.value)
    print(
        table(
            [(f"{s} ({p})", f"{ms:8.1f} ms  {n:6.0f} trace events") for s, p, ms, n in rows],
            "Kernel time per step by scope (the two cores overlap: the sum exceeds the step)",
        ),
        flush=True,
    )
    return [[s, p, ms, n] for s, p, ms, n in rows]


def lever_rows(config, remat: str) -> list[tuple[str, object]]:
    """(name, config) per memory lever: the config without the levers, each lever alone,
    all of them."""
    from dknet_jax.data.batching import make_ladder

    base = copy.deepcopy(config)
    base.model.remat, base.train.precision = "none", "f32"
    base.data.point_buckets = POW2_BUCKETS
    ladder = make_ladder(16_384, 1_048_576, factors=(1.0, 1.5), multiple=1024)

    def with_(**changes):
        c = copy.deepcopy(base)
        if "remat" in changes:
            c.model.remat = changes["remat"]
        if "precision" in changes:
            c.train.precision = changes["precision"]
        if "buckets" in changes:
            c.data.point_buckets = changes["buckets"]
        return c

    return [
        ("none", base),
        (f"+remat={remat}", with_(remat=remat)),
        ("+bf16", with_(precision="bf16")),
        ("+ladder x1.5", with_(buckets=ladder)),
        ("all", with_(remat=remat, precision="bf16", buckets=ladder)),
    ]


def _lever_text(x: dict) -> str:
    est = x["xla_memory_gib"]
    return (
        f"{'-' if est is None else f'{est:.2f}'} GiB, batch {x['batch_shape']} "
        f"fill {x['fill']:.0%}, compile {x['compile_s']:.0f} s"
    )


def lever_table(config, overrides, opts) -> dict:
    """Compile the train step once per memory lever on the first batch of the same rooms
    and print XLA's memory estimate of each (nothing runs)."""
    import jax
    import jax.numpy as jnp

    from dknet_jax.data.pipeline import train_iterator
    from dknet_jax.model import build_model
    from dknet_jax.training.optim import make_optimizer
    from dknet_jax.training.train import make_train_step, shard_batch

    print(device_line(), flush=True)
    paths = bench_scenes(
        opts["scenes"],
        opts["size"],
        data_dir=_DATA_DIR.value,
        cache_dir=_CACHE_DIR.value,
        workers=_WORKERS.value,
    )
    if len(paths) < config.data.batch_size:
        raise UserError(
            f"{len(paths)} scenes < batch size {config.data.batch_size}; raise --scenes"
        )
    rows = []
    for name, c in lever_rows(config, _LEVER_REMAT.value):
        graphdef, params, rest = build_model(c)
        tx, _ = make_optimizer(c.train, total_steps=c.train.epochs * 1000, steps_per_epoch=1000)
        opt_state = tx.init(params)
        it = train_iterator(paths, c, num_epochs=1, num_workers=0, prefetch=1)
        batch_np = next(it)
        it.close()
        rows_n = int(batch_np.valid.shape[0])
        fill = float(np.sum(batch_np.valid)) / rows_n
        shape = (rows_n, int(batch_np.instance_class.shape[0]))
        step = make_train_step(graphdef, tx, c)
        args = (params, rest, opt_state, shard_batch(batch_np, None), jax.random.PRNGKey(0))
        compiled, _, dt, est, _ = compile_step(
            step, *args, jnp.int32(c.train.stage_mask_epoch), update=False
        )
        row = dict(lever=name, batch_shape=shape, fill=fill, compile_s=dt, xla_memory_gib=est)
        rows.append(row)
        print(
            f"{name:>16}: batch {shape} (fill {fill:.0%}), compile {dt:.0f} s, XLA estimate "
            f"{'-' if est is None else f'{est:.2f} GiB'}",
            flush=True,
        )
        del compiled, params, rest, opt_state
    r = {
        "device": device_line(),
        "config": config_flags.get_config_filename(flags.FLAGS["config"]),
        "overrides": overrides,
        "lever_remat": _LEVER_REMAT.value,
        "levers": rows,
    }
    print()
    print(
        table(
            [("device", r["device"]), ("config", f"{r['config']} {' '.join(overrides)}")]
            + [(x["lever"], _lever_text(x)) for x in rows],
            "DKNet training step: XLA memory per lever (compile only)",
        ),
        flush=True,
    )
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(r, f, indent=2, default=str)
    return r


def _report(r: dict) -> dict:
    fmt = lambda x, unit="s": (
        "-" if x is None else f"{x:.3f} {unit}" if unit == "s" else f"{x:.2f} {unit}"
    )
    rows = [
        ("device", r["device"]),
        ("config", f"{r['config']} {' '.join(r['overrides'])}"),
        ("sparse conv impl", r["impl"]),
        ("parameters", f"{r['params']:,}"),
        ("scenes (points min/median/max)", f"{r['scenes']} ({r['scene_points']})"),
        ("batch shape (points, instances)", f"{r['batch_size']} scenes -> {r['batch_shape']}"),
        (
            "compile (lower + XLA), per batch shape",
            f"{fmt(r['compile_s'])} (trace+lower {fmt(r['lower_s'])})",
        ),
        ("compile, optimiser update (once per run)", fmt(r.get("update_compile_s"))),
        (
            "mask loss",
            {
                "chunked": "chunked (mask_loss.decoded_mask_loss, no [M, N] logits)",
                "dense": "dense (f32[M, N] mask logits)",
            }[r["mask_loss"]],
        ),
        ("XLA memory estimate", fmt(r["xla_memory_gib"], "GiB")),
    ]
    for name, gib in r.get("xla_memory_gib_by_mask_loss", {}).items():
        rows.append(
            (
                f"XLA memory, {name} mask loss",
                "-" if gib is None else f"{gib:.4f} GiB ({gib * 1024:.1f} MiB)",
            )
        )
    if "error" in r:
        rows.append(("result", r["error"]))
    else:
        rows += [
            ("first step after compile", fmt(r["first_step_s"])),
            (
                "warm step (median)",
                f"{fmt(r['step_s'])} over {r['steps_timed']} steps (min {fmt(r['step_min_s'])})",
            ),
            ("scenes / s (warm)", f"{r['batch_size'] / r['step_s']:.2f}"),
            (
                "candidates / instances / GT in batch",
                f"{r['candidates']:.0f} / {r['instances']:.0f} / {r['gt_instances']:.0f}",
            ),
        ]
        rows += [(f"stage {k}", fmt(v)) for k, v in r["stage_step_s"].items()]
        rows.append(("compiles after the timed steps", str(r["compiles_after_stages"])))
        if "epoch_s" in r:
            rows += [
                (
                    "epoch (pipeline + steps)",
                    f"{fmt(r['epoch_s'])} for {r['epoch_batches']}"
                    f" batches, shapes {r['epoch_shapes']}",
                ),
                (
                    "compiles in the epoch",
                    f"{r['epoch_new_compiles']} new ({r['total_compiles']} in total)",
                ),
            ]
        rows += [
            ("host peak RSS", fmt(r["host_peak_gib"], "GiB")),
            ("device peak in use", fmt(r["device_peak_gib"], "GiB")),
        ]
        if r.get("voxel_overflow"):
            rows.append(("WARNING", "voxel capacity overflow in the timed batch"))
    print()
    print(table(rows, "DKNet training step"), flush=True)
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(r, f, indent=2, default=str)
    return r


if __name__ == "__main__":
    default = "configs/synthetic.py" if flag_given(sys.argv, "quick") else "configs/scannet.py"
    sys.argv = with_default_config(sys.argv, default)
    run_absl(main)

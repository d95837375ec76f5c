"""Training-step benchmark: warm step time, compile time, peak memory, compile count.

Place in the data flow: a standalone measurement of the whole training path
(``TrainIterator`` -> ``training.train.make_train_step`` [DKNet forward -> objective -> AdamW]) on
synthetic rooms, for ``docs/benchmarks.md`` ("Training step"). ``scripts/bench_infer.py``
reuses its data and config helpers.

    python scripts/bench_train.py               # ScanNet config, batch 4, 8 ScanNet-sized rooms
    python scripts/bench_train.py --quick       # synthetic config, small rooms, batch 2 (CPU)
    python scripts/bench_train.py --gpu_budget  # 4 rooms, 3 timed steps: ~2 minutes on a GPU
    python scripts/bench_train.py --quick --compare_mask_loss  # + XLA memory of both losses

Data: rooms come from ``dknet_jax.synthetic.generate_scene`` (room i drawn from
``default_rng([seed, i])``, as ``make_synthetic.py`` does) and are converted in memory to
prepared-scene arrays with the same label rules as ``prepare_scannet.py`` (semantic =
nyu40 -> benchmark index, one instance per annotated object of an instance class,
superpoints = ScanNet's mesh segmentator) and cached as ``<cache>/scene<NNNN>_00.npz``. No
PLY file is written or read, so plyfile is not needed. ``--data_dir`` uses already
prepared scenes instead (``prepare_scannet.py`` output; its ``train/`` folder or split
list if present).

Measured (model from ``--config``, randomly initialised, weights updated by every step):
- compile: ``jit(step).lower(...).compile()`` wall time for the first batch shape
  (the later ``jit`` call reuses that executable), and XLA's memory analysis of it;
- mask loss: ``config.model.chunked_mask_loss`` (default True: the loss decodes the masks
  chunk by chunk, no f32[M, N] logits; ``--mask_loss dense`` or
  ``--set model.chunked_mask_loss=false`` for the dense path); ``--compare_mask_loss``
  also compiles the step with the other path and reports both XLA memory estimates;
- warm step: median over ``--steps`` steps on one device-resident batch (no input
  pipeline in the timing) after one untimed step;
- stage gates: the timed steps cycle through the first epoch of each of the three loss
  stages (semantic+offset, +heatmap+aggregation, +mask; ``--no_stages``: mask stage only)
  with the same jit function, whose cache size must stay 1 (the gates are traced);
- epoch: one pass of the iterator (augmentation, packing, transfer, steps) over all
  scenes, the distinct (points, instances) batch shapes and the compiles it caused;
- peak memory: host ``ru_maxrss``; device ``memory_stats()["peak_bytes_in_use"]`` when
  the backend reports it (GPU).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import multiprocessing
import os
import platform
import resource
import sys
import tempfile
import time
import types
from concurrent.futures import ProcessPoolExecutor

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 1024.0**3


# ---------------------------------------------------------------------------------------
# config
def load_config(spec: str, overrides=()):
    """``path[:arg]`` of a config file -> its ``get_config(arg)``, with ``key=value``
    overrides (values parsed as Python literals, else kept as strings), validated."""
    from dknet_jax.config import validate

    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise SystemExit(f"--config: no such file {path!r}")
    mod_spec = importlib.util.spec_from_file_location("_bench_config", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected key=value, e.g. model.max_candidates=100")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            # true/false as on the train.py command line (--config.model.x=false)
            value = {"true": True, "false": False}.get(raw.strip().lower(), raw)
        node, parts = config, key.split(".")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = value
    try:
        return validate(config)
    except ValueError as e:
        raise SystemExit(f"invalid config: {e}") from None


# ---------------------------------------------------------------------------------------
# data: synthetic rooms -> prepared-scene arrays, in memory (no PLY, no plyfile)
def _generate_scene_fn():
    """``synthetic.generate_scene`` without needing plyfile (only the PLY writers use it):
    on a machine without plyfile a placeholder module stands in for the import."""
    try:
        from dknet_jax.synthetic import generate_scene
    except ModuleNotFoundError as e:
        if e.name != "plyfile":
            raise
        stub = types.ModuleType("plyfile")
        stub.PlyData = stub.PlyElement = None  # never called by generate_scene
        sys.modules["plyfile"] = stub
        from dknet_jax.synthetic import generate_scene
    return generate_scene


def prepared_arrays(mesh, first_instance_class: int = 2) -> dict:
    """A ``synthetic.SceneMesh`` -> prepared-scene arrays (docs/contracts.md section 3).

    Same rules as ``prepare_scannet_scene`` on the files ``make_synthetic.py`` writes:
    semantic = ``map_nyu40`` of each vertex's nyu40 id (0 = unannotated -> -100);
    instances = annotated objects whose class is an instance class (>= first_instance_class),
    numbered 0..K-1 in object order (every synthetic object is semantically pure);
    superpoint = ``segment_mesh`` ids (root vertex indices), as shipped by ScanNet.
    """
    from dknet_jax.data.labels import IGNORE_LABEL, map_nyu40
    from dknet_jax.data.superpoints import (
        SCANNET_K_THRESH,
        SCANNET_SEG_MIN_VERTS,
        segment_mesh,
    )

    semantic = map_nyu40(mesh.nyu40)
    obj_class = map_nyu40(np.where(mesh.annotated, mesh.object_nyu40, 0))
    present = np.zeros(len(obj_class), bool)
    present[mesh.object_id] = True
    is_inst = present & (obj_class >= first_instance_class)
    obj_to_inst = np.where(is_inst, np.cumsum(is_inst) - 1, IGNORE_LABEL).astype(np.int32)
    seg = segment_mesh(mesh.vertices, mesh.faces, SCANNET_K_THRESH, SCANNET_SEG_MIN_VERTS)
    return {
        "xyz": mesh.vertices.astype(np.float32),
        "rgb": mesh.colors.astype(np.uint8),
        "semantic": semantic.astype(np.int32),
        "instance": obj_to_inst[mesh.object_id],
        "superpoint": np.asarray(seg).astype(np.int32),
    }


def _write_scene(job) -> str:
    path, seed, index, size = job
    if not os.path.isfile(path):
        mesh = _generate_scene_fn()(np.random.default_rng([seed, index]), size, "scannet")
        tmp = path[:-4] + ".tmp.npz"
        np.savez(tmp, **prepared_arrays(mesh))
        os.replace(tmp, path)
    return path


def synthetic_scenes(
    out_dir: str, scenes: int, size: str, seed: int = 0, workers: int = 1
) -> list[str]:
    """Paths of ``scenes`` prepared synthetic rooms under ``out_dir`` (made if missing)."""
    os.makedirs(out_dir, exist_ok=True)
    jobs = [(os.path.join(out_dir, f"scene{i:04d}_00.npz"), seed, i, size) for i in range(scenes)]
    missing = [j for j in jobs if not os.path.isfile(j[0])]
    if missing:
        print(
            f"generating {len(missing)} synthetic '{size}' rooms into {out_dir} "
            f"({workers} worker(s)) ...",
            flush=True,
        )
        t = time.perf_counter()
        if workers > 1:
            ctx = multiprocessing.get_context("spawn")  # never fork a process that holds jax
            with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                list(pool.map(_write_scene, missing))
        else:
            for j in missing:
                _write_scene(j)
        print(f"  done in {time.perf_counter() - t:.1f}s", flush=True)
    return [j[0] for j in jobs]


def scene_paths(args, size: str) -> list[str]:
    """``--data_dir`` scenes (first ``--scenes``) or cached synthetic rooms."""
    from dknet_jax.data.dataset import list_scenes

    if args.data_dir:
        split = (
            "train"
            if (
                os.path.isdir(os.path.join(args.data_dir, "train"))
                or os.path.isfile(os.path.join(args.data_dir, "train.txt"))
            )
            else None
        )
        paths = list_scenes(args.data_dir, split)[: args.scenes]
        if not paths:
            raise SystemExit(f"--data_dir {args.data_dir}: no prepared scenes")
        return paths
    cache = args.cache_dir or os.path.join(tempfile.gettempdir(), "dknet_bench", f"{size}_s0")
    return synthetic_scenes(cache, args.scenes, size, seed=0, workers=args.workers)


# ---------------------------------------------------------------------------------------
# machine and memory
def device_line() -> str:
    import jax

    d = jax.local_devices()
    kind = d[0].device_kind
    host = f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}"
    return (
        f"{len(d)} x {kind} ({d[0].platform}), jax {jax.__version__}; host {host}; "
        f"load average {os.getloadavg()[0]:.1f} at start"
    )


def host_peak_gib() -> float:
    """Peak resident set of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (GiB if sys.platform == "darwin" else 1024.0**2)


def device_peak_gib() -> float | None:
    import jax

    stats = jax.local_devices()[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / GiB


def available_gib() -> float:
    """Memory the next allocation can use: device bytes_limit - in use, else host
    MemAvailable."""
    import jax

    stats = jax.local_devices()[0].memory_stats()
    if stats and "bytes_limit" in stats:
        return (stats["bytes_limit"] - stats.get("bytes_in_use", 0)) / GiB
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024.0**2
    except OSError:
        pass
    return float("inf")


def compiled_gib(compiled) -> float | None:
    """Arguments + outputs + temporaries of a compiled executable (XLA's estimate)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return None
    if m is None:
        return None
    return (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    ) / GiB


def mask_loss_name(chunked: bool) -> str:
    """``config.model.chunked_mask_loss`` -> the name the report uses."""
    return "chunked" if chunked else "dense"


def cache_size(jitted) -> int | None:
    """Number of executables a jit function holds (private JAX API; None if absent)."""
    fn = getattr(jitted, "_cache_size", None)
    return fn() if callable(fn) else None


def table(rows, title: str) -> str:
    w = max(len(r[0]) for r in rows)
    lines = [title, "-" * len(title)] + [f"{k:<{w}}  {v}" for k, v in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--config",
        default=None,
        help="config file[:arg] (default configs/scannet.py; --quick: configs/synthetic.py)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, e.g. --set model.max_candidates=100 (repeatable)",
    )
    p.add_argument("--batch_size", type=int, default=None, help="scenes per step (default 4)")
    p.add_argument("--steps", type=int, default=None, help="timed warm steps (default 5)")
    p.add_argument("--scenes", type=int, default=None, help="rooms (default 8)")
    p.add_argument(
        "--size",
        default=None,
        choices=("tiny", "small", "scannet"),
        help="synthetic room size (default scannet; --quick: small)",
    )
    p.add_argument("--data_dir", default=None, help="use these prepared scenes instead")
    p.add_argument(
        "--cache_dir",
        default=None,
        help="where synthetic rooms are cached (default $TMP/dknet_bench/<size>_s0)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="processes generating rooms",
    )
    p.add_argument(
        "--impl",
        default=None,
        choices=("auto", "xla", "pallas"),
        help="sparse-conv kernels (config.kernels.impl)",
    )
    p.add_argument(
        "--mask_loss",
        default=None,
        choices=("chunked", "dense"),
        help="training mask loss (config.model.chunked_mask_loss): chunked "
        "(default, no [M, N] logits) or dense",
    )
    p.add_argument(
        "--compare_mask_loss",
        action="store_true",
        help="also compile the step with the other mask loss and report the XLA "
        "memory estimate of both",
    )
    p.add_argument("--no_epoch", action="store_true", help="skip the epoch measurement")
    p.add_argument(
        "--no_stages",
        action="store_true",
        help="time every step in the mask stage instead of cycling the stages",
    )
    p.add_argument(
        "--quick", action="store_true", help="synthetic config, small rooms, batch 2, 3 steps"
    )
    p.add_argument(
        "--gpu_budget",
        action="store_true",
        help="4 ScanNet-sized rooms, 3 timed steps (~2 min on one GPU)",
    )
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = dict(
        config="configs/synthetic.py" if quick else "configs/scannet.py",
        batch_size=2 if quick else 4,
        steps=3 if quick or args.gpu_budget else 5,
        scenes=4 if quick or args.gpu_budget else 8,
        size="small" if quick else "scannet",
    )
    return apply_defaults(args, defaults)


def apply_defaults(args, defaults: dict):
    """Fill flags left at None from ``defaults``; resolve a relative --config against the
    repo root when it is not a path from the current folder."""
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if not os.path.isabs(args.config) and not os.path.isfile(args.config.partition(":")[0]):
        args.config = os.path.join(REPO, args.config)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    overrides = list(args.set) + [f"data.batch_size={args.batch_size}"]
    if args.impl:
        overrides.append(f"kernels.impl={args.impl}")
    if args.mask_loss:
        overrides.append(f"model.chunked_mask_loss={args.mask_loss == 'chunked'}")
    config = load_config(args.config, overrides)

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dknet_jax.data.pipeline import TrainIterator
    from dknet_jax.data.transforms import AugmentConfig
    from dknet_jax.model import build_model, count_params
    from dknet_jax.sparse.conv import resolve_impl
    from dknet_jax.training.optim import make_optimizer
    from dknet_jax.training.train import make_train_step, shard_batch

    print(device_line(), flush=True)
    paths = scene_paths(args, args.size)
    d, m, t = config.data, config.model, config.train
    if len(paths) < d.batch_size:
        raise SystemExit(f"{len(paths)} scenes < batch size {d.batch_size}; raise --scenes")
    sizes = [int(np.load(p, mmap_mode="r")["xyz"].shape[0]) for p in paths]

    graphdef, params, rest = build_model(config)
    n_params = count_params(nnx.merge(graphdef, params, rest))
    tx, _ = make_optimizer(t, total_steps=t.epochs * 1000, steps_per_epoch=1000)
    opt_state = tx.init(params)
    step = make_train_step(graphdef, tx, config)
    augment = (
        AugmentConfig.for_voxel_size(
            d.voxel_size,
            max_points=d.max_points,
            color_noise=d.color_noise,
            **({} if d.elastic else {"elastic": ()}),
        )
        if d.augment
        else None
    )

    def iterator(num_epochs):
        return TrainIterator(
            paths,
            batch_size=d.batch_size,
            seed=config.seed,
            voxel_size=d.voxel_size,
            num_classes=m.num_classes,
            buckets=d.point_buckets,
            instance_buckets=d.instance_buckets,
            augment_config=augment,
            num_epochs=num_epochs,
            num_workers=2,
            prefetch=2,
        )

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
    tc = time.perf_counter()
    lowered = step.lower(params, rest, opt_state, batch, key, epoch_mask)
    t_lower = time.perf_counter() - tc
    compiled = lowered.compile()
    t_compile = time.perf_counter() - tc
    est = compiled_gib(compiled)
    avail = available_gib()
    mode = mask_loss_name(m.chunked_mask_loss)
    print(
        f"compiled batch shape (points, instances) = {shape} in {t_compile:.1f}s "
        f"(trace+lower {t_lower:.1f}s); XLA estimate {est if est is None else round(est, 2)}"
        f" GiB ({mode} mask loss), available {avail:.1f} GiB",
        flush=True,
    )
    results = {
        "device": device_line(),
        "config": args.config,
        "overrides": overrides,
        "impl": resolve_impl(config.kernels.impl),
        "params": n_params,
        "batch_size": d.batch_size,
        "scenes": len(paths),
        "scene_points": [min(sizes), int(np.median(sizes)), max(sizes)],
        "batch_shape": shape,
        "compile_s": t_compile,
        "lower_s": t_lower,
        "mask_loss": mode,
        "xla_memory_gib": est,
    }
    if args.compare_mask_loss:  # same model, batch and shapes; only the mask-loss path differs
        other_mode = mask_loss_name(not m.chunked_mask_loss)
        other = load_config(
            args.config, overrides + [f"model.chunked_mask_loss={not m.chunked_mask_loss}"]
        )
        tc = time.perf_counter()
        other_est = compiled_gib(
            make_train_step(graphdef, tx, other)
            .lower(params, rest, opt_state, batch, key, epoch_mask)
            .compile()
        )
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
        return _report(args, results)

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
    order = [t.stage_mask_epoch] if args.no_stages else list(stages.values())
    names = {e: n for n, e in stages.items()}
    times, per_stage = [], {}
    for i in range(args.steps):
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
        compiles_after_stages=cache_size(step),
    )
    print(
        f"warm step: median {results['step_s']:.3f}s over {len(times)} "
        f"(min {results['step_min_s']:.3f}s); loss {results['loss']:.3f}; per stage "
        + ", ".join(f"{k} {v:.3f}s" for k, v in results["stage_step_s"].items())
        + f"; jit cache size {cache_size(step)}",
        flush=True,
    )

    # --- one epoch through the pipeline ------------------------------------------------
    if not args.no_epoch:
        it = iterator(1)
        n_batches = it.batches_per_epoch(0)
        shapes = []
        before = cache_size(step)
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
            epoch_new_compiles=None if before is None else cache_size(step) - before,
            total_compiles=cache_size(step),
        )
        print(
            f"epoch: {n_batches} batches in {results['epoch_s']:.1f}s, shapes "
            f"{results['epoch_shapes']}, new compiles {results['epoch_new_compiles']}",
            flush=True,
        )
        it.close()
    results["host_peak_gib"] = host_peak_gib()
    results["device_peak_gib"] = device_peak_gib()
    return _report(args, results)


def _report(args, r: dict) -> dict:
    fmt = lambda x, unit="s": (
        "-" if x is None else f"{x:.3f} {unit}" if unit == "s" else f"{x:.2f} {unit}"
    )
    rows = [
        ("device", r["device"]),
        ("config", f"{os.path.relpath(r['config'], REPO)} {' '.join(r['overrides'])}"),
        ("sparse conv impl", r["impl"]),
        ("parameters", f"{r['params']:,}"),
        ("scenes (points min/median/max)", f"{r['scenes']} ({r['scene_points']})"),
        ("batch shape (points, instances)", f"{r['batch_size']} scenes -> {r['batch_shape']}"),
        ("compile (lower + XLA)", f"{fmt(r['compile_s'])} (trace+lower {fmt(r['lower_s'])})"),
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2, default=str)
    return r


if __name__ == "__main__":
    main()

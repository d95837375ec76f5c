"""Inference benchmark: per-scene latency (warm), compile time, and a per-stage breakdown.

Place in the data flow: a standalone measurement of inference (``EvalIterator`` ->
``predictor.make_predict_fn`` [DKNet forward -> post-processing]) on synthetic rooms, for
``docs/benchmarks.md`` ("Inference"). Data and machine numbers come from
``dknet_jax.benchmarking`` (the same cached rooms as ``scripts/bench_train.py``).

    python scripts/bench_infer.py                 # ScanNet config, 8 ScanNet-sized rooms
    python scripts/bench_infer.py --quick         # synthetic config, small rooms (minutes on a CPU)
    python scripts/bench_infer.py --gpu_budget    # 4 rooms, 3 reps: ~2 minutes on a GPU
    python scripts/bench_infer.py --config=configs/scannet.py --config.model.candidates=nms

Config: ``--config=<file>[:<arg>]`` (default ``configs/scannet.py``; with ``--quick``
``configs/synthetic.py``) and ``--config.<key>=<value>`` overrides, as in
``scripts/train.py``.

One scene per batch (ScanNet's ``eval_batch_size`` 1), padded to its point bucket. Every
stage below is jit-compiled on its own, fed the previous stage's outputs for the same
scene, and timed warm (median of ``--reps`` calls, ``block_until_ready``); the whole fused
``make_predict_fn`` is timed the same way. The stages are ``DKNet``'s stage methods, the
ones ``DKNet.__call__`` composes, then ``predictor.postprocess_batch``, and the script
checks that their final output equals the fused function's (same kept instances, labels,
scores, masks). On a GPU the two need not be bitwise equal: XLA fuses differently and
scatter-adds there are atomic (summation order varies), so a near-tie (e.g. a point
between two instances) can flip. The script reports the fraction of mask entries that
differ and the largest score difference, and flags
"DIFFER" only beyond 0.1% of mask entries or 1e-3 in a score:

  backbone     voxelize + sparse UNet + voxel -> point gather
  heads        point heads (semantic, offset, heatmap, reduce, mask features) + per-scene
               heatmap softmax
  candidates   LN-NMS (config.model.candidates) per scene, K slots
  aggregation  fg/bg context features + pairwise merge MLP + groups (connected
               components) + group features
  masks        kernel MLP + dynamic-conv decoder (mask logits of every slot over the scene)
  postprocess  sigmoid/softmax, Otsu thresholds, coverage, superpoint vote, scores, filters

The model is randomly initialised unless ``--checkpoint`` is given: an untrained model
predicts most points as foreground and fills most candidate slots, so candidate-dependent
stages run close to their worst case (the counts are printed). Input batches are on the
device before timing; outputs stay on the device (no host transfer in the numbers).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from dknet_jax.benchmarking import (
    bench_config,
    bench_scenes,
    compiled_gib,
    device_line,
    device_peak_gib,
    flag_given,
    host_peak_gib,
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
_SCENES = flags.DEFINE_integer("scenes", None, "rooms (default 8; --quick 3, --gpu_budget 4)")
_REPS = flags.DEFINE_integer("reps", 3, "timed warm calls per stage")
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
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "workdir to restore weights from")
_NO_STAGES = flags.DEFINE_bool("no_stages", False, "time only the fused function")
_QUICK = flags.DEFINE_bool("quick", False, "synthetic config, 3 small rooms")
_GPU_BUDGET = flags.DEFINE_bool("gpu_budget", False, "4 ScanNet-sized rooms")
_JSON = flags.DEFINE_string("json", None, "also write the numbers to this JSON file")

PUBLISHED_MS = {"PointGroup": 452, "SoftGroup": 345, "ISBNet": 237, "SPFormer": 247}
STAGES = ("backbone", "heads", "candidates", "aggregation", "masks", "postprocess")


def make_stage_fns(graphdef, config):
    """One jit function per stage of ``DKNet.__call__`` (its stage methods) plus the
    post-processing of ``predictor.make_predict_fn``; each takes (params, rest, ...)."""
    import jax
    from flax import nnx

    from dknet_jax.inference.predictor import postprocess_batch

    if config.model.kernel_from == "oracle":
        raise UserError(
            "bench_infer: kernel_from=oracle needs GT instances (training-time "
            "analysis only); benchmark 'aggregate' or 'top'"
        )

    def model_of(params, rest):
        model = nnx.merge(graphdef, params, rest, copy=True)
        model.eval()
        return model

    def backbone(params, rest, batch):
        return model_of(params, rest).point_features(batch)

    def heads(params, rest, batch, fp):
        return model_of(params, rest).point_heads(batch, fp)

    def candidates(params, rest, batch, h, heat):
        return model_of(params, rest).mine(batch, h, heat)

    def aggregation(params, rest, batch, h, heat, cand_idx, cand_ok):
        return model_of(params, rest).group(
            batch, h, heat, cand_idx, cand_ok, merge_threshold=config.test.merge_threshold
        )

    def masks(params, rest, batch, h, groups):
        return model_of(params, rest).masks(batch, h, groups)[1]

    def post(batch, semantic_logits, mask_logits, inst_ok):
        return postprocess_batch(config, batch, semantic_logits, mask_logits, inst_ok)

    return {
        name: jax.jit(fn)
        for name, fn in zip(
            STAGES, (backbone, heads, candidates, aggregation, masks, post), strict=True
        )
    }


def timed(fn, args, reps: int, compiled: dict, tag):
    """(compile s or None if cached, warm median s, output) of jit ``fn`` on ``args``."""
    import jax

    t_comp = None
    if tag not in compiled:
        t0 = time.perf_counter()
        exe = fn.lower(*args).compile()  # the jit call below reuses this executable
        t_comp = time.perf_counter() - t0
        compiled[tag] = compiled_gib(exe)
    out = jax.block_until_ready(fn(*args))  # warm-up (first run: allocations, autotuning)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return t_comp, float(np.median(times)), out


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _JSON.value:
        prepare_output_file(_JSON.value, "--json")
    benchmark()
    return 0


def benchmark() -> dict:
    """Time the fused predict function and its stages; print the table, return the
    numbers."""
    quick, budget = _QUICK.value, _GPU_BUDGET.value
    scenes = _SCENES.value if _SCENES.value is not None else 3 if quick else 4 if budget else 8
    size = _SIZE.value or ("small" if quick else "scannet")
    own = {"data.eval_batch_size": 1}
    if _IMPL.value:
        own["kernels.impl"] = _IMPL.value
    config, overrides = bench_config(flags.FLAGS["config"], own)
    paths = bench_scenes(
        scenes, size, data_dir=_DATA_DIR.value, cache_dir=_CACHE_DIR.value, workers=_WORKERS.value
    )

    import jax

    from dknet_jax.data.pipeline import EvalIterator
    from dknet_jax.inference.predictor import load_model, make_predict_fn
    from dknet_jax.model import build_model
    from dknet_jax.sparse.conv import resolve_impl

    dev = device_line()
    print(dev, flush=True)
    d, m = config.data, config.model
    checkpoint = _CHECKPOINT.value
    if checkpoint:
        model = load_model(checkpoint, config, which="latest")
        graphdef, params, rest = model.graphdef, model.params, model.rest
        print(f"restored step {model.step} from {checkpoint}", flush=True)
    else:
        graphdef, params, rest = build_model(config)
    predict = make_predict_fn(graphdef, config)
    stage_fns = None if _NO_STAGES.value else make_stage_fns(graphdef, config)
    it = EvalIterator(
        paths,
        batch_size=1,
        voxel_size=d.voxel_size,
        num_classes=m.num_classes,
        buckets=d.point_buckets,
        instance_buckets=d.instance_buckets,
        num_workers=1,
        prefetch=1,
        voxel_origin=d.voxel_origin,
    )
    compiled: dict = {}
    rows = []
    reps = _REPS.value
    for batch_np, names in it:
        batch = jax.device_put(batch_np)
        n_pts = int(np.asarray(batch_np.valid).sum())
        bucket = int(batch_np.valid.shape[0])
        shape = (bucket, int(batch_np.instance_class.shape[0]))
        r = {"scene": names[0], "points": n_pts, "bucket": bucket}
        c, t, fused = timed(predict, (params, rest, batch), reps, compiled, ("fused", shape))
        r["fused_s"], r["fused_compile_s"] = t, c
        if bool(fused.voxel_overflow):
            r["warning"] = "voxel capacity overflow"
        r["kept"] = int(np.asarray(fused.keep).sum())
        if stage_fns is not None:
            f = stage_fns
            c1, t1, (fp, overflow) = timed(
                f["backbone"], (params, rest, batch), reps, compiled, ("backbone", shape)
            )
            c2, t2, (h, heat) = timed(
                f["heads"], (params, rest, batch, fp), reps, compiled, ("heads", shape)
            )
            c3, t3, (cand_idx, cand_ok, exhausted) = timed(
                f["candidates"],
                (params, rest, batch, h, heat),
                reps,
                compiled,
                ("candidates", shape),
            )
            c4, t4, groups = timed(
                f["aggregation"],
                (params, rest, batch, h, heat, cand_idx, cand_ok),
                reps,
                compiled,
                ("aggregation", shape),
            )
            inst_ok = groups.inst_ok
            c5, t5, mask_logits = timed(
                f["masks"], (params, rest, batch, h, groups), reps, compiled, ("masks", shape)
            )
            c6, t6, out = timed(
                f["postprocess"],
                (batch, h.semantic_logits, mask_logits, inst_ok),
                reps,
                compiled,
                ("postprocess", shape),
            )
            r["stage_s"] = dict(zip(STAGES, (t1, t2, t3, t4, t5, t6), strict=True))
            r["stage_compile_s"] = dict(zip(STAGES, (c1, c2, c3, c4, c5, c6), strict=True))
            r["foreground"] = int(np.asarray(h.foreground).sum())
            r["candidates"] = int(np.asarray(cand_ok).sum())
            r["instances"] = int(np.asarray(inst_ok).sum())
            r["pool_exhausted"] = bool(np.asarray(exhausted).any())
            mask_diff = float(np.mean(np.asarray(out["masks"]) != np.asarray(fused.masks)))
            score_diff = float(
                np.max(
                    np.abs(
                        np.asarray(out["scores"], np.float64) - np.asarray(fused.scores, np.float64)
                    )
                )
            )
            r["stages_bitwise_equal"] = bool(
                all(
                    np.array_equal(np.asarray(out[key]), np.asarray(getattr(fused, key)))
                    for key in ("keep", "labels", "masks", "scores")
                )
            )
            r["stages_mask_diff_frac"], r["stages_max_score_diff"] = mask_diff, score_diff
            r["stages_match_fused"] = bool(mask_diff <= 1e-3 and score_diff <= 1e-3)
        rows.append(r)
        msg = f"{r['scene']}: {n_pts} points (bucket {bucket}) fused {t * 1e3:.0f} ms" + (
            f", compile {c:.1f}s" if c is not None else ""
        )
        if "stage_s" in r:
            msg += (
                " | "
                + " ".join(f"{s} {v * 1e3:.0f}" for s, v in r["stage_s"].items())
                + f" ms | cands {r['candidates']} inst {r['instances']} kept {r['kept']}"
                + (
                    ""
                    if r["stages_bitwise_equal"]
                    else f" | staged vs fused: {r['stages_mask_diff_frac']:.2e} of mask entries, "
                    f"max score diff {r['stages_max_score_diff']:.1e}"
                    + ("" if r["stages_match_fused"] else " DIFFER")
                )
            )
        print(msg, flush=True)
    it.close()
    results = {
        "device": dev,
        "config": config_flags.get_config_filename(flags.FLAGS["config"]),
        "overrides": overrides,
        "impl": resolve_impl(config.kernels.impl),
        "checkpoint": checkpoint,
        "scenes": rows,
        "host_peak_gib": host_peak_gib(),
        "device_peak_gib": device_peak_gib(),
        "xla_memory_gib": {f"{k[0]} {k[1]}": v for k, v in compiled.items()},
    }
    _report(results)
    if _JSON.value:
        with open(_JSON.value, "w") as fh:
            json.dump(results, fh, indent=2, default=str)
    return results


def _report(res: dict) -> None:
    rows = res["scenes"]
    med = lambda xs: float(np.median(xs)) * 1e3
    pts = [r["points"] for r in rows]
    out = [
        ("device", res["device"]),
        ("config", f"{res['config']} {' '.join(res['overrides'])}"),
        ("sparse conv impl", res["impl"]),
        ("weights", res["checkpoint"] or "random init (untrained)"),
        (
            "scenes (points min/median/max)",
            f"{len(rows)} ({min(pts)}/{int(np.median(pts))}/{max(pts)}), buckets "
            f"{sorted({r['bucket'] for r in rows})}",
        ),
    ]
    if "stage_s" in rows[0]:
        total = [sum(r["stage_s"].values()) for r in rows]
        for s in STAGES:
            vals = [r["stage_s"][s] for r in rows]
            share = 100 * np.median(
                [r["stage_s"][s] / tt for r, tt in zip(rows, total, strict=True)]
            )
            comp = [r["stage_compile_s"][s] for r in rows if r["stage_compile_s"][s] is not None]
            out.append(
                (f"  {s}", f"{med(vals):8.1f} ms  ({share:4.1f}%)  compile {np.sum(comp):.1f} s")
            )
        out.append(("  sum of stages", f"{med(total):8.1f} ms"))
        out.append(
            (
                "foreground / candidates / instances / kept",
                " / ".join(
                    str(int(np.median([r[k] for r in rows])))
                    for k in ("foreground", "candidates", "instances", "kept")
                )
                + " (medians)",
            )
        )
        worst = max(r["stages_mask_diff_frac"] for r in rows)
        out.append(
            (
                "staged output == fused output",
                (
                    "yes, bitwise"
                    if all(r["stages_bitwise_equal"] for r in rows)
                    else f"yes within tolerance (at most {worst:.1e} of mask entries differ)"
                )
                if all(r["stages_match_fused"] for r in rows)
                else "NO: " + ", ".join(r["scene"] for r in rows if not r["stages_match_fused"]),
            )
        )
    fc = [r["fused_compile_s"] for r in rows if r["fused_compile_s"] is not None]
    out += [
        (
            "fused make_predict_fn (warm)",
            f"{med([r['fused_s'] for r in rows]):8.1f} ms median, "
            f"{min(r['fused_s'] for r in rows) * 1e3:.1f}-"
            f"{max(r['fused_s'] for r in rows) * 1e3:.1f} ms",
        ),
        ("fused compile", f"{len(fc)} shape(s), {', '.join(f'{c:.1f}' for c in fc)} s"),
        ("host peak RSS", f"{res['host_peak_gib']:.2f} GiB"),
        (
            "device peak in use",
            "-" if res["device_peak_gib"] is None else f"{res['device_peak_gib']:.2f} GiB",
        ),
    ]
    out.append(
        (
            "published per scene (older GPUs)",
            ", ".join(f"{k} {v} ms" for k, v in PUBLISHED_MS.items()),
        )
    )
    if any("warning" in r for r in rows):
        out.append(
            ("WARNING", ", ".join(f"{r['scene']}: {r['warning']}" for r in rows if "warning" in r))
        )
    print()
    print(table(out, "DKNet inference, one scene per batch"), flush=True)


if __name__ == "__main__":
    default = "configs/synthetic.py" if flag_given(sys.argv, "quick") else "configs/scannet.py"
    sys.argv = with_default_config(sys.argv, default)
    run_absl(main)

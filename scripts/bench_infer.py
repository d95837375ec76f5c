"""Inference benchmark: per-scene latency (warm), compile time, and a per-stage breakdown.

Place in the data flow: a standalone measurement of inference (``EvalIterator`` ->
``predictor.make_predict_fn`` [DKNet forward -> post-processing]) on synthetic rooms, for
``docs/benchmarks.md`` ("Inference"). Data and config helpers come from
``scripts/bench_train.py`` (same cached rooms).

    python scripts/bench_infer.py                 # ScanNet config, 8 ScanNet-sized rooms
    python scripts/bench_infer.py --quick         # synthetic config, small rooms (minutes on a CPU)
    python scripts/bench_infer.py --gpu_budget    # 4 rooms, 3 reps: ~2 minutes on a GPU

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

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_train (helpers)
from bench_train import (  # noqa: E402
    REPO,
    apply_defaults,
    compiled_gib,
    device_line,
    device_peak_gib,
    host_peak_gib,
    load_config,
    scene_paths,
    table,
)

PUBLISHED_MS = {"PointGroup": 452, "SoftGroup": 345, "ISBNet": 237, "SPFormer": 247}
STAGES = ("backbone", "heads", "candidates", "aggregation", "masks", "postprocess")


def make_stage_fns(graphdef, config):
    """One jit function per stage of ``DKNet.__call__`` (its stage methods) plus the
    post-processing of ``predictor.make_predict_fn``; each takes (params, rest, ...)."""
    import jax
    from flax import nnx

    from dknet_jax.inference.predictor import postprocess_batch

    if config.model.kernel_from == "oracle":
        raise SystemExit(
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
        help="config override, e.g. --set model.candidates=nms (repeatable)",
    )
    p.add_argument("--scenes", type=int, default=None, help="rooms (default 8)")
    p.add_argument("--reps", type=int, default=3, help="timed warm calls per stage")
    p.add_argument("--size", default=None, choices=("tiny", "small", "scannet"))
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
    p.add_argument("--impl", default=None, choices=("auto", "xla", "pallas"))
    p.add_argument("--checkpoint", default=None, help="workdir to restore weights from")
    p.add_argument("--no_stages", action="store_true", help="time only the fused function")
    p.add_argument("--quick", action="store_true", help="synthetic config, 3 small rooms")
    p.add_argument("--gpu_budget", action="store_true", help="4 ScanNet-sized rooms")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = p.parse_args(argv)
    defaults = dict(
        config="configs/synthetic.py" if args.quick else "configs/scannet.py",
        scenes=3 if args.quick else 4 if args.gpu_budget else 8,
        size="small" if args.quick else "scannet",
    )
    return apply_defaults(args, defaults)


def main(argv=None) -> dict:
    args = parse_args(argv)
    overrides = list(args.set) + ["data.eval_batch_size=1"]
    if args.impl:
        overrides.append(f"kernels.impl={args.impl}")
    config = load_config(args.config, overrides)
    paths = scene_paths(args, args.size)

    import jax

    from dknet_jax.data.pipeline import EvalIterator
    from dknet_jax.inference.predictor import load_model, make_predict_fn
    from dknet_jax.model import build_model
    from dknet_jax.sparse.conv import resolve_impl

    dev = device_line()
    print(dev, flush=True)
    d, m = config.data, config.model
    if args.checkpoint:
        model = load_model(args.checkpoint, config, which="latest")
        graphdef, params, rest = model.graphdef, model.params, model.rest
        print(f"restored step {model.step} from {args.checkpoint}", flush=True)
    else:
        graphdef, params, rest = build_model(config)
    predict = make_predict_fn(graphdef, config)
    stage_fns = None if args.no_stages else make_stage_fns(graphdef, config)
    it = EvalIterator(
        paths,
        batch_size=1,
        voxel_size=d.voxel_size,
        num_classes=m.num_classes,
        buckets=d.point_buckets,
        instance_buckets=d.instance_buckets,
        num_workers=1,
        prefetch=1,
    )
    compiled: dict = {}
    rows = []
    for batch_np, names in it:
        batch = jax.device_put(batch_np)
        n_pts = int(np.asarray(batch_np.valid).sum())
        bucket = int(batch_np.valid.shape[0])
        shape = (bucket, int(batch_np.instance_class.shape[0]))
        r = {"scene": names[0], "points": n_pts, "bucket": bucket}
        c, t, fused = timed(predict, (params, rest, batch), args.reps, compiled, ("fused", shape))
        r["fused_s"], r["fused_compile_s"] = t, c
        if bool(fused.voxel_overflow):
            r["warning"] = "voxel capacity overflow"
        r["kept"] = int(np.asarray(fused.keep).sum())
        if stage_fns is not None:
            f = stage_fns
            c1, t1, (fp, overflow) = timed(
                f["backbone"], (params, rest, batch), args.reps, compiled, ("backbone", shape)
            )
            c2, t2, (h, heat) = timed(
                f["heads"], (params, rest, batch, fp), args.reps, compiled, ("heads", shape)
            )
            c3, t3, (cand_idx, cand_ok, exhausted) = timed(
                f["candidates"],
                (params, rest, batch, h, heat),
                args.reps,
                compiled,
                ("candidates", shape),
            )
            c4, t4, groups = timed(
                f["aggregation"],
                (params, rest, batch, h, heat, cand_idx, cand_ok),
                args.reps,
                compiled,
                ("aggregation", shape),
            )
            inst_ok = groups.inst_ok
            c5, t5, mask_logits = timed(
                f["masks"], (params, rest, batch, h, groups), args.reps, compiled, ("masks", shape)
            )
            c6, t6, out = timed(
                f["postprocess"],
                (batch, h.semantic_logits, mask_logits, inst_ok),
                args.reps,
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
        "config": args.config,
        "overrides": overrides,
        "impl": resolve_impl(config.kernels.impl),
        "checkpoint": args.checkpoint,
        "scenes": rows,
        "host_peak_gib": host_peak_gib(),
        "device_peak_gib": device_peak_gib(),
        "xla_memory_gib": {f"{k[0]} {k[1]}": v for k, v in compiled.items()},
    }
    _report(args, results)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2, default=str)
    return results


def _report(args, res: dict) -> None:
    rows = res["scenes"]
    med = lambda xs: float(np.median(xs)) * 1e3
    pts = [r["points"] for r in rows]
    out = [
        ("device", res["device"]),
        ("config", f"{os.path.relpath(res['config'], REPO)} {' '.join(res['overrides'])}"),
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
    main()

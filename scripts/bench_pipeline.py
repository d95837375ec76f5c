"""Input-pipeline benchmark: throughput of the training/eval iterators on ScanNet-sized
scenes, and the number of distinct batch shapes over 200 varied scenes.

  python scripts/bench_pipeline.py [--data DIR_OF_PREPARED_NPZ] [--batches 6]

Without --data it writes random room-like scenes (~150k points: floor, walls, boxes as
instances) to a temporary folder. Results go to stdout (copy them to docs/benchmarks.md).
"""

import argparse
import os
import tempfile
import time

import numpy as np

from dknet_jax.config import base_config
from dknet_jax.data.batching import batch_capacities, make_ladder
from dknet_jax.data.dataset import list_scenes
from dknet_jax.data.pipeline import EvalIterator, TrainIterator
from dknet_jax.data.transforms import AugmentConfig


def room(n, seed):
    """f32 room-like cloud of n points: floor + 4 walls (half the points) + 12-30 boxes."""
    rng = np.random.default_rng(seed)
    size = rng.uniform([3, 3, 2.5], [9, 8, 3.2])
    k = int(rng.integers(12, 30))
    n_shell = n // 2
    u = rng.random((n_shell, 3)) * size
    face = rng.integers(0, 5, n_shell)  # 0 floor, 1-4 walls
    u[face == 0, 2] = 0
    u[face == 1, 0], u[face == 2, 0] = 0, size[0]
    u[face == 3, 1], u[face == 4, 1] = 0, size[1]
    parts, inst, sem = [u], [np.full(n_shell, -100)], [np.minimum(face, 1)]
    per = np.diff(np.linspace(0, n - n_shell, k + 1).astype(int))
    for j, m in enumerate(per):
        lo = rng.uniform([0, 0, 0], size - [1, 1, 1.5])
        parts.append(lo + rng.random((m, 3)) * rng.uniform(0.3, 1.0, 3))
        inst.append(np.full(m, j))
        sem.append(np.full(m, rng.integers(2, 20)))
    xyz = np.concatenate(parts).astype(np.float32)
    cell = np.floor(xyz / 0.25).astype(np.int64)
    return {
        "xyz": xyz + np.float32(rng.uniform(-3, 3)),
        "rgb": rng.integers(0, 256, (n, 3)).astype(np.uint8),
        "semantic": np.concatenate(sem).astype(np.int32),
        "instance": np.concatenate(inst).astype(np.int32),
        "superpoint": np.unique(cell, axis=0, return_inverse=True)[1].reshape(-1).astype(np.int32),
    }


def timed(it, batches):
    """(batches/s wall, CPU seconds of this thread per batch) after one warm-up batch. The
    CPU figure is the cost of building a batch in synchronous mode (workers=0), which
    does not depend on how busy the machine is."""
    next(it)  # warm-up: thread start, first loads
    t, c = time.perf_counter(), time.thread_time()
    for _ in range(batches):
        next(it)
    return batches / (time.perf_counter() - t), (time.thread_time() - c) / batches


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=None)
    ap.add_argument("--scenes", type=int, default=8)
    ap.add_argument("--batches", type=int, default=6)
    args = ap.parse_args()
    cfg = base_config().data
    ladder = make_ladder(16_384, 1_048_576, factors=(1.0, 1.5), multiple=1024)
    with tempfile.TemporaryDirectory() as tmp:
        if args.data is None:
            for i in range(args.scenes):
                np.savez(os.path.join(tmp, f"scene{i:04d}_00.npz"), **room(150_000, i))
        paths = list_scenes(args.data or tmp)
        common = dict(
            voxel_size=cfg.voxel_size,
            num_classes=20,
            buckets=ladder,
            instance_buckets=cfg.instance_buckets,
            voxel_origin=cfg.voxel_origin,
        )
        aug = AugmentConfig.for_voxel_size(cfg.voxel_size, max_points=cfg.max_points)
        for workers in (0, 1, 2):
            it = TrainIterator(
                paths,
                batch_size=4,
                seed=0,
                augment_config=aug,
                num_workers=workers,
                prefetch=4,
                **common,
            )
            bps, cpu = timed(it, args.batches)
            it.close()
            extra = f"  ({cpu:.2f} CPU-s per batch)" if workers == 0 else ""
            print(
                f"train  batch 4  workers={workers}: {bps:.2f} batches/s  "
                f"{4 * bps:.2f} scenes/s{extra}"
            )
        ev = EvalIterator(paths, batch_size=4, num_workers=2, **common)
        t = time.perf_counter()
        n = sum(1 for _ in ev)
        dt = time.perf_counter() - t
        print(f"eval   batch<=4 workers=2: {n / dt:.2f} batches/s  {len(paths) / dt:.2f} scenes/s")

    # distinct (N, G) shapes over 200 ScanNet-like scenes (sizes: lognormal, median 140k,
    # 20k..550k; instances ~ Poisson(18) scaled by size), after the 250k training crop
    rng = np.random.default_rng(0)
    sizes = np.clip(rng.lognormal(np.log(140_000), 0.45, 200), 20_000, 550_000).astype(int)
    kinds = np.maximum(rng.poisson(18 * sizes / 140_000), 1)
    sizes = np.minimum(sizes, cfg.max_points)
    for name, buckets in (
        ("config.data.point_buckets (x2)", cfg.point_buckets),
        ("make_ladder x{1, 1.5}", ladder),
    ):
        shapes, fill = set(), []
        for epoch in range(3):
            order = np.random.default_rng(epoch).permutation(200)
            for s in range(0, 200, 4):
                idx = order[s : s + 4]
                nc, gc = batch_capacities(
                    sizes[idx], kinds[idx], buckets=buckets, instance_buckets=cfg.instance_buckets
                )
                shapes.add((nc, gc))
                fill.append(sizes[idx].sum() / nc)
        print(
            f"shapes over 200 scenes x 3 shuffles, {name}: {len(shapes)} distinct "
            f"{sorted(shapes)}; mean fill {np.mean(fill):.2f}"
        )


if __name__ == "__main__":
    main()

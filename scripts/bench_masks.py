"""Benchmark of the dynamic-conv mask decoder: every slot over every chunk vs per scene.

Place in the data flow: a standalone measurement of ``dknet_jax.model.mask_decoder`` and
``dknet_jax.objective.mask_loss`` (the training step's mask path), used for
``docs/benchmarks.md`` ("Mask decoding per scene").

    python scripts/bench_masks.py                  # demo and paper shapes
    python scripts/bench_masks.py --quick          # demo shape only

For a packed batch of B scenes (slots ``[s K/B, (s+1) K/B)`` of scene s, each scene's rows
contiguous, 15% padding at the end, as ``pack_batch`` and ``DKNet`` lay them out), times
forward+backward (``jit(value_and_grad)`` w.r.t. the kernels and the mask features) of
the decoder with ``scene_blocks=1`` (every slot decoded on every chunk, the masked-out
logits filled) and ``scene_blocks=B`` (each block of slots on its own scene's chunks),
alternating the two, in one process. Shapes: the demo's dense path (``configs/synthetic.py``:
B 2, 32 slots, 32,768 rows, chunk 8192, ``decode_masks`` + a loss over the logits) and
the paper's chunked loss (``configs/scannet.py``'s batch 4 and chunk 16,384,
``decoded_mask_loss``) with 80 slots per scene on ``--paper_rows`` rows: a reduced size
(the shipped config has up to 150 slots per scene and batches of 786,432 rows, ~3.7x the
pairs), so that it runs in a minute.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from dknet_jax.benchmarking import device_line
from dknet_jax.model.mask_decoder import MASK_FILL, decode_masks, num_kernel_params
from dknet_jax.objective.mask_loss import decoded_mask_loss


def _inputs(scenes: int, slots: int, rows: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    k = scenes * slots
    real = int(rows * 0.85)
    return dict(
        kernels=rng.normal(size=(k, num_kernel_params())).astype(np.float32) * 0.3,
        centroids=rng.normal(size=(k, 3)).astype(np.float32),
        inst_batch=np.repeat(np.arange(scenes, dtype=np.int32), slots),
        inst_ok=np.ones(k, bool),
        mask_feats=rng.normal(size=(rows, 16)).astype(np.float32),
        xyz=rng.normal(size=(rows, 3)).astype(np.float32),
        batch_id=np.minimum(np.arange(rows) * scenes // real, scenes).astype(np.int32),
        valid=np.arange(rows) < real,
        instance=rng.integers(0, 20, rows).astype(np.int32),
        gt_for_pred=rng.integers(-1, 20, k).astype(np.int32),
    )


def _loss(kernels, mask_feats, a, *, mode, chunk, blocks):
    args = (kernels, a["centroids"], a["inst_batch"], a["inst_ok"], mask_feats, a["xyz"])
    args += (a["batch_id"], a["valid"])
    if mode == "dense":
        z = decode_masks(*args, chunk_size=chunk, scene_blocks=blocks)
        return jnp.sum(jnp.where(z > MASK_FILL, jax.nn.sigmoid(z), 0.0))
    loss, _, _ = decoded_mask_loss(
        *args, a["instance"], a["gt_for_pred"], chunk_size=chunk, scene_blocks=blocks
    )
    return loss


def bench(mode: str, scenes: int, slots: int, rows: int, chunk: int, repeats: int) -> None:
    a = {key: jnp.asarray(v) for key, v in _inputs(scenes, slots, rows).items()}
    fns, first, values = {}, {}, {}
    for blocks in (1, scenes):
        f = functools.partial(_loss, mode=mode, chunk=chunk, blocks=blocks)
        fns[blocks] = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
        t0 = time.perf_counter()
        values[blocks] = jax.block_until_ready(fns[blocks](a["kernels"], a["mask_feats"], a))
        first[blocks] = time.perf_counter() - t0
    times = {blocks: [] for blocks in fns}
    for _ in range(repeats):
        for blocks, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(a["kernels"], a["mask_feats"], a))
            times[blocks].append(time.perf_counter() - t0)
    same = float(values[1][0]) == float(values[scenes][0])
    t1, tb = (float(np.median(times[b])) for b in (1, scenes))
    print(
        f"{mode:7s} B={scenes} K={scenes * slots} rows={rows} chunk={chunk}: fwd+bwd "
        f"scene_blocks=1 {t1 * 1e3:8.0f} ms, scene_blocks={scenes} {tb * 1e3:8.0f} ms "
        f"({t1 / tb:.2f}x); first call {first[1]:.1f} / {first[scenes]:.1f} s; "
        f"loss equal: {same}",
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the demo shape only")
    p.add_argument("--paper_rows", type=int, default=262_144, help="rows of the paper shape")
    p.add_argument("--repeats", type=int, default=4, help="timed calls per variant")
    args = p.parse_args()
    print(device_line(), flush=True)
    bench("dense", 2, 32, 32_768, 8192, args.repeats)
    if not args.quick:
        bench("chunked", 4, 80, args.paper_rows, 16_384, args.repeats)


if __name__ == "__main__":
    main()

"""Benchmark of the sparse engine on a synthetic room: subm conv vs an equal-FLOP matmul.

Place in the data flow: a standalone measurement of ``dknet_jax.sparse`` (kernel maps +
convolutions) and ``dknet_jax.model.backbone`` (the full UNet), used for
``docs/benchmarks.md`` ("Sparse engine").

    python scripts/bench_sparse.py               # full room (~159k voxels at 2 cm)
    python scripts/bench_sparse.py --quick       # small room, < 1 minute on a CPU
    python scripts/bench_sparse.py --impl pallas # force the Pallas path (GPU)

The room (deterministic): floor, three walls, a table, a cabinet, a sofa-like block and
shelves, sampled at 1 cm, turned 0.3 rad about z (not grid-aligned), voxelised at 2 cm
(~159k voxels at the default --scale 1.05, ~13 neighbours per voxel of 27). The
equal-FLOP baseline is a dense ``[R, Cin] @ [Cin, Cout]`` matmul with R = the number of
existing neighbour pairs (FLOPs = 2 R Cin Cout); fwd+bwd of the baseline is
value_and_grad w.r.t. both operands. Printed side by side in one run at 32 and 64
channels: the model path (``conv.subm_conv`` on a prebuilt map), the public
``subm_conv3d`` (its kernel map built inside every call), the matmul, and spconv's CPU
``SubMConv3d`` when ``spconv`` and ``torch`` import (optional, never a dependency); then
the full UNet forward / forward+backward and compile times.
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dknet_jax.benchmarking import device_peak_gib, host_peak_gib
from dknet_jax.model.backbone import SparseUNet, count_params
from dknet_jax.sparse import conv, hashing, subm_conv3d
from dknet_jax.sparse.voxelize import voxelize


def _box_surface(rng, lo, hi, step=0.01, open_bottom=True):
    """Points on the faces of an axis-aligned box (bottom face left out by default)."""
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    pts = []
    for axis in range(3):
        for side in (0, 1):
            if axis == 2 and side == 0 and open_bottom:
                continue
            a, b = [i for i in range(3) if i != axis]
            ga = np.arange(lo[a], hi[a], step)
            gb = np.arange(lo[b], hi[b], step)
            ma, mb = np.meshgrid(ga, gb, indexing="ij")
            p = np.empty((ma.size, 3))
            p[:, a], p[:, b] = ma.ravel(), mb.ravel()
            p[:, axis] = hi[axis] if side else lo[axis]
            pts.append(p)
    return np.concatenate(pts)


def make_room(
    scale: float = 1.0, voxel: float = 0.02, seed: int = 0, noise: float = 0.0, yaw: float = 0.3
) -> np.ndarray:
    """i32[V, 3] voxel coordinates of a synthetic room (``scale`` shrinks it)."""
    rng = np.random.default_rng(seed)
    w, d, h = 3.6 * scale, 3.0 * scale, 2.2 * scale
    parts = [
        _box_surface(rng, (0, 0, -0.01), (w, d, 0.0)),  # floor slab (top face)
        _box_surface(rng, (0, 0, 0), (0.01, d, h)),  # walls (thin boxes)
        _box_surface(rng, (0, d - 0.01, 0), (w, d, h)),
        _box_surface(rng, (w - 0.01, 0, 0), (w, d, h)),
    ]
    furniture = [  # (lo, hi) in fractions of the room
        ((0.30, 0.30, 0.0), (0.55, 0.50, 0.31)),  # table
        ((0.05, 0.75, 0.0), (0.25, 0.98, 0.80)),  # cabinet
        ((0.60, 0.05, 0.0), (0.95, 0.25, 0.18)),  # sofa-like block
        ((0.80, 0.60, 0.3), (0.98, 0.95, 0.32)),  # shelf
        ((0.80, 0.60, 0.6), (0.98, 0.95, 0.62)),  # shelf
    ]
    for lo, hi in furniture:
        s = np.array([w, d, h])
        parts.append(_box_surface(rng, np.array(lo) * s, np.array(hi) * s))
    xyz = np.concatenate(parts)
    c, s_ = np.cos(yaw), np.sin(yaw)  # a scan is never aligned with the voxel grid
    xyz = xyz @ np.array([[c, -s_, 0], [s_, c, 0], [0, 0, 1]]).T
    xyz += rng.normal(0, noise, xyz.shape)
    vox = np.unique(np.floor(xyz / voxel).astype(np.int32), axis=0)
    return vox - vox.min(0)


def _time(fn, *args, repeats: int):
    """(median warm seconds, seconds of the first call = compile + one run)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)), first


def _peak_mem() -> str:
    device = device_peak_gib()
    if device is not None:
        return f"{device:.2f} GiB device"
    return f"{host_peak_gib():.2f} GiB host RSS"


def _spconv_times(coords, x, g, w, repeats):
    """spconv's CPU SubMConv3d [fwd, fwd+bwd] seconds when spconv and torch import (an
    optional comparison, never a dependency), else None. Its kernel map is built on the
    first call and kept by the tensor, like the model's per-level maps."""
    try:
        import spconv.pytorch as spc
        import spconv.pytorch.ops as spc_ops
        import torch
    except ImportError:
        return None
    spc_ops.get_current_stream = lambda: 0  # spconv 2.3.8's CPU backward asks for a stream
    c = x.shape[1]
    layer = spc.SubMConv3d(c, c, 3, bias=False, indice_key="bench")
    w5 = torch.from_numpy(np.asarray(w).reshape(3, 3, 3, c, c))
    with torch.no_grad():  # ours [kx, ky, kz, Cin, Cout] -> spconv [Cout, kx, ky, kz, Cin]
        layer.weight.copy_(w5.permute(4, 0, 1, 2, 3))
    feats = torch.from_numpy(np.asarray(x)).requires_grad_(True)
    gt = torch.from_numpy(np.asarray(g))
    shape = (coords[:, 1:].max(0) + 1).tolist()
    st = spc.SparseConvTensor(feats, torch.from_numpy(coords), shape, batch_size=1)

    def run(bwd):
        out = layer(st).features
        if bwd:
            feats.grad = None
            layer.weight.grad = None
            out.backward(gt)

    times = []
    for bwd in (False, True):
        run(bwd)
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            run(bwd)
            ts.append(time.perf_counter() - t)
        times.append(float(np.median(ts)))
    return times


def _bench_convs(args, impl, coords, smap, pairs):
    """Model-path subm conv, public subm_conv3d, equal-FLOP matmul (and spconv) side by
    side at 32 and 64 channels."""
    v = coords.shape[0]
    rng = np.random.default_rng(0)
    r = args.repeats
    rows = []
    for c in (32, 64):
        x = jnp.asarray(rng.normal(size=(v, c)), jnp.float32)
        w = jnp.asarray(rng.normal(size=(27, c, c)) / np.sqrt(27 * c), jnp.float32)
        g = jnp.asarray(rng.normal(size=(v, c)), jnp.float32)
        fwd = jax.jit(lambda x, w, s: conv.subm_conv(x, w, s, impl=impl))
        both = jax.jit(
            jax.value_and_grad(
                lambda x, w, s, g: jnp.vdot(conv.subm_conv(x, w, s, impl=impl), g), argnums=(0, 1)
            )
        )
        # The public op from outside: coordinates are an argument, so its kernel map is
        # built inside every call, as for a user calling it on plain arrays.
        pub = jax.jit(
            jax.value_and_grad(
                lambda x, w, c, g: jnp.vdot(subm_conv3d(c, x, w, impl=impl), g), argnums=(0, 1)
            )
        )
        xd = jnp.asarray(rng.normal(size=(pairs, c)), jnp.float32)
        wd = jnp.asarray(rng.normal(size=(c, c)), jnp.float32)
        gd = jnp.asarray(rng.normal(size=(pairs, c)), jnp.float32)
        dfwd = jax.jit(lambda a, b: a @ b)
        dboth = jax.jit(jax.value_and_grad(lambda a, b, g: jnp.vdot(a @ b, g), argnums=(0, 1)))
        df, _ = _time(dfwd, xd, wd, repeats=r)
        db, _ = _time(dboth, xd, wd, gd, repeats=r)
        del xd, gd
        sf, cf = _time(fwd, x, w, smap, repeats=r)
        sb, cb = _time(both, x, w, smap, g, repeats=r)
        pb, cp = _time(pub, x, w.reshape(3, 3, 3, c, c), jnp.asarray(coords), g, repeats=r)
        sp = _spconv_times(coords, x, g, w, r)
        rows.append((c, df, db, sf, sb, pb, sp, cf, cb, cp))
    print(
        "\n| C -> C | GFLOP fwd | matmul fwd / fwd+bwd ms | model subm fwd ms (ratio) "
        "| model subm fwd+bwd ms (ratio) | public subm_conv3d fwd+bwd ms, map incl. (ratio) "
        "| spconv fwd / fwd+bwd ms (fwd+bwd ratio) | first call s: model fwd / fwd+bwd / public |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for c, df, db, sf, sb, pb, sp, cf, cb, cp in rows:
        spc = "not installed"
        if sp is not None:
            spc = f"{sp[0] * 1e3:.0f} / {sp[1] * 1e3:.0f} ({sp[1] / db:.2f}x)"
        print(
            f"| {c} -> {c} | {2 * pairs * c * c / 1e9:.2f} | {df * 1e3:.0f} / {db * 1e3:.0f} "
            f"| {sf * 1e3:.0f} ({sf / df:.2f}x) | {sb * 1e3:.0f} (**{sb / db:.2f}x**) "
            f"| {pb * 1e3:.0f} ({pb / db:.2f}x) | {spc} | {cf:.1f} / {cb:.1f} / {cp:.1f} |"
        )
    print(f"\npeak memory after the conv benchmark: {_peak_mem()}")


def _bench_backbone(args, impl, vox, valid):
    v = len(vox)
    rng = np.random.default_rng(0)
    net = SparseUNet(impl=impl, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(net, nnx.Param, ...)
    feats = jnp.asarray(rng.normal(size=(v, 6)), jnp.float32)
    bid = jnp.zeros(v, jnp.int32)
    args_in = (jnp.asarray(vox), bid, jnp.asarray(valid), feats)  # arguments, not constants

    def forward(params, vox, bid, valid, feats, train):
        vx = voxelize(vox, bid, valid, feats, capacity=v)
        out = nnx.merge(graphdef, params, rest, copy=True)(vx, train=train)
        return jnp.mean(out**2)

    fwd = jax.jit(lambda p, *a: forward(p, *a, train=False))
    step = jax.jit(jax.value_and_grad(lambda p, *a: forward(p, *a, train=True)))
    t0 = time.perf_counter()
    step_c = step.lower(params, *args_in).compile()
    t_compile = time.perf_counter() - t0
    val = float(jax.block_until_ready(step_c(params, *args_in))[0])
    tf, first_f = _time(fwd, params, *args_in, repeats=args.repeats)
    tb, _ = _time(step_c, params, *args_in, repeats=args.repeats)
    maps = jax.jit(lambda *a: net.kernel_maps(voxelize(*a, capacity=v)))(*args_in)
    counts = [int(np.sum(np.asarray(lv.valid))) for lv in maps]
    fits = all(bool(lv.subm.tiles.ok) for lv in maps)
    print(
        f"\nbackbone: {count_params(net):,} params, level voxels {counts} "
        f"(capacities {[lv.valid.shape[0] for lv in maps]}, tiles fit={fits}); "
        f"loss {val:.4f} finite={np.isfinite(val)}"
    )
    print(
        f"backbone per scene ({v} voxels): forward {tf * 1e3:.0f} ms, forward+backward "
        f"{tb * 1e3:.0f} ms; compile: forward+backward {t_compile:.1f} s, forward "
        f"{first_f - tf:.1f} s"
    )
    print(f"peak memory: {_peak_mem()}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--impl", default="auto", choices=conv.IMPLS)
    ap.add_argument("--quick", action="store_true", help="small room (smoke run / demo)")
    ap.add_argument("--scale", type=float, default=1.05, help="room size (1.05: ~159k voxels)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no_backbone", action="store_true")
    ap.add_argument("--no_convs", action="store_true")
    ap.add_argument(
        "--pairs_per_voxel",
        type=float,
        default=14.0,
        help="tile capacity of the model-path map (the UNet default is 14)",
    )
    args = ap.parse_args()
    impl = conv.resolve_impl(args.impl)
    vox = make_room(scale=0.35 if args.quick else args.scale)
    v = len(vox)
    coords = np.concatenate([np.zeros((v, 1), np.int32), vox], 1)
    valid = np.ones(v, bool)
    print(
        f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"{platform.processor() or platform.machine()}; impl={impl}"
    )
    if not args.no_convs:
        build = jax.jit(lambda c, m: hashing.subm_map(c, m, pairs_per_voxel=args.pairs_per_voxel))
        smap = build(coords, valid)
        t_map, _ = _time(build, coords, valid, repeats=args.repeats)
        build26 = jax.jit(lambda c, m: hashing.subm_map(c, m, pairs_per_voxel=26.0))
        t_map26, _ = _time(build26, coords, valid, repeats=args.repeats)
        pairs = int(np.sum(np.asarray(smap.nbr) < v))
        tl = smap.tiles
        print(
            f"room: {v} voxels at 2 cm, {pairs} neighbour pairs ({pairs / v:.2f} per voxel "
            f"incl. the centre); model map: off-centre tiles {int(tl.used)} used of "
            f"{tl.tile_k.shape[0]} x {tl.tile_rows} rows, fit={bool(tl.ok)}, built in "
            f"{t_map * 1e3:.0f} ms; the public op's map (complete tiles, 26 pairs/voxel) "
            f"{t_map26 * 1e3:.0f} ms; conv loop step {conv.STEP_ROWS} pair rows"
        )
        _bench_convs(args, impl, coords, smap, pairs)
    if not args.no_backbone:
        _bench_backbone(args, impl, vox, valid)


if __name__ == "__main__":
    main()

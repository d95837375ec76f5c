"""GPU check of the Pallas gather-matmul (pallas_kernels/sparse_conv.py): errors and timings.

Self-contained (jax, numpy and this repo). On a CUDA GPU it compiles the Triton kernel,
compares forward and gradients (feats, weight) with the XLA reference computed at HIGHEST
precision, and times forward and forward+backward of the kernel against two XLA baselines
(``ref``: gather [V, K, Cin] + einsum; ``scan``: per-offset gather + matmul accumulated in
a loop), warm, median of several runs. Cases: small random tables (missing neighbours,
odd channels) and a synthetic room (floor, walls, boxes at 2 cm, ~150k voxels) with its
3x3x3 submanifold table, C = 32->32, 64->64 and the UNet's widest decoder input 384->192
(K = 27, f32; tiles from ``derive_block_sizes``).

Then the whole UNet (``SparseUNet``, paper widths 32..224, 2 blocks per level) on that
room: forward + backward (loss sum(out * cot) / V, train mode) with ``impl="pallas"`` and
``impl="xla"``, same weights, both compared with XLA at HIGHEST precision (output and
every parameter gradient, errors relative to each array's max |ref|), and warm times of
forward and forward+backward for both. A pass here is the evidence for turning on
``AUTO_PALLAS_ON_GPU`` in ``dknet_jax/sparse/conv.py``.

  python scripts/gpu_check_pallas.py            # full: + 224->224 and a block_rows sweep
  python scripts/gpu_check_pallas.py --quick    # the required cases, fewer repeats
  python scripts/gpu_check_pallas.py --unet_only           # only the full-UNet check
  JAX_PLATFORMS=cpu python scripts/gpu_check_pallas.py --interpret --quick  # script check
      (on CPU the UNet check runs widths 8,16 on a tiny room unless --unet_widths is given)

Exit status: 0 all cases match, 1 a mismatch or a failed case, 2 no GPU (without --interpret).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.sparse_conv import (
    default_block_sizes,
    gather_matmul,
    gather_matmul_reference,
)

OFFSETS = np.array(list(itertools.product(range(3), repeat=3)), np.int64) - 1  # k <-> 26-k


def room_voxels(scale: float, voxel: float = 0.02, seed: int = 0) -> np.ndarray:
    """Unique i64[V, 3] voxel coords of a room: floor, 4 walls, 6 boxes (surfaces only).

    scale=1: 3.8 x 3.3 m floor, 1.3 m walls -> ~150k voxels at 2 cm, ~12.5 neighbours per
    voxel. Points are sampled on the surfaces (at voxel centres) with 6 mm normal noise,
    so surfaces are 1-2 voxels thick like real scans.
    """
    rng = np.random.default_rng(seed)
    lx, ly, h = 3.8 * scale, 3.3 * scale, 1.3 * scale
    quads = [  # (origin, edge u, edge v)
        ((0, 0, 0), (lx, 0, 0), (0, ly, 0)),
        ((0, 0, 0), (lx, 0, 0), (0, 0, h)),
        ((0, ly, 0), (lx, 0, 0), (0, 0, h)),
        ((0, 0, 0), (0, ly, 0), (0, 0, h)),
        ((lx, 0, 0), (0, ly, 0), (0, 0, h)),
    ]
    for _ in range(6):  # boxes: top + 4 sides
        sx, sy, sz = rng.uniform(0.3, 1.0, 3) * scale
        x0, y0 = rng.uniform(0.1 * scale, lx - sx), rng.uniform(0.1 * scale, ly - sy)
        quads += [
            ((x0, y0, sz), (sx, 0, 0), (0, sy, 0)),
            ((x0, y0, 0), (sx, 0, 0), (0, 0, sz)),
            ((x0, y0 + sy, 0), (sx, 0, 0), (0, 0, sz)),
            ((x0, y0, 0), (0, sy, 0), (0, 0, sz)),
            ((x0 + sx, y0, 0), (0, sy, 0), (0, 0, sz)),
        ]
    pts = []
    for o, u, v in quads:
        o, u, v = (np.asarray(a, np.float64) for a in (o, u, v))
        area = np.linalg.norm(np.cross(u, v))
        n = int(4 * area / voxel**2) + 1
        ab = rng.random((n, 2))
        pts.append(o + ab[:, :1] * u + ab[:, 1:] * v + rng.normal(0, 0.006, (n, 3)))
    vox = np.floor(np.concatenate(pts) / voxel + 0.5).astype(np.int64)
    return np.unique(vox, axis=0)


def submanifold_table(coords: np.ndarray) -> np.ndarray:
    """i32[V, 27] index of the voxel at coords[i] + OFFSETS[k], -1 if absent (sorted keys)."""
    c = coords - coords.min(0) + 1
    dims = c.max(0) + 2
    keys = (c[:, 0] * dims[1] + c[:, 1]) * dims[2] + c[:, 2]
    order = np.argsort(keys)
    sorted_keys = keys[order]
    nbr = np.full((len(c), 27), -1, np.int32)
    for k, d in enumerate(OFFSETS):
        q = c + d
        qk = (q[:, 0] * dims[1] + q[:, 1]) * dims[2] + q[:, 2]
        pos = np.clip(np.searchsorted(sorted_keys, qk), 0, len(c) - 1)
        hit = sorted_keys[pos] == qk
        nbr[hit, k] = order[pos[hit]]
    return nbr


def random_table(rng, v, k, missing=0.3):
    nbr = rng.integers(0, v, size=(v, k))
    holes = rng.random((v, k)) < missing
    nbr[holes] = rng.choice([-1, v, v + 3], size=int(holes.sum()))
    return nbr.astype(np.int32)


def scan_baseline(feats, nbr, weight):
    """XLA per-offset gather + matmul, accumulated in a loop (no [V, K, Cin] tensor)."""
    idx = jnp.where((nbr >= 0) & (nbr < feats.shape[0]), nbr, feats.shape[0])

    def body(k, acc):
        rows = jnp.take(feats, idx[:, k], axis=0, mode="fill", fill_value=0)
        return acc + rows @ weight[k]

    acc = jnp.zeros((nbr.shape[0], weight.shape[2]), feats.dtype)
    return jax.lax.fori_loop(0, nbr.shape[1], body, acc)


def fwd_and_grad(fn, nbr, cot):
    fwd = jax.jit(lambda f, w: fn(f, nbr, w))
    grad = jax.jit(jax.grad(lambda f, w: jnp.sum(fn(f, nbr, w) * cot), argnums=(0, 1)))
    return fwd, grad


def timed(fn, args, repeats):
    jax.block_until_ready(fn(*args))  # compile + warm
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def _highest_precision():
    """Context for the accuracy reference: exact f32 dots (XLA's default may be TF32)."""
    ctx = getattr(jax, "default_matmul_precision", None)
    return ctx("highest") if ctx is not None else contextlib.nullcontext()


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))


def run_case(name, nbr, cin, cout, mirrored, args, tol, seed=0):
    """Checks and times one case; returns a result row (dict)."""
    rng = np.random.default_rng(seed)
    v, k = nbr.shape
    feats = jnp.asarray(rng.normal(size=(v, cin)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=(k, cin, cout)) / np.sqrt(k * cin), jnp.float32)
    cot = jnp.asarray(rng.normal(size=(v, cout)), jnp.float32)
    nbr_d = jnp.asarray(nbr)
    kern = lambda f, n, w: gather_matmul(f, n, w, mirrored=mirrored, interpret=args.interpret)
    k_fwd, k_grad = fwd_and_grad(kern, nbr_d, cot)
    with _highest_precision():
        r_fwd, r_grad = fwd_and_grad(gather_matmul_reference, nbr_d, cot)
        want = r_fwd(feats, weight)
        want_df, want_dw = r_grad(feats, weight)
    got = k_fwd(feats, weight)
    got_df, got_dw = k_grad(feats, weight)
    errs = (rel_err(got, want), rel_err(got_df, want_df), rel_err(got_dw, want_dw))
    row = dict(
        case=name,
        v=v,
        pairs=float((nbr >= 0).sum() / v),
        c=f"{cin}->{cout}",
        mirrored=mirrored,
        err_fwd=errs[0],
        err_dfeats=errs[1],
        err_dw=errs[2],
        ok=max(errs) <= tol,
    )
    if not row["ok"]:
        print(f"  MISMATCH in {name}: rel errors fwd/dfeats/dweight = {errs} > tol {tol}")
    if args.repeats > 0:
        x_fwd, x_grad = fwd_and_grad(gather_matmul_reference, nbr_d, cot)
        s_fwd, s_grad = fwd_and_grad(scan_baseline, nbr_d, cot)
        fw = (feats, weight)
        for label, fn in [
            ("k_fwd", k_fwd),
            ("k_fb", k_grad),
            ("ref_fwd", x_fwd),
            ("ref_fb", x_grad),
            ("scan_fwd", s_fwd),
            ("scan_fb", s_grad),
        ]:
            try:
                row[label] = timed(fn, fw, args.repeats)
            except Exception as e:  # e.g. the [V, K, Cin] reference running out of memory
                print(f"  timing {label} failed: {type(e).__name__}: {str(e)[:300]}")
        pairs = float((nbr >= 0).sum())
        if "k_fwd" in row:
            row["tflops"] = 2 * pairs * cin * cout / (row["k_fwd"] * 1e-3) / 1e12
    return row


def block_sweep(nbr, cin, cout, args):
    rng = np.random.default_rng(1)
    feats = jnp.asarray(rng.normal(size=(nbr.shape[0], cin)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=(27, cin, cout)), jnp.float32)
    nbr_d = jnp.asarray(nbr)
    out = {}
    for br in (32, 64, 128, 256):
        try:
            fn = jax.jit(
                lambda f, w, br=br: gather_matmul(
                    f, nbr_d, w, interpret=args.interpret, block_rows=br
                )
            )
            out[br] = timed(fn, (feats, weight), args.repeats)
        except Exception as e:
            print(f"  block_rows={br} failed: {type(e).__name__}: {str(e)[:300]}")
    return out


def fmt(x, spec):
    return format(x, spec) if isinstance(x, float) else "-"


def print_table(rows):
    cols = [
        "case",
        "V",
        "nbr/v",
        "C",
        "err fwd",
        "err dF",
        "err dW",
        "k fwd",
        "ref fwd",
        "scan fwd",
        "k f+b",
        "ref f+b",
        "scan f+b",
        "TFLOP/s",
    ]
    print("\ntimes in ms (median); errors relative to max|ref| (ref at HIGHEST precision)")
    print(" | ".join(cols))
    for r in rows:
        print(
            " | ".join(
                [
                    r["case"],
                    str(r["v"]),
                    f"{r['pairs']:.1f}",
                    r["c"],
                    f"{r['err_fwd']:.1e}",
                    f"{r['err_dfeats']:.1e}",
                    f"{r['err_dw']:.1e}",
                    fmt(r.get("k_fwd"), ".2f"),
                    fmt(r.get("ref_fwd"), ".2f"),
                    fmt(r.get("scan_fwd"), ".2f"),
                    fmt(r.get("k_fb"), ".2f"),
                    fmt(r.get("ref_fb"), ".2f"),
                    fmt(r.get("scan_fb"), ".2f"),
                    fmt(r.get("tflops"), ".2f"),
                ]
            )
        )


def unet_check(coords: np.ndarray, args, tol: float) -> bool:
    """Full SparseUNet forward+backward, impl="pallas" vs "xla", against XLA at HIGHEST.

    Prints the errors (output, worst parameter gradient) of both paths and their warm
    times; returns whether the Pallas path is finite and within ``tol``.
    """
    from flax import nnx

    from dknet_jax.model.backbone import SparseUNet, subm_conv_shapes
    from dknet_jax.sparse.voxelize import voxelize

    widths = tuple(int(w) for w in args.unet_widths.split(","))
    v = len(coords)
    rng = np.random.default_rng(3)
    vox = jnp.asarray(coords - coords.min(0), jnp.int32)
    inputs = (
        vox,
        jnp.zeros(v, jnp.int32),
        jnp.ones(v, bool),
        jnp.asarray(rng.uniform(-1, 1, size=(v, 6)), jnp.float32),
        jnp.asarray(rng.normal(size=(v, widths[0])), jnp.float32),
    )

    def build(impl):
        net = SparseUNet(6, widths, args.unet_blocks, impl=impl, rngs=nnx.Rngs(0))
        graphdef, params, rest = nnx.split(net, nnx.Param, ...)

        def loss(params, vox, bid, valid, feats, cot, train=True):
            vx = voxelize(vox, bid, valid, feats, capacity=v)
            out = nnx.merge(graphdef, params, rest, copy=True)(vx, train=train)
            return jnp.sum(out * cot) / v, out

        fwd = jax.jit(lambda p, *a: loss(p, *a, train=False)[1])
        step = jax.jit(jax.value_and_grad(loss, has_aux=True))
        return net, params, fwd, step

    net, params, _, _ = build("xla")
    shapes = sorted(set(subm_conv_shapes(net)))
    print(
        f"UNet widths {widths}, {args.unet_blocks} blocks/level, {v} voxels; subm shapes {shapes}"
    )
    with _highest_precision():
        _, _, _, ref_step = build("xla")
        (_, want_out), want_g = jax.block_until_ready(ref_step(params, *inputs))
    rows, ok = [], True
    for impl in ("xla", "pallas"):
        try:
            _, p_impl, fwd, step = build(impl)
            same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), p_impl, params)
            assert all(jax.tree.leaves(same)), "weights differ between the two builds"
            t = time.perf_counter()
            (loss_val, out), grads = jax.block_until_ready(step(params, *inputs))
            first = time.perf_counter() - t
            err_out = rel_err(out, want_out)
            leaf_errs = jax.tree.leaves(jax.tree.map(rel_err, grads, want_g))
            err_g = max(leaf_errs)
            finite = bool(np.isfinite(float(loss_val))) and bool(jnp.isfinite(out).all())
            t_fwd = timed(fwd, (params, *inputs), args.repeats)
            t_fb = timed(step, (params, *inputs), args.repeats)
            rows.append((impl, err_out, err_g, t_fwd, t_fb, first, finite))
            if impl == "pallas" and not (finite and max(err_out, err_g) <= tol):
                ok = False
        except Exception as e:
            print(f"  UNet impl={impl} FAILED: {type(e).__name__}: {str(e)[:2000]}")
            traceback.print_exc(limit=4)
            ok = False
    print("impl | err out | max err dParam | fwd ms | fwd+bwd ms | first call s | finite")
    for impl, eo, eg, tf, tb, first, finite in rows:
        print(f"{impl} | {eo:.1e} | {eg:.1e} | {tf:.1f} | {tb:.1f} | {first:.1f} | {finite}")
    print(f"UNET {'OK' if ok else 'FAILED'}: pallas vs XLA-highest within {tol}")
    return ok


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="required cases only, 5 repeats")
    p.add_argument("--interpret", action="store_true", help="Pallas interpreter (CPU check)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per measurement")
    p.add_argument("--unet_only", action="store_true", help="only the full-UNet check")
    p.add_argument("--no_unet", action="store_true", help="skip the full-UNet check")
    p.add_argument("--unet_widths", default=None, help="e.g. 32,64,96,128,160,192,224")
    p.add_argument("--unet_blocks", type=int, default=None, help="blocks per level")
    args = p.parse_args(argv)
    if args.unet_widths is None:
        args.unet_widths = "8,16" if args.interpret else "32,64,96,128,160,192,224"
    if args.unet_blocks is None:
        args.unet_blocks = 1 if args.interpret else 2
    if args.repeats is None:
        args.repeats = 1 if args.interpret else (5 if args.quick else 20)

    backend = jax.default_backend()
    dev = jax.devices()[0]
    print(f"jax {jax.__version__}, backend {backend}, device: {dev.device_kind} ({dev})")
    if backend != "gpu" and not args.interpret:
        print(
            "NO GPU: jax sees no CUDA device, so the compiled Triton kernel cannot run. "
            "Install jax with CUDA support on a GPU machine, or check the script itself "
            "on CPU with: JAX_PLATFORMS=cpu python scripts/gpu_check_pallas.py "
            "--interpret --quick"
        )
        return 2
    on_gpu = backend == "gpu" and not args.interpret
    tol = 1e-2 if on_gpu else 1e-4  # TF32 dots on GPU (kernel and XLA default precision)

    t0 = time.perf_counter()
    scale = 1.0 if not args.interpret else 0.12
    coords = room_voxels(scale)
    room = submanifold_table(coords)
    print(
        f"room: {len(coords)} voxels at 2 cm, {(room >= 0).sum() / len(coords):.1f} "
        f"neighbours/voxel (self included), table built in {time.perf_counter() - t0:.1f}s"
    )
    i_idx, k_idx = np.nonzero(room >= 0)
    assert (room[room[i_idx, k_idx], 26 - k_idx] == i_idx).all(), "room table not mirrored"

    rng = np.random.default_rng(0)
    small = submanifold_table(np.unique(rng.integers(0, 12, size=(900, 3)), axis=0))
    cases = [
        ("random K5", lambda: random_table(rng, 1000, 5), 6, 32, False),
        ("random K27", lambda: random_table(rng, 777, 27), 7, 5, False),
        ("subm small", lambda: small, 16, 16, True),
        ("room", lambda: room, 32, 32, True),
        ("room", lambda: room, 64, 64, True),
        ("room", lambda: room, 384, 192, True),
    ]
    if not args.quick:
        cases += [
            ("room", lambda: room, 224, 224, True),
            ("room unmirr", lambda: room, 32, 32, False),
        ]

    rows, failed = [], []
    if args.unet_only:
        cases = []
    for name, make_nbr, cin, cout, mirrored in cases:
        label = f"{name} {cin}->{cout}"
        t = time.perf_counter()
        print(f"case {label} (mirrored={mirrored}) ...", flush=True)
        try:
            nbr = make_nbr()
            print(f"  default blocks: {default_block_sizes(nbr.shape[0], cin, cout)}")
            rows.append(run_case(name, nbr, cin, cout, mirrored, args, tol))
            if not rows[-1]["ok"]:
                failed.append(label)
        except Exception as e:
            failed.append(label)
            print(f"  FAILED {label}: {type(e).__name__}: {str(e)[:2000]}")
            traceback.print_exc(limit=4)
        print(f"  done in {time.perf_counter() - t:.1f}s", flush=True)

    if rows:
        print_table(rows)
    if not args.no_unet:
        unet_coords = coords if not args.interpret else room_voxels(0.05)
        if not unet_check(unet_coords, args, 2e-2 if on_gpu else 1e-4):
            failed.append("unet")
    if not args.quick and not args.unet_only:
        for cin in (32, 64):
            try:
                sweep = block_sweep(room, cin, cin, args)
                print(
                    f"block_rows sweep, room {cin}->{cin} fwd ms: "
                    + ", ".join(f"{b}: {t:.2f}" for b, t in sweep.items())
                )
            except Exception as e:
                print(f"block sweep {cin} failed: {type(e).__name__}: {e}")
    print(f"total {time.perf_counter() - t0:.1f}s")
    if failed:
        print(f"FAILED/MISMATCH: {failed}")
        return 1
    print("ALL OK: kernel matches the reference (forward, d_feats, d_weight) in every case")
    return 0


if __name__ == "__main__":
    sys.exit(main())

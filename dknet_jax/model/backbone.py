"""The PointGroup sparse UNet backbone (Flax NNX) on the padded sparse engine.

Place in the data flow: ``sparse.voxelize`` -> :class:`Voxels` -> **SparseUNet** ->
per-voxel features f32[V, 32] -> ``voxel_to_point`` -> point heads (``model/heads``).

Architecture (docs/method.md section 2, PointGroup): input submanifold conv 6 -> 32; levels of
widths 32, 64, ..., 224, each with ``blocks_per_level`` pre-activation residual blocks
(BN -> ReLU -> subm conv3 -> BN -> ReLU -> subm conv3, plus a bias-free 1x1 projection on
the skip when widths differ); between levels BN -> ReLU -> k2 s2 conv down and
BN -> ReLU -> inverse conv up, concatenation with the skip, ``blocks_per_level`` blocks;
output BN -> ReLU. Convolutions have no bias (BatchNorm follows).

Static shapes: level l has a capacity ``V_l`` (``V_0 = V``, then ``level_capacity_ratio``
times the previous one, at least ``min_level_capacity``). The kernel maps of every level
(neighbour table + tiles, down / up map) are built once per forward, inside jit, and
shared by all convolutions of that level. If a level's real voxels exceed its capacity,
or the coordinates exceed the 32-bit key space, the output is NaN (never silently
truncated); :meth:`SparseUNet.kernel_maps` exposes the flags.

BatchNorm (:class:`MaskedBatchNorm`) takes its statistics over valid rows only, keeps
running statistics, and writes 0 into padded rows. Train/eval follows the ``train``
argument, or ``module.train()`` / ``module.eval()`` when it is None. Every BatchNorm of
the UNet is followed by a ReLU, fused into it (``relu=True``); in training mode both run
through :func:`masked_batch_norm`, whose backward pass is written out and keeps only the
input rows and per-channel statistics.

Memory levers (``docs/benchmarks.md``, "Training step memory"):
- ``precision`` ("f32" | "bf16"; the training step sets it from ``config.train.precision``):
  with "bf16" the activations between layers and the conv / projection inputs are
  bfloat16, every matmul accumulates in f32 (``preferred_element_type``), BatchNorm
  computes its statistics and normalisation in f32 and keeps f32 running statistics;
  parameters stay f32 (each layer casts its weight to the activation dtype, so the
  gradient reaching the parameter is f32). The UNet output is f32 either way.
- ``remat`` ("none" | "block" | "level", ``config.model.remat``): ``jax.checkpoint``
  (``nnx.remat``) around every residual block, keeping only the conv outputs
  (:data:`CONV_OUT`, so only BatchNorm / ReLU are recomputed in the backward pass), or
  around every UNet level (encoder side: blocks + down conv; decoder side: up conv +
  blocks), keeping nothing inside it (the level's forward is recomputed once in the
  backward pass). Same numbers as "none", less memory, more compute.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from dknet_jax.config import level_values
from dknet_jax.sparse import conv, hashing
from dknet_jax.sparse.voxelize import Voxels, voxel_to_point

Array = jax.Array

# checkpoint name of every sparse-conv output in the UNet: what ``remat="block"`` keeps
CONV_OUT = "unet_conv_out"
PRECISIONS = {"f32": jnp.float32, "bf16": jnp.bfloat16}
REMATS = ("none", "block", "level")


# --------------------------------------------------------------------------- layers


class MaskedBatchNorm(nnx.Module):
    """BatchNorm over rows ``x: f[V, C]`` whose statistics use only ``valid`` rows.

    PyTorch-style defaults of PointGroup (eps 1e-4, momentum 0.1 = flax momentum 0.9);
    the running variance is the unbiased one. Padded rows come out as 0.
    """

    def __init__(
        self,
        num_features: int,
        *,
        momentum: float = 0.9,
        epsilon: float = 1e-4,
        rngs: nnx.Rngs | None = None,
    ):
        del rngs
        self.momentum = momentum
        self.epsilon = epsilon
        self.use_running_average = False
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))

    def __call__(
        self, x: Array, valid: Array, train: bool | None = None, *, relu: bool = False
    ) -> Array:
        """Normalised ``x`` in ``x``'s dtype (then ReLU when ``relu``); statistics and
        arithmetic in f32. In training mode the normalisation runs through
        :func:`masked_batch_norm` (hand-written backward pass)."""
        train = (not self.use_running_average) if train is None else train
        if train:
            y, mean, unbiased, n = _masked_bn(
                x, valid, self.scale[...], self.bias[...], self.epsilon, relu
            )
            mom = jnp.where(n > 0, self.momentum, 1.0)  # no update from an empty batch
            self.mean.set_value(mom * self.mean[...] + (1 - mom) * mean)
            self.var.set_value(mom * self.var[...] + (1 - mom) * unbiased)
            return y
        mean, var = self.mean[...], self.var[...]
        inv = jax.lax.rsqrt(var + self.epsilon)
        y = _normalise(x.astype(jnp.float32), mean, inv, self.scale[...], self.bias[...])
        y = jnp.where(valid[:, None], y, 0).astype(x.dtype)
        return jax.nn.relu(y) if relu else y


def _normalise(xf: Array, mean: Array, inv: Array, scale: Array, bias: Array) -> Array:
    return (xf - mean) * inv * scale + bias


def _batch_stats(x: Array, valid: Array):
    """f32 rows, valid-row count, mean and biased variance over the valid rows."""
    xf = x.astype(jnp.float32)
    m = valid[:, None]
    n = jnp.sum(valid).astype(jnp.float32)
    nz = jnp.maximum(n, 1.0)
    mean = jnp.sum(jnp.where(m, xf, 0), axis=0) / nz
    var = jnp.sum(jnp.where(m, jnp.square(xf - mean), 0), axis=0) / nz
    return xf, n, nz, mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def masked_batch_norm(x, valid, scale, bias, epsilon: float, relu: bool):
    """Training-mode BatchNorm over the ``valid`` rows of ``x: f[V, C]`` (+ ReLU).

    Returns ``(y, mean, unbiased_var, n)``: ``y`` in ``x``'s dtype with padded rows 0,
    the batch mean and unbiased variance (f32[C], for the running statistics) and the
    valid-row count. Gradients flow to ``x``, ``scale`` and ``bias`` through ``y`` only.

    The backward pass is written out (the textbook batch-norm gradient over the valid
    rows, times the ReLU mask): it recomputes the normalised rows from ``x`` and the
    per-channel statistics instead of keeping autodiff's f32 intermediates, so the step
    keeps no ``[V, C]`` residual of its own (``x`` is the previous conv's output, kept
    anyway) and XLA compiles ~15 kernels per layer instead of ~21 (docs/benchmarks.md,
    "Train-step compile time"). Tested against autodiff of the plain formula.
    """
    return _mbn_fwd(x, valid, scale, bias, epsilon, relu)[0]


def _mbn_fwd(x, valid, scale, bias, epsilon, relu):
    xf, n, nz, mean, var = _batch_stats(x, valid)
    inv = jax.lax.rsqrt(var + epsilon)
    y = jnp.where(valid[:, None], _normalise(xf, mean, inv, scale, bias), 0).astype(x.dtype)
    if relu:
        y = jax.nn.relu(y)
    unbiased = var * nz / jnp.maximum(n - 1.0, 1.0)
    return (y, mean, unbiased, n), (x, valid, scale, bias, mean, inv, nz)


def _mbn_bwd(epsilon, relu, res, cts):
    del epsilon
    x, valid, scale, bias, mean, inv, nz = res
    g = cts[0].astype(jnp.float32)
    xhat = (x.astype(jnp.float32) - mean) * inv
    keep = valid[:, None]
    if relu:
        keep = keep & (xhat * scale + bias > 0)
    g = jnp.where(keep, g, 0)
    dbias = jnp.sum(g, axis=0)
    dscale = jnp.sum(g * xhat, axis=0)
    dx = (inv * scale) * (g - (dbias + xhat * dscale) / nz)
    dx = jnp.where(valid[:, None], dx, 0).astype(x.dtype)
    return dx, None, dscale, dbias


masked_batch_norm.defvjp(_mbn_fwd, _mbn_bwd)
_masked_bn = jax.jit(masked_batch_norm, static_argnums=(4, 5))


# Every conv and BatchNorm call of the UNet runs through a nested jit: layers of one
# shape (the convs of a level, the BatchNorms of a width) are lowered once and called
# from the step, instead of once per layer. XLA inlines the calls (the compiled step is
# the same); the step's lower time is what shrinks (JAX still traces and linearizes every
# call; docs/benchmarks.md, "Train-step compile time").
_subm_conv = jax.jit(conv.subm_conv, static_argnames=("impl", "fallback"))
_strided_conv = jax.jit(conv.strided_conv)
_inverse_conv = jax.jit(conv.inverse_conv)


def _he_normal(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int) -> Array:
    return jax.random.normal(rngs.params(), shape, jnp.float32) * jnp.sqrt(2.0 / fan_in)


class SubmConv3d(nnx.Module):
    """Submanifold 3x3x3 convolution (no bias): weight f32[27, Cin, Cout], applied in the
    dtype of ``x`` (the output has ``x``'s dtype). ``fallback``: see ``conv.subm_conv``
    (False: the caller checks the map's ``tiles.ok``; the UNet passes ``Level.fallback``)."""

    def __init__(self, cin: int, cout: int, *, impl: str = "auto", rngs: nnx.Rngs):
        self.impl = impl
        self.weight = nnx.Param(_he_normal(rngs, (27, cin, cout), 27 * cin))

    def __call__(self, x: Array, smap: hashing.SubmMap, fallback: bool = True) -> Array:
        w = self.weight[...].astype(x.dtype)
        out = _subm_conv(x, w, smap, impl=self.impl, fallback=fallback)
        return checkpoint_name(out, CONV_OUT)


class DownConv3d(nnx.Module):
    """Kernel-2 stride-2 convolution fine -> coarse (no bias): weight f32[8, Cin, Cout]."""

    def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs):
        self.weight = nnx.Param(_he_normal(rngs, (8, cin, cout), 8 * cin))

    def __call__(self, x: Array, dmap: hashing.DownMap) -> Array:
        w = self.weight[...].astype(x.dtype)
        return checkpoint_name(_strided_conv(x, w, dmap), CONV_OUT)


class UpConv3d(nnx.Module):
    """Inverse kernel-2 convolution coarse -> fine (no bias): weight f32[8, Cin, Cout]."""

    def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs):
        self.weight = nnx.Param(_he_normal(rngs, (8, cin, cout), cin))

    def __call__(self, xc: Array, dmap: hashing.DownMap) -> Array:
        w = self.weight[...].astype(xc.dtype)
        return checkpoint_name(_inverse_conv(xc, w, dmap), CONV_OUT)


@flax.struct.dataclass
class Level:
    """Kernel maps of one UNet level (V_l rows).

    Attributes:
      valid: bool[V_l] real voxels of the level.
      subm: the level's submanifold map (shared by all its 3x3x3 convs).
      down: map to level l+1 (None on the coarsest level).
      fallback: static; the level's submanifold convs compile the per-offset fallback for
        tiles that overflow, or read no tiles (Pallas). False: tiles that overflow are an
        overflow of the level (``SparseUNet(tile_fallback=False)``).
    """

    valid: Array
    subm: hashing.SubmMap
    down: hashing.DownMap | None
    fallback: bool = flax.struct.field(pytree_node=False, default=True)

    @property
    def overflow(self) -> Array:
        o = self.subm.overflow
        tiles = self.subm.tiles
        if not self.fallback and tiles is not None and not tiles.complete:
            o = o | ~tiles.ok  # the convs compiled no fallback
        return o if self.down is None else o | self.down.overflow


class ResidualBlock(nnx.Module):
    """Pre-activation residual block: BN-ReLU-subm3-BN-ReLU-subm3 (+ 1x1 projection)."""

    def __init__(self, cin: int, cout: int, *, impl: str = "auto", rngs: nnx.Rngs):
        self.bn1 = MaskedBatchNorm(cin)
        self.conv1 = SubmConv3d(cin, cout, impl=impl, rngs=rngs)
        self.bn2 = MaskedBatchNorm(cout)
        self.conv2 = SubmConv3d(cout, cout, impl=impl, rngs=rngs)
        self.proj = nnx.Param(_he_normal(rngs, (cin, cout), cin)) if cin != cout else None

    def __call__(self, x: Array, level: Level, train: bool | None) -> Array:
        h = self.bn1(x, level.valid, train, relu=True)
        h = self.conv1(h, level.subm, level.fallback)
        h = self.bn2(h, level.valid, train, relu=True)
        h = self.conv2(h, level.subm, level.fallback)
        if self.proj is None:
            skip = x
        else:
            p = self.proj[...].astype(x.dtype)
            skip = jnp.matmul(x, p, preferred_element_type=jnp.float32).astype(x.dtype)
        return h + skip


# --------------------------------------------------------------------------- UNet


def _per_level(
    value, count: int, name: str, upper: float = 1.0, unit: str = "level transition"
) -> tuple[float, ...]:
    """A number in (0, ``upper``], or ``count`` of them (one per ``unit``) -> ``count`` floats."""
    values = level_values(value)
    if len(values) == 1:
        values = values * count
    if len(values) != count or not all(0.0 < x <= upper for x in values):
        raise ValueError(
            f"{name} must be a number in (0, {upper:g}] or {count} of them "
            f"(one per {unit}), got {value!r}"
        )
    return values


def level_capacities(v: int, num_levels: int, ratio, minimum: int) -> list[int]:
    """Static row capacities V_0..V_{L-1}: V_0 = v, then ceil(ratio_l * V_{l-1}) rounded up
    to a multiple of 8, at least ``minimum`` and at most V_{l-1}. ``ratio`` is a float or
    one value per level transition."""
    caps = [int(v)]
    for r in _per_level(ratio, num_levels - 1, "level_capacity_ratio"):
        c = -(-int(r * caps[-1]) // 8) * 8
        caps.append(min(caps[-1], max(minimum, c)))
    return caps


class SparseUNet(nnx.Module):
    """PointGroup sparse UNet: :class:`Voxels` -> per-voxel features f32[V, widths[0]].

    Args:
      in_channels: input feature width (6: rgb + xyz).
      widths: channel width of each level (7 levels: 32 ... 224).
      blocks_per_level: residual blocks per level on each side of the U.
      impl: sparse conv implementation, "auto" | "xla" | "pallas".
      level_capacity_ratio: capacity of level l+1 relative to level l, a float or one
        value per level transition (1.0 never overflows; room surfaces keep far fewer
        voxels per halving, see the measured ratios in ``docs/benchmarks.md``, "Sparse
        engine").
      min_level_capacity: lower bound of every level's capacity.
      pairs_per_voxel: tile capacity of the submanifold maps in off-centre neighbour
        pairs per expected voxel, a float or one value per level. The CPU convolution
        walks only the tiles in use, so the capacity costs index memory (8 bytes per
        pair slot), not convolution time. >= 26 holds every pair a level
        can have: no fallback exists or is compiled. Below 26 the tiles hold
        ``pairs_per_voxel * min(V_l, V * expected_level_ratio**l)`` pairs at level l
        (``V_l`` its row capacity; room-like sets have ~12 per voxel at 2 cm); a level
        with more pairs falls back to the
        dense per-offset path (correct, slower; with ``tile_fallback``), so the number
        trades memory and compile time, never correctness.
      expected_level_ratio: voxels of level l+1 per voxel of level l that the tiles are
        sized for when ``pairs_per_voxel`` < 26 (0.5: the default level capacities).
        Room surfaces at 2 cm keep ~0.24 per halving, sparse scans up to ~0.6 at the
        first; a smaller ratio saves index memory but sends such scans' levels to the
        fallback.
      tile_fallback: compile the dense per-offset fallback into every submanifold conv
        whose tiles hold fewer than every pair (exact whatever the pair count). False:
        no fallback is compiled (~95 fewer kernels in a paper-config train step), and a
        level whose tiles overflowed makes the output NaN like a voxel-capacity
        overflow; the training loop, ``predict`` and ``evaluate`` then rerun the batch
        with :func:`dknet_jax.config.overflow_safe` settings (``config.model.tile_fallback``).
      remat: "none" | "block" | "level": rematerialisation in the backward pass (module
        docstring); memory only, the numbers are those of "none".
      precision: "f32" | "bf16": activation dtype (module docstring); an attribute the
        training step may set on a built module (``config.train.precision``).
    """

    def __init__(
        self,
        in_channels: int = 6,
        widths: Sequence[int] = (32, 64, 96, 128, 160, 192, 224),
        blocks_per_level: int = 2,
        *,
        impl: str = "auto",
        level_capacity_ratio: float | Sequence[float] = 0.5,
        min_level_capacity: int = 64,
        pairs_per_voxel: float | Sequence[float] = 14.0,
        expected_level_ratio: float = 0.5,
        tile_fallback: bool = True,
        remat: str = "none",
        precision: str = "f32",
        rngs: nnx.Rngs,
    ):
        widths = tuple(int(w) for w in widths)
        check_levers(remat, precision)
        if not widths or blocks_per_level < 1:
            raise ValueError(
                f"SparseUNet needs >= 1 level and >= 1 block per level, got "
                f"widths={widths}, blocks_per_level={blocks_per_level}"
            )
        _per_level(level_capacity_ratio, len(widths) - 1, "level_capacity_ratio")
        conv.resolve_impl(impl)  # validate early
        self.widths = widths
        self.level_capacity_ratio = (
            tuple(level_capacity_ratio)
            if isinstance(level_capacity_ratio, (list, tuple))
            else level_capacity_ratio
        )
        self.min_level_capacity = min_level_capacity
        self.pairs_per_voxel = _per_level(
            pairs_per_voxel, len(widths), "pairs_per_voxel", upper=27.0, unit="level"
        )
        self.expected_level_ratio = expected_level_ratio
        self.tile_fallback = bool(tile_fallback)
        self.impl = impl
        self.remat = remat
        self.precision = precision
        self.use_running_average = False
        nb = blocks_per_level
        self.input_conv = SubmConv3d(in_channels, widths[0], impl=impl, rngs=rngs)
        self.encoders = nnx.List(
            [
                nnx.List([ResidualBlock(w, w, impl=impl, rngs=rngs) for _ in range(nb)])
                for w in widths
            ]
        )
        self.down_bns = nnx.List([MaskedBatchNorm(w) for w in widths[:-1]])
        self.downs = nnx.List(
            [DownConv3d(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:], strict=True)]
        )
        self.up_bns = nnx.List([MaskedBatchNorm(b) for b in widths[1:]])
        self.ups = nnx.List(
            [UpConv3d(b, a, rngs=rngs) for a, b in zip(widths[:-1], widths[1:], strict=True)]
        )
        self.decoders = nnx.List(
            [
                nnx.List(
                    [
                        ResidualBlock(2 * w if i == 0 else w, w, impl=impl, rngs=rngs)
                        for i in range(nb)
                    ]
                )
                for w in widths[:-1]
            ]
        )
        self.output_bn = MaskedBatchNorm(widths[0])

    def kernel_maps(self, voxels: Voxels) -> list[Level]:
        """Kernel maps of all levels, built from ``voxels.coords`` / ``valid`` (jit-able)."""
        caps = level_capacities(
            voxels.capacity, len(self.widths), self.level_capacity_ratio, self.min_level_capacity
        )
        ppvs = []
        for lvl in range(len(caps)):
            # Tiles are sized for the expected count; the row capacity keeps a safe margin.
            expected = min(
                caps[lvl],
                max(self.min_level_capacity, voxels.capacity * self.expected_level_ratio**lvl),
            )
            ppv = self.pairs_per_voxel[lvl]
            # >= 26: tiles for every pair the level's capacity can hold (never a fallback,
            # none compiled); otherwise sized for the expected voxels.
            ppvs.append(26.0 if ppv >= 26.0 else ppv * expected / caps[lvl])
        # All levels in one pass (one sort for the coarse sets, one search for their
        # neighbour tables, one tile build per map kind): docs/benchmarks.md,
        # "Train-step compile time".
        subms, downs = hashing.level_maps(voxels.coords, voxels.valid, caps, pairs_per_voxel=ppvs)
        valids = [voxels.valid] + [d.valid for d in downs]
        downs = downs + [None]
        # the Pallas kernel reads the neighbour table, not the tiles
        fallback = self.tile_fallback or conv.resolve_impl(self.impl) != "xla"
        levels = [
            Level(valid=v, subm=sm, down=d, fallback=fallback)
            for v, sm, d in zip(valids, subms, downs, strict=True)
        ]
        return levels

    def __call__(self, voxels: Voxels, train: bool | None = None) -> Array:
        """Per-voxel features f32[V, widths[0]] (0 on padded rows, NaN on overflow)."""
        if train is None:
            train = not self.use_running_average
        check_levers(self.remat, self.precision)
        with jax.named_scope("kernel_maps"):
            levels = self.kernel_maps(voxels)
        x = voxels.feats.astype(PRECISIONS[self.precision])
        x = self.input_conv(x, levels[0].subm, levels[0].fallback)
        skips = []
        for lvl, level in enumerate(levels):
            mods = (self.encoders[lvl],)
            if level.down is not None:
                mods += (self.down_bns[lvl], self.downs[lvl])
            with jax.named_scope(f"encode{lvl}"):
                x, skip = self._level(_encode_level, mods, (x, level), train)
            if level.down is not None:
                skips.append(skip)
        for lvl in range(len(levels) - 2, -1, -1):
            mods = (self.up_bns[lvl], self.ups[lvl], self.decoders[lvl])
            args = (x, skips[lvl], levels[lvl], levels[lvl + 1].valid)
            with jax.named_scope(f"decode{lvl}"):
                x = self._level(_decode_level, mods, args, train)
        x = self.output_bn(x, levels[0].valid, train, relu=True).astype(jnp.float32)
        overflow = voxels.overflow
        for level in levels:
            overflow = overflow | level.overflow
        return jnp.where(overflow, jnp.nan, x)

    def _level(self, fn, mods: tuple, args: tuple, train: bool):
        """``fn(mods, *args, train=train, block=...)``, checkpointed as a whole with
        ``remat="level"``; with ``remat="block"`` each residual block is."""
        if self.remat == "level":
            return remat_call(mods, functools.partial(fn, train=train), _SAVE_NOTHING, *args)
        return fn(mods, *args, train=train, block=_block_runner(self.remat))

    def point_features(self, voxels: Voxels, train: bool | None = None) -> Array:
        """Per-point features f32[N, widths[0]] (0 for invalid points)."""
        return voxel_to_point(self(voxels, train), voxels.point_to_voxel)


def check_levers(remat: str, precision: str) -> None:
    """Validate the memory levers of :class:`SparseUNet` (names what to use instead)."""
    if remat not in REMATS:
        raise ValueError(f"SparseUNet remat must be one of {REMATS}, got {remat!r}")
    if precision not in PRECISIONS:
        raise ValueError(
            f"SparseUNet precision must be one of {tuple(PRECISIONS)}, got {precision!r}"
        )


_SAVE_CONV = jax.checkpoint_policies.save_only_these_names(CONV_OUT)
_SAVE_NOTHING = jax.checkpoint_policies.nothing_saveable


def checkpoint_after_cotangent(fn, policy):
    """``jax.checkpoint(fn, policy=policy)`` whose backward recomputation cannot start
    before the cotangent of ``fn``'s output exists.

    With a plain ``jax.checkpoint`` nothing orders the recomputation after the rest of the
    forward pass, and XLA's CPU scheduler places it right after the original forward
    ops: the residuals are live from the forward pass on again and the compiled step's
    memory does not go down at all (measured: the same XLA estimate to the byte, none /
    block / level). Here the backward pass first passes the saved residuals and the
    cotangent through one ``lax.optimization_barrier``, so the recomputation depends on
    the cotangent. Same values as ``fn`` and as its plain gradient; ``fn`` maps arrays
    (pytrees) to arrays and has no side effects.
    """
    ck = jax.checkpoint(fn, policy=policy)

    @jax.custom_vjp
    def run(*args):
        return fn(*args)

    def fwd(*args):
        return jax.vjp(ck, *args)  # (output, VJP: a pytree of the saved residuals)

    def bwd(vjp_fn, ct):
        vjp_fn, ct = jax.lax.optimization_barrier((vjp_fn, ct))
        return vjp_fn(ct)

    run.defvjp(fwd, bwd)
    return run


def remat_call(modules, fn, policy, *args):
    """``fn(modules, *args)`` rematerialised (:func:`checkpoint_after_cotangent`): the
    modules' state goes in as arrays, their updated non-parameter state (BatchNorm
    running statistics) comes out and is written back, as an eager call would."""
    graphdef, params, rest = nnx.split(modules, nnx.Param, ...)

    def pure(params, rest, *args):
        mods = nnx.merge(graphdef, params, rest)
        out = fn(mods, *args)
        return out, nnx.split(mods, nnx.Param, ...)[2]

    out, new_rest = checkpoint_after_cotangent(pure, policy)(params, rest, *args)
    nnx.update(modules, new_rest)
    return out


def _block_runner(remat: str):
    """How a level calls its residual blocks: eagerly, or each one checkpointed keeping
    only the conv outputs (``remat="block"``)."""
    if remat != "block":
        return lambda block, x, level, train: block(x, level, train)

    def run(block, x, level, train):
        fn = lambda b, x, level: b(x, level, train)
        return remat_call(block, fn, _SAVE_CONV, x, level)

    return run


def _encode_level(mods, x: Array, level: Level, *, train: bool, block=None):
    """Encoder side of a level, ``mods = (blocks,)`` or ``(blocks, down_bn, down)``: the
    blocks, then (above the coarsest level) BN -> ReLU -> down conv. Returns (input of the
    next level, skip); on the coarsest level both are the blocks' output."""
    block = block or _block_runner("none")
    for b in mods[0]:
        x = block(b, x, level, train)
    if len(mods) == 1:
        return x, x
    _, bn, down = mods
    return down(bn(x, level.valid, train, relu=True), level.down), x


def _decode_level(
    mods, x: Array, skip: Array, level: Level, coarse_valid: Array, *, train: bool, block=None
) -> Array:
    """Decoder side of a level, ``mods = (up_bn, up, blocks)``: BN -> ReLU -> inverse
    conv of the coarser level's features ``x``, concatenation after ``skip``, the
    blocks."""
    block = block or _block_runner("none")
    bn, up, blocks = mods
    x = up(bn(x, coarse_valid, train, relu=True), level.down)
    x = jnp.concatenate([skip, x], axis=-1)
    for b in blocks:
        x = block(b, x, level, train)
    return x


def count_params(module: nnx.Module) -> int:
    """Number of trainable parameters (``nnx.Param`` entries) of ``module``."""
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param))))


def count_unet_params(*args, **kwargs) -> int:
    """Parameter count of ``SparseUNet(*args, **kwargs)`` without allocating it (``rngs``
    is supplied)."""
    net = nnx.eval_shape(lambda: SparseUNet(*args, **kwargs, rngs=nnx.Rngs(0)))
    return count_params(net)


def subm_conv_shapes(module: nnx.Module) -> list[tuple[int, int]]:
    """(Cin, Cout) of every :class:`SubmConv3d` in ``module``, one entry per layer, in
    graph order. These are the convolutions that ``impl="pallas"`` runs through the
    gather-matmul kernel (forward; the mirrored feats gradient runs it as Cout -> Cin)."""
    return [
        (int(m.weight.shape[1]), int(m.weight.shape[2]))
        for _, m in nnx.iter_graph(module)
        if isinstance(m, SubmConv3d)
    ]


def projection_shapes(module: nnx.Module) -> list[tuple[int, int]]:
    """(Cin, Cout) of every residual block's 1x1 skip projection in ``module``: plain
    matmuls (``x @ proj``) on XLA whatever the conv ``impl``."""
    return [
        (int(m.proj.shape[0]), int(m.proj.shape[1]))
        for _, m in nnx.iter_graph(module)
        if isinstance(m, ResidualBlock) and m.proj is not None
    ]


def unet_from_model_config(model_config, *, impl: str = "auto", rngs: nnx.Rngs) -> SparseUNet:
    """The :class:`SparseUNet` a ``config.model`` describes (``DKNet``'s backbone)."""
    m = model_config
    return SparseUNet(
        m.in_channels,
        tuple(m.widths),
        m.blocks_per_level,
        impl=impl,
        level_capacity_ratio=m.level_capacity_ratio,
        expected_level_ratio=m.expected_level_ratio,
        pairs_per_voxel=m.pairs_per_voxel,
        tile_fallback=m.get("tile_fallback", True),
        remat=m.get("remat", "none"),
        rngs=rngs,
    )


def unet_from_config(model_config, *, impl: str = "auto") -> SparseUNet:
    """An abstract (shapes only, nothing allocated) :class:`SparseUNet` built like
    ``DKNet`` builds its backbone from ``config.model``; for listing layer shapes."""
    return nnx.eval_shape(lambda: unet_from_model_config(model_config, impl=impl, rngs=nnx.Rngs(0)))

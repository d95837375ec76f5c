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
argument, or ``module.train()`` / ``module.eval()`` when it is None.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from dknet_jax.config import level_values
from dknet_jax.sparse import conv, hashing
from dknet_jax.sparse.voxelize import Voxels, voxel_to_point

Array = jax.Array


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

    def __call__(self, x: Array, valid: Array, train: bool | None = None) -> Array:
        train = (not self.use_running_average) if train is None else train
        m = valid[:, None]
        if train:
            n = jnp.sum(valid).astype(jnp.float32)
            nz = jnp.maximum(n, 1.0)
            mean = jnp.sum(jnp.where(m, x, 0), axis=0) / nz
            var = jnp.sum(jnp.where(m, jnp.square(x - mean), 0), axis=0) / nz
            unbiased = var * nz / jnp.maximum(n - 1.0, 1.0)
            mom = jnp.where(n > 0, self.momentum, 1.0)  # no update from an empty batch
            self.mean.set_value(mom * self.mean[...] + (1 - mom) * mean)
            self.var.set_value(mom * self.var[...] + (1 - mom) * unbiased)
        else:
            mean, var = self.mean[...], self.var[...]
        y = (x - mean) * jax.lax.rsqrt(var + self.epsilon) * self.scale[...] + self.bias[...]
        return jnp.where(m, y, 0)


def _he_normal(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int) -> Array:
    return jax.random.normal(rngs.params(), shape, jnp.float32) * jnp.sqrt(2.0 / fan_in)


class SubmConv3d(nnx.Module):
    """Submanifold 3x3x3 convolution (no bias): weight f32[27, Cin, Cout]."""

    def __init__(self, cin: int, cout: int, *, impl: str = "auto", rngs: nnx.Rngs):
        self.impl = impl
        self.weight = nnx.Param(_he_normal(rngs, (27, cin, cout), 27 * cin))

    def __call__(self, x: Array, smap: hashing.SubmMap) -> Array:
        return conv.subm_conv(x, self.weight[...], smap, impl=self.impl)


class DownConv3d(nnx.Module):
    """Kernel-2 stride-2 convolution fine -> coarse (no bias): weight f32[8, Cin, Cout]."""

    def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs):
        self.weight = nnx.Param(_he_normal(rngs, (8, cin, cout), 8 * cin))

    def __call__(self, x: Array, dmap: hashing.DownMap) -> Array:
        return conv.strided_conv(x, self.weight[...], dmap)


class UpConv3d(nnx.Module):
    """Inverse kernel-2 convolution coarse -> fine (no bias): weight f32[8, Cin, Cout]."""

    def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs):
        self.weight = nnx.Param(_he_normal(rngs, (8, cin, cout), cin))

    def __call__(self, xc: Array, dmap: hashing.DownMap) -> Array:
        return conv.inverse_conv(xc, self.weight[...], dmap)


@flax.struct.dataclass
class Level:
    """Kernel maps of one UNet level (V_l rows).

    Attributes:
      valid: bool[V_l] real voxels of the level.
      subm: the level's submanifold map (shared by all its 3x3x3 convs).
      down: map to level l+1 (None on the coarsest level).
    """

    valid: Array
    subm: hashing.SubmMap
    down: hashing.DownMap | None

    @property
    def overflow(self) -> Array:
        o = self.subm.overflow
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
        h = jax.nn.relu(self.bn1(x, level.valid, train))
        h = self.conv1(h, level.subm)
        h = jax.nn.relu(self.bn2(h, level.valid, train))
        h = self.conv2(h, level.subm)
        skip = x if self.proj is None else x @ self.proj[...]
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
        ``pairs_per_voxel * V * expected_level_ratio**l`` pairs at level l (room-like
        sets have ~12 per voxel at 2 cm); a level with more pairs falls back to the
        dense per-offset path (correct, slower), so the number trades memory and
        compile time, never correctness.
      expected_level_ratio: expected voxels of level l+1 per voxel of level l (~0.23 for
        rooms at 2 cm); sizes the tiles when ``pairs_per_voxel`` < 26.
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
        expected_level_ratio: float = 0.3,
        rngs: nnx.Rngs,
    ):
        widths = tuple(int(w) for w in widths)
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
        coords, valid = voxels.coords, voxels.valid
        levels = []
        for lvl in range(len(caps)):
            # Tiles are sized for the expected count; the row capacity keeps a safe margin.
            expected = min(
                caps[lvl],
                max(self.min_level_capacity, voxels.capacity * self.expected_level_ratio**lvl),
            )
            ppv = self.pairs_per_voxel[lvl]
            # >= 26: tiles for every pair the level's capacity can hold (never a fallback,
            # none compiled); otherwise sized for the expected voxels.
            ppv = 26.0 if ppv >= 26.0 else ppv * expected / caps[lvl]
            smap = hashing.subm_map(coords, valid, pairs_per_voxel=ppv)
            down = None
            if lvl + 1 < len(caps):
                down = hashing.down_map(coords, valid, capacity=caps[lvl + 1])
            levels.append(Level(valid=valid, subm=smap, down=down))
            if down is not None:
                coords, valid = down.coords, down.valid
        return levels

    def __call__(self, voxels: Voxels, train: bool | None = None) -> Array:
        """Per-voxel features f32[V, widths[0]] (0 on padded rows, NaN on overflow)."""
        if train is None:
            train = not self.use_running_average
        levels = self.kernel_maps(voxels)
        x = self.input_conv(voxels.feats, levels[0].subm)
        skips = []
        for lvl, level in enumerate(levels):
            for block in self.encoders[lvl]:
                x = block(x, level, train)
            if lvl + 1 < len(levels):
                skips.append(x)
                x = jax.nn.relu(self.down_bns[lvl](x, level.valid, train))
                x = self.downs[lvl](x, level.down)
        for lvl in range(len(levels) - 2, -1, -1):
            level = levels[lvl]
            x = jax.nn.relu(self.up_bns[lvl](x, levels[lvl + 1].valid, train))
            x = self.ups[lvl](x, level.down)
            x = jnp.concatenate([skips[lvl], x], axis=-1)
            for block in self.decoders[lvl]:
                x = block(x, level, train)
        x = jax.nn.relu(self.output_bn(x, levels[0].valid, train))
        overflow = voxels.overflow
        for level in levels:
            overflow = overflow | level.overflow
        return jnp.where(overflow, jnp.nan, x)

    def point_features(self, voxels: Voxels, train: bool | None = None) -> Array:
        """Per-point features f32[N, widths[0]] (0 for invalid points)."""
        return voxel_to_point(self(voxels, train), voxels.point_to_voxel)


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
        rngs=rngs,
    )


def unet_from_config(model_config, *, impl: str = "auto") -> SparseUNet:
    """An abstract (shapes only, nothing allocated) :class:`SparseUNet` built like
    ``DKNet`` builds its backbone from ``config.model``; for listing layer shapes."""
    return nnx.eval_shape(lambda: unet_from_model_config(model_config, impl=impl, rngs=nnx.Rngs(0)))

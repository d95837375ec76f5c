"""Point heads, aggregation MLPs, kernel MLP and mask-feature MLP (docs/method.md section 3).

Data flow: backbone features ``F_p f32[N, D]`` -> this module -> semantic logits, offsets,
heatmap logits (softmaxed per scene by :func:`scene_softmax`), reduced features
``f32[N, D']`` (pooled by ``aggregation`` into ``F_a``), merge logits ``f32[K, K]`` over
``|F_a,i - F_a,j|``, instance kernels ``f32[K, L]`` (decoded by ``mask_decoder.decode_masks``) and
mask features ``f32[N, 16]``.

Layer layout (follows the released DKNet code; widths are constructor arguments):

- ``semantic``  D -> 32 -> 32 -> S          (hidden: Linear+norm+ReLU)
- ``offset``    D -> 32 -> 3
- ``heatmap``   D+3 -> 32 -> 32 -> 1         (input [F_p, offset])
- ``reduce``    D -> 32 -> 32 -> 32 -> D'    (the code's ``kernel_branch``: 3 conv blocks)
- ``mask_feat`` D -> 32 -> 32 -> 32 -> 16    (the code's ``mask_branch``)
- ``merge``     2D'+3 -> (2D'+3) x3 -> 1     (the code's ``merge_branch``, pairwise)
- ``kernel``    D' -> 16 -> L = 337          (Linear, ReLU, Linear; no norm by default;
  ``kernel_norm="batch"`` adds a BatchNorm as the released ``weight_generator`` has)

Norm choice: ``norm="batch"`` (default, as in the code) is BatchNorm whose statistics use
only the rows of a ``mask`` (padding / non-foreground rows never enter them), momentum 0.1
in PyTorch terms (flax ``momentum=0.9``), epsilon 1e-4. ``"layer"`` (LayerNorm, no running
state) and ``"none"`` are drop-in alternatives for ablations. ``tower_eps`` sets the
epsilon of the ``reduce`` / ``mask_feat`` / ``merge`` (and, with ``kernel_norm="batch"``,
``kernel``) norms: the released towers and weight generator use PyTorch's BatchNorm1d
default 1e-5 (config ``model.tower_bn_eps``; default 1e-4 as before). Hidden Linears carry a bias
(harmless before BN, needed without it). Weights use PyTorch's default Linear init
(uniform +-1/sqrt(fan_in)), biases start at zero. Train/eval mode for BatchNorm follows
``module.train()`` / ``module.eval()`` (``use_running_average``).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from dknet_jax.model.mask_decoder import num_kernel_params

Array = jax.Array

NORMS = ("batch", "layer", "none")

# PyTorch's default nn.Linear weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_torch_linear_init = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def predicted_foreground(semantic_logits: Array, valid: Array, first_instance_class: int) -> Array:
    """bool[N]: valid rows whose argmax class is an instance class (>= first_instance_class).

    ``semantic_logits`` f32[N, S]. The heatmap's BatchNorm and softmax use these rows."""
    return valid & (jnp.argmax(semantic_logits, axis=-1) >= first_instance_class)


def scene_softmax(logits: Array, segment: Array, mask: Array, num_segments: int) -> Array:
    """Softmax of ``logits`` over the masked rows of each segment (scene).

    Args:
      logits: f32[N]; segment: i32[N] scene id 0..B-1 (rows with other ids are excluded);
      mask: bool[N] rows that take part (e.g. predicted foreground of valid rows);
      num_segments: B (static).
    Returns:
      f32[N]: within each scene the masked rows sum to 1; 0 on unmasked rows.
    """
    ok = mask & (segment >= 0) & (segment < num_segments)
    seg = jnp.where(ok, segment, num_segments)
    neg = jnp.finfo(logits.dtype).min
    seg_max = jax.ops.segment_max(jnp.where(ok, logits, neg), seg, num_segments=num_segments)
    row_max = jnp.take(seg_max, seg, mode="fill", fill_value=0.0)
    e = jnp.where(ok, jnp.exp(jnp.where(ok, logits - row_max, 0.0)), 0.0)
    denom = jax.ops.segment_sum(e, seg, num_segments=num_segments)
    row_denom = jnp.take(denom, seg, mode="fill", fill_value=1.0)
    return jnp.where(ok, e / jnp.maximum(row_denom, 1e-30), 0.0)


class RunningStat(nnx.BatchStat):
    """A BatchNorm running statistic whose whole-array update (``v[...] = new``, as
    ``nnx.BatchNorm`` writes it) is a plain replacement (``set_value``).

    Same values as ``nnx.BatchStat``. Why: flax's ``v[...] = new`` compares the new
    value's ``sharding`` with the old one's; under ``jit`` the new value is a tracer, whose
    ``sharding`` raises an error whose message is built by walking the whole traced
    program, so each update cost ~0.1 s of tracing in the paper train step (~1.5 s of its
    ~6 s trace; docs/benchmarks.md, "Train-step compile time")."""

    def __setitem__(self, index, value):
        if index is Ellipsis:
            self.set_value(value)
        else:
            super().__setitem__(index, value)


def _whole_updates(bn: nnx.BatchNorm) -> nnx.BatchNorm:
    bn.mean = RunningStat(bn.mean.get_value())
    bn.var = RunningStat(bn.var.get_value())
    return bn


class MLP(nnx.Module):
    """``in_dim -> hidden[0] -> ... -> out_dim``: (Linear + norm + ReLU) per hidden layer,
    then a plain Linear.

    ``__call__(x f32[..., in_dim], mask bool[...] | None) -> f32[..., out_dim]``; ``mask``
    selects the rows that enter BatchNorm statistics (all rows when None; ignored by the
    other norms). Leading dims are flattened for the norm and restored.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: Sequence[int],
        out_dim: int,
        *,
        norm: str = "batch",
        eps: float = 1e-4,
        rngs: nnx.Rngs,
    ):
        if norm not in NORMS:
            raise ValueError(f"MLP norm={norm!r} is not one of {NORMS}")
        self.norm_kind = norm
        dims = [in_dim, *hidden]
        self.linears = nnx.List(
            [
                nnx.Linear(a, b, kernel_init=_torch_linear_init, rngs=rngs)
                for a, b in zip(dims[:-1], dims[1:], strict=True)
            ]
        )
        if norm == "batch":
            norms = [
                _whole_updates(nnx.BatchNorm(b, momentum=0.9, epsilon=eps, rngs=rngs))
                for b in hidden
            ]
        elif norm == "layer":
            norms = [nnx.LayerNorm(b, epsilon=eps, rngs=rngs) for b in hidden]
        else:
            norms = []
        self.norms = nnx.List(norms)
        self.out = nnx.Linear(dims[-1], out_dim, kernel_init=_torch_linear_init, rngs=rngs)

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        lead = x.shape[:-1]
        h = x.reshape(-1, x.shape[-1])
        m = None if mask is None else jnp.broadcast_to(mask, lead).reshape(-1, 1)
        for i, lin in enumerate(self.linears):
            h = lin(h)
            if self.norm_kind == "batch":
                h = self.norms[i](h, mask=m)
            elif self.norm_kind == "layer":
                h = self.norms[i](h)
            h = jax.nn.relu(h)
        out = self.out(h)
        return out.reshape(*lead, out.shape[-1])


@flax.struct.dataclass
class PointHeadOutputs:
    """Per-point outputs of :class:`PointHeads` (``__call__``).

    Attributes:
      semantic_logits: f32[N, S] (softmax -> semantic scores).
      offset: f32[N, 3] predicted vector from each point to its instance centroid.
      heat_logits: f32[N] heatmap logit; softmax over each scene's predicted foreground
        (:func:`scene_softmax`) gives H.
      reduce_feats: f32[N, D'] features pooled into candidate fg/bg context features.
      mask_feats: f32[N, Cm] mask features F_m for the dynamic-conv decoder.
      foreground: bool[N] valid rows whose predicted class is an instance class.
    """

    semantic_logits: Array
    offset: Array
    heat_logits: Array
    reduce_feats: Array
    mask_feats: Array
    foreground: Array


class PointHeads(nnx.Module):
    """All DKNet MLPs on top of the backbone (see the module docstring for the layouts).

    Args:
      feat_dim: D, width of F_p (32).
      num_classes: S (20 ScanNet, 13 S3DIS).
      first_instance_class: predicted class >= this is foreground (ScanNet 2).
      width: hidden width of the point heads (32).
      agg_dim: D', width of the reduced features (16).
      mask_feat_dim: width of F_m (16).
      kernel_hidden: hidden width of the kernel MLP (16).
      dynamic_hidden: output channels of the first dynamic 1x1 layer (16); with
        mask_feat_dim it fixes L = num_kernel_params(mask_feat_dim + 3, dynamic_hidden).
      norm: "batch" (masked BatchNorm) | "layer" | "none".
      tower_eps: norm epsilon of ``reduce``, ``mask_feat``, ``merge`` and a normed
        ``kernel`` (1e-4; the released towers: 1e-5).
      kernel_norm: norm of the kernel MLP's hidden layer ("none"; the released
        ``weight_generator``: "batch").
      merge_clamp: lower bound of ``|F_a,i - F_a,j|`` in :meth:`merge_logits` (0 = none;
        the released code clamps at 1e-6).
    """

    def __init__(
        self,
        feat_dim: int = 32,
        num_classes: int = 20,
        *,
        first_instance_class: int = 2,
        width: int = 32,
        agg_dim: int = 16,
        mask_feat_dim: int = 16,
        kernel_hidden: int = 16,
        dynamic_hidden: int = 16,
        norm: str = "batch",
        tower_eps: float = 1e-4,
        kernel_norm: str = "none",
        merge_clamp: float = 0.0,
        rngs: nnx.Rngs,
    ):
        if not 0 <= first_instance_class < num_classes:
            raise ValueError(
                f"PointHeads first_instance_class={first_instance_class} must be "
                f"in [0, num_classes={num_classes})"
            )
        self.first_instance_class = first_instance_class
        self.merge_clamp = float(merge_clamp)
        self.dynamic_hidden = dynamic_hidden  # pass as mask_decoder.decode_masks(hidden=...)
        self.kernel_len = num_kernel_params(mask_feat_dim + 3, dynamic_hidden)
        d, w, a = feat_dim, width, 2 * agg_dim + 3
        self.semantic = MLP(d, [w, w], num_classes, norm=norm, rngs=rngs)
        self.offset = MLP(d, [w], 3, norm=norm, rngs=rngs)
        self.heatmap = MLP(d + 3, [w, w], 1, norm=norm, rngs=rngs)
        te = tower_eps
        self.reduce = MLP(d, [w, w, w], agg_dim, norm=norm, eps=te, rngs=rngs)
        self.mask_feat = MLP(d, [w, w, w], mask_feat_dim, norm=norm, eps=te, rngs=rngs)
        self.merge = MLP(a, [a, a, a], 1, norm=norm, eps=te, rngs=rngs)
        self.kernel = MLP(
            agg_dim, [kernel_hidden], self.kernel_len, norm=kernel_norm, eps=te, rngs=rngs
        )

    def __call__(self, feats: Array, valid: Array) -> PointHeadOutputs:
        """Per-point heads. ``feats f32[N, D]``, ``valid bool[N]`` -> :class:`PointHeadOutputs`.

        The heatmap MLP's BatchNorm statistics use the predicted-foreground rows only (the
        code runs it on those points alone); its logits on other rows are meaningless and
        are excluded by ``scene_softmax``.
        """
        if feats.ndim != 2 or valid.shape != feats.shape[:1]:
            raise ValueError(
                f"PointHeads expects feats [N, D] and valid [N], got "
                f"{feats.shape} and {valid.shape}"
            )
        sem = self.semantic(feats, valid)
        off = self.offset(feats, valid)
        fg = predicted_foreground(sem, valid, self.first_instance_class)
        heat = self.heatmap_logits(feats, off, fg)
        return PointHeadOutputs(
            semantic_logits=sem,
            offset=off,
            heat_logits=heat,
            reduce_feats=self.reduce(feats, valid),
            mask_feats=self.mask_feat(feats, valid),
            foreground=fg,
        )

    def heatmap_logits(self, feats: Array, offset: Array, mask: Array) -> Array:
        """``feats f32[N, D]``, ``offset f32[N, 3]``, ``mask bool[N]`` -> logits f32[N]."""
        return self.heatmap(jnp.concatenate([feats, offset], axis=-1), mask)[:, 0]

    def merge_logits(self, agg_feats: Array, pair_mask: Array) -> Array:
        """Pairwise merge logits over ``|F_a,i - F_a,j|``.

        Args:
          agg_feats: f32[..., K, 2D'+3] candidate features [fg, bg, shifted position];
            leading dims (e.g. one block of candidates per scene) are independent sets.
          pair_mask: bool[..., K, K] valid pairs (both candidates valid, same scene); only
            they enter BatchNorm statistics (over all leading dims together).
        Returns:
          f32[..., K, K] logits (sigmoid -> merge score A); symmetric by construction.
        """
        diff = jnp.abs(agg_feats[..., :, None, :] - agg_feats[..., None, :, :])
        if self.merge_clamp > 0:  # released: torch.clamp(|A_i - A_j|, min=1e-6)
            diff = jnp.maximum(diff, self.merge_clamp)
        return self.merge(diff, pair_mask)[..., 0]

    def scene_merge_logits(self, agg_feats: Array, pair_mask: Array, scenes: int) -> Array:
        """:meth:`merge_logits` of a packed batch whose candidate slots come in ``scenes``
        consecutive blocks of K = M / scenes, one per scene (``DKNet``'s layout), so that
        ``pair_mask`` (pairs within one scene) is block-diagonal.

        The merge MLP runs on each block's K^2 pairs only, ``scenes`` K^2 rows instead of
        (scenes K)^2; its BatchNorm statistics cover the same ``pair_mask`` pairs. Returns
        f32[M, M]: the blocks' logits on the diagonal, 0 between scenes."""
        m = agg_feats.shape[0]
        if scenes < 1 or m % scenes or pair_mask.shape != (m, m):
            raise ValueError(
                f"scene_merge_logits: {m} candidate slots, pair mask {pair_mask.shape}, "
                f"scenes={scenes}: the scenes must divide the slots and the mask be [M, M]"
            )
        k = m // scenes
        blocks = pair_mask.reshape(scenes, k, scenes, k)
        blocks = jnp.moveaxis(jnp.diagonal(blocks, axis1=0, axis2=2), -1, 0)  # [B, K, K]
        logits = self.merge_logits(agg_feats.reshape(scenes, k, -1), blocks)
        eye = jnp.eye(scenes, dtype=bool)[:, None, :, None]
        return jnp.where(eye, logits[:, :, None, :], 0.0).reshape(m, m)

    def kernels(self, inst_feats: Array, mask: Array | None = None) -> Array:
        """Instance kernels: ``inst_feats f32[K, D']`` -> ``f32[K, L]`` (L = 337).

        ``mask`` bool[K]: the slots that enter a BatchNorm's statistics (``kernel_norm=
        "batch"`` in training; ignored without a norm)."""
        return self.kernel(inst_feats, mask)

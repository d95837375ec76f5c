"""DKNet: the whole model wired from its stages (docs/method.md sections 1-7).

Data flow of :meth:`DKNet.__call__` on one packed ``PointBatch`` of B scenes:
voxelize -> sparse UNet -> per-point heads -> per-scene heatmap softmax -> candidate
mining (per scene, K slots each, flattened to M = B*K slots) -> fg/bg context features ->
pairwise merge scores -> groups (connected components) -> group features -> the groups
moved into I = B * max_instances instance slots -> instance kernels -> dynamic-conv masks
over every point of the instance's scene.

Every count is static: M candidate slots and I instance slots with validity masks, masks
f32[I, N].
``decode_masks=False`` stops at the kernels (``mask_logits`` is None): the training step
then computes the mask loss chunk by chunk (``objective.mask_loss``) and never holds
the f32[M, N] logits (``config.model.chunked_mask_loss``).

Ablation switches (config.model): ``candidates`` (ln_nms | nms | random),
``aggregation`` (full | train_only | none), ``kernel_from`` (aggregate | top | oracle).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from dknet_jax import aggregation as agg
from dknet_jax.candidates import mine_candidates
from dknet_jax.model import mask_decoder
from dknet_jax.model.backbone import unet_from_model_config
from dknet_jax.model.heads import PointHeadOutputs, PointHeads, scene_softmax
from dknet_jax.sparse.conv import resolve_impl
from dknet_jax.sparse.voxelize import voxel_to_point, voxelize
from dknet_jax.types import PointBatch

Array = jax.Array


@flax.struct.dataclass
class DKNetOutputs:
    """Everything the losses, post-processing and evaluation need.

    Attributes:
      heads: per-point head outputs (semantic logits, offsets, ...), N rows.
      heat: f32[N] heatmap H (softmax over each scene's predicted foreground).
      cand_idx: i32[M] candidate point index (N in empty slots), M = B * max_candidates.
      cand_ok: bool[M] filled candidate slots.
      cand_batch: i32[M] scene of each slot.
      merge_logits: f32[M, M] pairwise merge logits (meaningful on ``pair_mask``; 0 between
        scenes, whose pairs the merge MLP never sees).
      pair_mask: bool[M, M] valid pairs of distinct candidates of one scene.
      lead: i32[M] group lead slot of each candidate (-1 invalid).
      inst_ok: bool[I] instance slots that hold an instance (a group), I = B *
        max_instances (``config.model.max_instances``; 0 = max_candidates: no group is ever
        dropped). Each scene's groups fill its slots first, in lead heat order.
      inst_batch: i32[I] scene of each instance slot.
      inst_source: i32[I] candidate slot of the instance's lead (M in empty slots).
      inst_pos: f32[I, 3] instance centroid C_k (shifted position of the lead; with
        ``model.mask_center="point"`` the lead point's coordinate).
      kernels: f32[I, L] instance kernels of the dynamic mask decoder (layout:
        ``mask_decoder.split_kernels``); with ``inst_pos``, ``inst_batch``, ``inst_ok`` and
        ``heads.mask_feats`` they define the masks (``mask_decoder.decode_masks``).
      mask_logits: f32[I, N] instance mask logits (-1e9 outside the instance's scene),
        or None when the model ran with ``decode_masks=False``.
      pool_exhausted: bool[B] the LN-NMS pool ran out in a scene, so the exact whole-scene
        loop ran (same candidates, slower; a larger pool_size makes it rarer). Always set
        with ``cand_rule="released"`` and ``neighbour_cap > 0``, which use that loop only.
      instance_overflow: bool[B] a scene had more groups than instance slots; the groups
        with the lowest lead heat were dropped (raise max_instances).
      voxel_overflow: bool[] the voxel capacity of some UNet level or the key space
        overflowed (the backbone then returns NaN features).
    """

    heads: PointHeadOutputs
    heat: Array
    cand_idx: Array
    cand_ok: Array
    cand_batch: Array
    merge_logits: Array
    pair_mask: Array
    lead: Array
    inst_ok: Array
    inst_pos: Array
    kernels: Array
    mask_logits: Array | None
    pool_exhausted: Array
    voxel_overflow: Array
    # None in hand-built outputs whose instance slots are the candidate slots (I = M)
    inst_batch: Array | None = None
    inst_source: Array | None = None
    instance_overflow: Array | None = None

    @property
    def instance_batch(self) -> Array:
        """i32[I] scene of each instance slot (``cand_batch`` when I = M)."""
        return self.cand_batch if self.inst_batch is None else self.inst_batch


@flax.struct.dataclass
class Groups:
    """What :meth:`DKNet.group` returns: per candidate slot (M = B*K) ``cand_batch``,
    ``merge_logits`` f32[M, M], ``pair_mask`` bool[M, M], ``lead`` i32[M]; per instance slot
    (M' = B * max_instances) ``inst_feat``, ``inst_pos`` f32[M', 3], ``inst_ok``,
    ``inst_batch``, ``inst_source`` (see :class:`DKNetOutputs`); ``instance_overflow``
    bool[B]."""

    cand_batch: Array
    merge_logits: Array
    pair_mask: Array
    lead: Array
    inst_feat: Array
    inst_pos: Array
    inst_ok: Array
    inst_batch: Array
    inst_source: Array
    instance_overflow: Array


class DKNet(nnx.Module):
    """DKNet from ``config.model`` (see ``dknet_jax/config.py`` for every field)."""

    def __init__(self, model_config, *, impl: str = "auto", rngs: nnx.Rngs):
        m = model_config
        # the settings the forward pass reads (static: they shape the traced program)
        self.candidates = m["candidates"]
        self.max_candidates = int(m["max_candidates"])
        self.max_instances = int(m.get("max_instances") or m["max_candidates"])
        self.pool_size = int(m["pool_size"])
        self.cand_radius = float(m["cand_radius"])
        self.cand_threshold = float(m["cand_threshold"])
        self.random_cand_threshold = float(m["random_cand_threshold"])
        self.aggregation = m["aggregation"]
        self.merge_threshold = float(m["merge_threshold"])
        self.kernel_from = m["kernel_from"]
        self.mask_chunk = int(m["mask_chunk"])
        # released-model switches (docs/released_model.md section 5; defaults = ours)
        self.mask_center = m.get("mask_center", "shifted")
        self.empty_context = m.get("empty_context", "zeros")
        self.cand_rule = m.get("cand_rule", "ours")
        self.merge_rule = m.get("merge_rule", "components")
        self.neighbour_cap = int(m.get("neighbour_cap", 0))
        self.backbone = unet_from_model_config(m, impl=impl, rngs=rngs)
        self.heads = PointHeads(
            feat_dim=m.widths[0],
            num_classes=m.num_classes,
            first_instance_class=m.first_instance_class,
            width=m.head_width,
            agg_dim=m.agg_dim,
            mask_feat_dim=m.mask_feat_dim,
            kernel_hidden=m.kernel_hidden,
            tower_eps=float(m.get("tower_bn_eps", 1e-4)),
            kernel_norm=m.get("kernel_norm", "none"),
            merge_clamp=float(m.get("merge_clamp", 0.0)),
            rngs=rngs,
        )

    def __call__(
        self,
        batch: PointBatch,
        *,
        key: Array | None = None,
        decode_masks: bool = True,
        merge_threshold: float | None = None,
    ) -> DKNetOutputs:
        """Forward pass on one packed batch: the stage methods below, in order.

        ``key`` drives random candidate sampling (``candidates="random"``);
        ``decode_masks`` (static): False skips the dynamic-conv decoder and returns
        ``mask_logits=None`` (the kernels and the rest are unchanged), for the chunked
        training loss that never holds the f32[M, N] logits. ``merge_threshold`` (static):
        the merge-score threshold of the grouping, ``config.model.merge_threshold`` when
        None (training); inference passes ``config.test.merge_threshold``.
        """
        # named scopes: each stage's ops carry its name in profiles and HLO op_names
        with jax.named_scope("backbone"):
            fp, overflow = self.point_features(batch)
        with jax.named_scope("heads"):
            heads, heat = self.point_heads(batch, fp)
        with jax.named_scope("candidates"):
            cand_idx, cand_ok, exhausted = self.mine(batch, heads, heat, key)
        with jax.named_scope("aggregation"):
            g = self.group(batch, heads, heat, cand_idx, cand_ok, merge_threshold)
        with jax.named_scope("masks"):
            kernels, mask_logits = self.masks(batch, heads, g, decode_masks)
        return DKNetOutputs(
            heads=heads,
            heat=heat,
            cand_idx=cand_idx,
            cand_ok=cand_ok,
            cand_batch=g.cand_batch,
            merge_logits=g.merge_logits,
            pair_mask=g.pair_mask,
            lead=g.lead,
            inst_ok=g.inst_ok,
            inst_batch=g.inst_batch,
            inst_source=g.inst_source,
            inst_pos=g.inst_pos,
            kernels=kernels,
            mask_logits=mask_logits,
            pool_exhausted=exhausted,
            instance_overflow=g.instance_overflow,
            voxel_overflow=overflow,
        )

    # --- the stages of __call__ (also timed one by one by scripts/bench_infer.py) -------

    def point_features(self, batch: PointBatch) -> tuple[Array, Array]:
        """Voxelise, run the sparse UNet, gather back to points: (F_p f32[N, D], overflow
        bool[]: a voxel capacity overflowed, the features are NaN)."""
        n = batch.valid.shape[0]
        vox = voxelize(batch.vox, batch.batch_id, batch.valid, batch.feats, capacity=n)
        fv = self.backbone(vox)  # NaN everywhere when a level's capacity overflowed
        overflow = vox.overflow | jnp.any(jnp.isnan(fv))
        return voxel_to_point(fv, vox.point_to_voxel), overflow

    def point_heads(self, batch: PointBatch, fp: Array) -> tuple[PointHeadOutputs, Array]:
        """The point heads and the per-scene heatmap H f32[N] (softmax over each scene's
        predicted-foreground points)."""
        heads = self.heads(fp, batch.valid)
        heat = scene_softmax(
            heads.heat_logits, batch.batch_id, heads.foreground, batch.scene_valid.shape[0]
        )
        return heads, heat

    def mine(
        self, batch: PointBatch, heads: PointHeadOutputs, heat: Array, key: Array | None = None
    ) -> tuple[Array, Array, Array]:
        """Candidate mining per scene, K slots each, flattened to M = B*K slots:
        (cand_idx i32[M] point index, cand_ok bool[M], pool_exhausted bool[B])."""
        n = batch.valid.shape[0]
        b = batch.scene_valid.shape[0]
        scene_valid = heads.foreground[None, :] & (
            batch.batch_id[None, :] == jnp.arange(b, dtype=jnp.int32)[:, None]
        )
        keys = jax.random.split(key if key is not None else jax.random.PRNGKey(0), b)

        random = self.candidates == "random"
        classes = None
        if self.cand_rule == "released":  # same-class normaliser of the released topk_nms
            classes = jnp.argmax(heads.semantic_logits, axis=-1).astype(jnp.int32)

        def mine(valid_b, key_b):
            return mine_candidates(
                self.candidates,
                batch.xyz,
                heat,
                valid_b,
                key=key_b,
                radius=self.cand_radius,
                threshold=self.cand_threshold,
                score_threshold=self.random_cand_threshold if random else None,
                max_candidates=self.max_candidates,
                pool_size=min(self.pool_size, n),
                relative=True,
                classes=classes,
                neighbour_cap=self.neighbour_cap,
            )

        idx, ok, exhausted = jax.vmap(mine)(scene_valid, keys)
        return idx.reshape(-1), ok.reshape(-1), exhausted

    def group(
        self,
        batch: PointBatch,
        heads: PointHeadOutputs,
        heat: Array,
        cand_idx: Array,
        cand_ok: Array,
        merge_threshold: float | None = None,
    ) -> Groups:
        """Aggregation: context features, pairwise merge scores, groups, group features,
        and the groups moved into ``max_instances`` instance slots per scene."""
        n = batch.valid.shape[0]
        b = batch.scene_valid.shape[0]
        k = self.max_candidates
        sem_pred = jnp.argmax(heads.semantic_logits, axis=-1).astype(jnp.int32)
        cand_batch = jnp.repeat(jnp.arange(b, dtype=jnp.int32), k)
        safe = jnp.clip(cand_idx, 0, n - 1)
        cand_pos = batch.xyz[safe] + heads.offset[safe]
        fg, bg, fg_count = agg.context_features(
            batch.xyz,
            heads.reduce_feats,
            sem_pred,
            heads.foreground,
            batch.batch_id,
            cand_idx,
            cand_ok,
            radius=self.cand_radius,
            empty=self.empty_context,
            neighbour_cap=self.neighbour_cap,
            scene_blocks=b,  # slots [s K, (s+1) K) hold scene s's candidates
        )
        agg_feats = jnp.concatenate([fg, bg, cand_pos], axis=-1)
        m = cand_idx.shape[0]
        pair_mask = (
            cand_ok[:, None]
            & cand_ok[None, :]
            & (cand_batch[:, None] == cand_batch[None, :])
            & ~jnp.eye(m, dtype=bool)
        )
        merge_logits = self.heads.scene_merge_logits(agg_feats, pair_mask, b)
        if self.aggregation == "full":
            scores = jnp.where(pair_mask, jax.nn.sigmoid(merge_logits), 0.0)
            thr = self.merge_threshold if merge_threshold is None else merge_threshold
            lead = agg.merge_groups(
                scores, cand_ok, heat[safe], threshold=thr, strict=self.merge_rule == "released"
            )
        else:  # every candidate is its own instance
            lead = jnp.where(cand_ok, jnp.arange(m, dtype=jnp.int32), -1)

        # the mask decoder's centre C_k: the lead's shifted position x + offset (ours) or the
        # lead point's own coordinate (released: coords_[candidate_pt_])
        centre = batch.xyz[safe] if self.mask_center == "point" else cand_pos
        if self.kernel_from == "aggregate":
            inst_feat, inst_pos, inst_ok = agg.group_features(lead, fg, fg_count, centre)
        elif self.kernel_from == "top":  # elimination: the lead's own feature
            inst_feat, inst_pos, inst_ok = agg.group_features(
                lead, fg, (lead == jnp.arange(m)).astype(fg.dtype), centre
            )
        else:  # oracle: mean reduced feature over the GT instance the lead lies in
            inst_feat, inst_pos, inst_ok = self._oracle_features(batch, heads, safe, lead, centre)

        ki = self.max_instances
        (inst_feat, inst_pos), inst_ok, inst_source, inst_overflow = agg.compact_groups(
            inst_ok, (inst_feat, inst_pos), scenes=b, slots=ki
        )
        return Groups(
            cand_batch=cand_batch,
            merge_logits=merge_logits,
            pair_mask=pair_mask,
            lead=lead,
            inst_feat=inst_feat,
            inst_pos=inst_pos,
            inst_ok=inst_ok,
            inst_batch=jnp.repeat(jnp.arange(b, dtype=jnp.int32), ki),
            inst_source=inst_source,
            instance_overflow=inst_overflow,
        )

    def masks(
        self, batch: PointBatch, heads: PointHeadOutputs, groups: Groups, decode_masks: bool = True
    ) -> tuple[Array, Array | None]:
        """Instance kernels f32[M', L] from the group features and, with ``decode_masks``,
        the dynamic-conv mask logits f32[M', N] (else None)."""
        n = batch.valid.shape[0]
        kernels = self.heads.kernels(groups.inst_feat, groups.inst_ok)
        mask_logits = None
        if decode_masks:
            mask_logits = mask_decoder.decode_masks(
                kernels,
                groups.inst_pos,
                groups.inst_batch,
                groups.inst_ok,
                heads.mask_feats,
                batch.xyz,
                batch.batch_id,
                batch.valid,
                hidden=self.heads.dynamic_hidden,
                chunk_size=min(self.mask_chunk, n),
                scene_blocks=batch.scene_valid.shape[0],  # slots [s M, (s+1) M): scene s
            )
        return kernels, mask_logits

    @staticmethod
    def _oracle_features(batch, heads, safe, lead, cand_pos):
        """Table 6 "full instances": kernel input = mean reduced feature over all points
        of the GT instance that holds the group's lead (training-time analysis only)."""
        g = batch.instance_class.shape[0]
        inst = jnp.where(batch.valid & (batch.instance >= 0), batch.instance, g)
        sums = jax.ops.segment_sum(heads.reduce_feats, inst, num_segments=g)
        cnt = jax.ops.segment_sum(jnp.ones_like(inst, jnp.float32), inst, num_segments=g)
        mean = sums / jnp.maximum(cnt, 1.0)[:, None]
        m = lead.shape[0]
        inst_ok = lead == jnp.arange(m)
        cand_inst = batch.instance[safe]
        feat = jnp.take(
            mean, jnp.where(cand_inst >= 0, cand_inst, g), axis=0, mode="fill", fill_value=0.0
        )
        inst_ok = inst_ok & (cand_inst >= 0)
        return (
            jnp.where(inst_ok[:, None], feat, 0.0),
            jnp.where(inst_ok[:, None], cand_pos, 0.0),
            inst_ok,
        )


def build_model(config, seed: int | None = None):
    """DKNet from a full config (``config.model``, ``config.kernels.impl``, ``config.seed``);
    returns ``(graphdef, params, rest)`` split for jit (``nnx.split(model, nnx.Param, ...)``)."""
    model = DKNet(
        config.model,
        impl=resolve_impl(config.kernels.impl),
        rngs=nnx.Rngs(config.seed if seed is None else seed),
    )
    return nnx.split(model, nnx.Param, ...)


def abstract_model(config):
    """``build_model`` traced, not initialised (the eager initialisers take seconds):
    ``(graphdef, params, rest)`` with ``jax.ShapeDtypeStruct`` leaves, e.g. to restore a
    checkpoint into."""
    return nnx.split(nnx.eval_shape(lambda: nnx.merge(*build_model(config))), nnx.Param, ...)

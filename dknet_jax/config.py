"""The configuration schema: defaults for every field, and validation.

Config files under ``configs/`` call :func:`base_config` and override a few fields; the
training/evaluation entry points call :func:`validate` so an impossible value fails with a
message naming the key instead of a stack trace from deep inside JAX. Every ablation of the
paper (Tables 4-6) is a field here, e.g. ``--config.model.candidates=nms``.
"""

from __future__ import annotations

import ml_collections


class ConfigError(ValueError):
    """A config key or value that `validate` rejects (its message names the key)."""


# Allowed values of the enum-like fields (the ablation switches).
CHOICES = {
    "data.dataset": ("scannet", "s3dis"),
    "data.voxel_origin": ("centre", "scene_min"),
    "model.candidates": ("ln_nms", "nms", "random"),
    "model.aggregation": ("full", "train_only", "none"),
    "model.kernel_from": ("aggregate", "top", "oracle"),
    "model.kernel_norm": ("none", "batch"),
    "model.mask_center": ("shifted", "point"),
    "model.empty_context": ("zeros", "foreground_mean"),
    "model.cand_rule": ("ours", "released"),
    "model.merge_rule": ("components", "released"),
    "test.postprocess": ("ours", "released"),
    "kernels.impl": ("auto", "xla", "pallas"),
    "model.remat": ("none", "block", "level"),
    "train.precision": ("f32", "bf16"),
}


def base_config() -> ml_collections.ConfigDict:
    """Defaults = the paper's ScanNet settings (docs/method.md); config files override."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    # --- data -----------------------------------------------------------------------
    c.data = d = ml_collections.ConfigDict()
    d.dataset = "scannet"  # label space / metrics: scannet (20 classes) or s3dis (13)
    d.root = "data/scannet"  # folder of prepared <scene>.npz files (prepare_*.py output)
    d.train_split = "train"  # subfolder or split-list name under root
    d.val_split = "val"
    d.voxel_size = 0.02  # metres (S3DIS: 0.05)
    # where each scene's voxel grid is anchored: centre = faces on multiples of voxel_size
    # from the origin of the centred coordinates (ours) | scene_min = the grid starts at
    # the scene's minimum point (released: xyz * scale - min, then floor)
    d.voxel_origin = "centre"
    d.max_points = 250_000  # training crop (docs/method.md section 1)
    d.batch_size = 4  # scenes per step (global, split over devices)
    d.eval_batch_size = 1
    d.point_buckets = (16_384, 32_768, 65_536, 131_072, 262_144, 524_288, 1_048_576)
    d.instance_buckets = (16, 32, 64, 128, 256)
    d.augment = True  # jitter/flip/rotate/elastic in training (never at test)
    d.elastic = True
    d.color_noise = False
    d.prefetch = 2  # batches prepared ahead by a background thread

    # --- model ----------------------------------------------------------------------
    c.model = m = ml_collections.ConfigDict()
    m.in_channels = 6  # rgb in [-1, 1] + xyz
    m.widths = (32, 64, 96, 128, 160, 192, 224)
    m.blocks_per_level = 2
    # voxel capacity of UNet level l+1 / level l: one number for every level, or one per
    # level transition (1.0 never overflows; an overflowing batch is rerun with overflow_safe())
    m.level_capacity_ratio = (0.5,)
    # voxel ratio per level that the conv tiles are sized for (speed and memory only). 0.5
    # = the level capacities: room surfaces at 2 cm keep ~0.24 of the voxels per halving,
    # but sparser scans keep up to ~0.6 at the first halving, and with tiles sized for
    # 0.3 their levels 1-3 took the dense fallback (a 109k-point room: 6.6 s -> 4.3 s
    # CPU inference with 0.5; docs/benchmarks.md)
    m.expected_level_ratio = 0.5
    # conv tile capacity in neighbour pairs per expected voxel, one value or one per level
    # (speed only: a level with more pairs takes the per-offset path, see tile_fallback)
    m.pairs_per_voxel = (14.0,)
    # compile the per-offset path into every conv for tiles that overflow (exact, ~95 more
    # kernels to compile per train step). False: a tile overflow flags the batch like a
    # voxel overflow, and training / predict / evaluate rerun it with overflow_safe()
    # settings (rare: room tiles were <= 70% full in the benchmarks; docs/benchmarks.md)
    m.tile_fallback = False
    m.num_classes = 20
    m.first_instance_class = 2  # semantic index >= this is an instance ("foreground") class
    m.head_width = 32
    m.agg_dim = 16  # D' of the aggregation features
    m.kernel_hidden = 16
    m.mask_feat_dim = 16
    m.candidates = "ln_nms"  # Table 4: ln_nms | nms | random
    m.cand_radius = 0.3  # R (metres)
    m.cand_threshold = 0.5  # T of LN-NMS
    m.max_candidates = 150  # N_max (paper 200, code 150)
    # instance slots per scene after merging (0 = max_candidates, the released code): the
    # mask decoder's cost is linear in it; a scene with more groups keeps the highest-heat
    # ones and is counted (train metric / diagnostic ``instance_overflow``)
    m.max_instances = 0
    m.pool_size = 4096  # LN-NMS top-K pool (static)
    m.random_cand_threshold = 0.1
    m.aggregation = "full"  # Table 5: full | train_only | none
    m.merge_threshold = 0.5
    m.kernel_from = "aggregate"  # Table 6: aggregate (weighted mean) | top | oracle
    m.mask_chunk = 16_384  # points per chunk of the dynamic-conv decoder
    # training: decode the masks chunk by chunk inside the mask loss (objective.mask_loss)
    # instead of holding the f32[M, N] logits; same loss, far less memory (False = dense)
    m.chunked_mask_loss = True
    # rematerialisation in the UNet's backward pass (memory only, same numbers): none |
    # block (each residual block recomputes its BatchNorm/ReLU, the conv outputs are kept)
    # | level (each UNet level's forward runs again in the backward pass, nothing kept)
    m.remat = "none"
    m.offset_direction_loss = False
    # --- released-model switches (docs/released_model.md section 5, "switch" column);
    # the defaults are this project's model, configs/scannet.py:released sets the
    # released values (the converted checkpoint of scripts/convert_released.py uses them)
    m.tower_bn_eps = 1e-4  # BN eps of reduce / mask_feat / merge / a normed kernel MLP (1e-5)
    m.kernel_norm = "none"  # norm in the kernel MLP: none | batch (weight_generator: batch)
    m.mask_center = "shifted"  # mask centre C_k: shifted (x + offset) | point (released)
    m.merge_clamp = 0.0  # lower bound of |F_a,i - F_a,j| in the merge MLP input (1e-6)
    # empty fg / bg context set: zeros | foreground_mean (released neighboors_pooling)
    m.empty_context = "zeros"
    # LN-NMS rule (candidates="ln_nms"): ours (d <= R, max over all fg points within R,
    # ratio > T) | released (topk_nms: d < R, max over same-class points, ratio >= T)
    m.cand_rule = "ours"
    # merge grouping: components (edge score >= merge_threshold) | released (the greedy
    # candidate_merge: edge score > merge_threshold, strict; the same components otherwise)
    m.merge_rule = "components"
    # at most this many points (the first ones in point order) in each candidate's fg and
    # bg neighbour lists: the LN-NMS normaliser (cand_rule="released"), the context means
    # and the fg count; 0 = no cap (released topk_nms: 2000)
    m.neighbour_cap = 0

    # --- loss -----------------------------------------------------------------------
    c.loss = lo = ml_collections.ConfigDict()
    lo.semantic = 1.0
    lo.offset = 1.0
    lo.center = 1.0
    lo.aggregation = 1.0
    lo.mask = 1.0
    lo.mask_iou_threshold = 0.25
    lo.mask_iou_fallback = True  # no pair above the gate -> count all matched (released code)
    # epoch from which the gate applies; before it every matched pair counts. 0 = from the
    # first mask epoch (released code); -1 = never. A gate from the start can starve the
    # decoder: only the few pairs that overlap by chance train it, and every kernel learns
    # their mask (overfit check in docs/benchmarks.md, "Synthetic demo")
    lo.mask_iou_gate_epoch = 0

    # --- training -------------------------------------------------------------------
    c.train = t = ml_collections.ConfigDict()
    t.epochs = 400
    t.steps_per_epoch = 0  # 0 = len(train split) // batch_size
    t.stage_heatmap_epoch = 80  # epochs [0, 80): semantic + offset only
    t.stage_mask_epoch = 96  # from epoch 96 (the code's 97th) the mask loss joins
    t.lr = 1e-3
    t.weight_decay = 1e-4
    t.warmup_steps = 0
    t.cosine_start_epoch = 200  # constant lr until here, then cosine to final_lr
    t.final_lr = 1e-6
    t.grad_clip = 0.0  # 0 = off; else global-norm clip
    t.log_every = 50
    t.eval_every_epochs = 16
    t.ckpt_every_steps = 500
    t.keep_checkpoints = 3
    t.max_gt_instances = 0  # 0 = keep all GT instances (the code truncates to 80)
    # activations of the sparse UNet in the train step: f32 | bf16 (bf16 activations and
    # matmul inputs, f32 accumulation, f32 parameters / BatchNorm statistics / heads / loss;
    # evaluation always runs f32)
    t.precision = "f32"

    # --- test-time thresholds (kept apart from training ones) --------------------------
    c.test = te = ml_collections.ConfigDict()
    te.score_threshold = 0.1
    te.min_points = 100
    te.use_superpoints = True
    te.merge_threshold = 0.5  # merge-score threshold of the grouping at inference (released)
    # post-processing rules: ours (inference/postprocess.py postprocess) | released (the
    # released test.py: cover re-weighting, strict size / score filters, sqrt score, ...;
    # postprocess.postprocess_released)
    te.postprocess = "ours"
    # the released test-time input transform (random x-flip + z-rotation of each scene,
    # data/scannetv2_inst.py dataAugment(xyz, False, True, True)), drawn from the numpy
    # stream np.random.seed(released_aug_seed) in sorted scene order (evaluate.py only)
    te.released_aug = False
    te.released_aug_seed = 567

    # --- kernels ----------------------------------------------------------------------
    c.kernels = k = ml_collections.ConfigDict()
    # auto = xla for now (see sparse/conv.py AUTO_PALLAS_ON_GPU); pallas = opt in
    k.impl = "auto"

    return c


def released_settings(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Set, in place, what the released DKNet ScanNet model (``config/DKNet_run1_scannet.
    yaml`` and its code) uses where this project's defaults differ, so a checkpoint
    converted by ``scripts/convert_released.py`` runs as the released forward
    (docs/released_model.md section 5 lists every difference and its switch)."""
    c.data.voxel_size = 0.02  # scale 50
    c.data.voxel_origin = "scene_min"
    m = c.model
    m.in_channels = 6  # rgb + xyz (use_coords)
    m.widths = (32, 64, 96, 128, 160, 192, 224)
    m.blocks_per_level = 2
    m.num_classes = 20
    m.first_instance_class = 2
    m.head_width = 32
    m.agg_dim = 16
    m.mask_feat_dim = 16
    m.kernel_hidden = 16
    m.max_candidates = 150
    m.max_instances = 0
    m.cand_radius = 0.3
    m.cand_threshold = 0.5
    m.merge_threshold = 0.5
    m.tower_bn_eps = 1e-5
    m.kernel_norm = "batch"
    m.mask_center = "point"
    m.merge_clamp = 1e-6
    m.empty_context = "foreground_mean"
    m.cand_rule = "released"
    m.merge_rule = "released"
    m.neighbour_cap = 2000
    c.test.merge_threshold = 0.5
    c.test.score_threshold = 0.1
    c.test.min_points = 100
    c.test.use_superpoints = True
    c.test.postprocess = "released"
    c.test.released_aug = True
    c.test.released_aug_seed = 567
    return c


def _get(config: ml_collections.ConfigDict, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def level_values(value) -> tuple[float, ...]:
    """A per-level setting given as one number or one per level (``model.level_capacity_ratio``,
    ``model.pairs_per_voxel``) -> a tuple of floats (length 1 for a single number)."""
    if isinstance(value, (tuple, list)):
        return tuple(float(x) for x in value)
    return (float(value),)


def overflow_safe(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of ``config`` whose UNet cannot overflow a capacity: every level as many voxel
    rows as the input (``model.level_capacity_ratio = 1.0``) and the per-offset fallback
    compiled for tiles that overflow (``model.tile_fallback = True``). Same parameters;
    more memory and compile time. The training loop, ``predict`` and ``evaluate`` rerun a
    batch whose outputs report ``voxel_overflow`` with it (only the voxel key space can
    still overflow: a scan too large for its voxel size)."""
    safe = ml_collections.ConfigDict(config.to_dict())
    safe.model.level_capacity_ratio = (1.0,)
    safe.model.tile_fallback = True
    return safe


def is_overflow_safe(config: ml_collections.ConfigDict) -> bool:
    """Whether ``config`` already has the :func:`overflow_safe` settings."""
    m = config.model
    ratios = level_values(m.level_capacity_ratio)
    return all(r == 1.0 for r in ratios) and bool(m.get("tile_fallback", True))


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Check a resolved config against the schema; raise `ConfigError` (a ValueError) naming
    the key.

    Unknown keys (typos such as ``model.candidate``) and impossible values are errors.
    """
    reference = base_config()
    _check_keys(config, reference, prefix="")
    for key, allowed in CHOICES.items():
        value = _get(config, key)
        if value not in allowed:
            raise ConfigError(f"config.{key}={value!r} is not one of {allowed}")
    positive = (
        "data.voxel_size",
        "data.max_points",
        "data.batch_size",
        "data.eval_batch_size",
        "model.num_classes",
        "model.max_candidates",
        "model.pool_size",
        "model.cand_radius",
        "model.mask_chunk",
        "train.epochs",
        "train.lr",
    )
    for key in positive:
        if not _get(config, key) > 0:
            raise ConfigError(f"config.{key} must be > 0, got {_get(config, key)!r}")
    m, t, d = config.model, config.train, config.data
    for key in ("model.merge_threshold", "test.merge_threshold"):
        if not 0.0 < _get(config, key) <= 1.0:
            raise ConfigError(f"config.{key} must be in (0, 1], got {_get(config, key)!r}")
    if not m.tower_bn_eps > 0:
        raise ConfigError(f"config.model.tower_bn_eps must be > 0, got {m.tower_bn_eps!r}")
    if not m.merge_clamp >= 0:
        raise ConfigError(f"config.model.merge_clamp must be >= 0, got {m.merge_clamp!r}")
    if not isinstance(m.neighbour_cap, int) or m.neighbour_cap < 0:
        raise ConfigError(
            f"config.model.neighbour_cap must be an integer >= 0 (0 = no cap), "
            f"got {m.neighbour_cap!r}"
        )
    if not isinstance(config.test.released_aug, bool):
        raise ConfigError(
            f"config.test.released_aug must be True or False, got {config.test.released_aug!r}"
        )
    seed = config.test.released_aug_seed
    if not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ConfigError(
            f"config.test.released_aug_seed must be an integer in [0, 2**32) (a numpy seed), "
            f"got {seed!r}"
        )
    if not 0 <= m.first_instance_class < m.num_classes:
        raise ConfigError("config.model.first_instance_class must be in [0, num_classes)")
    if not 0 <= m.max_instances <= m.max_candidates:
        raise ConfigError(
            f"config.model.max_instances must be in [0, max_candidates="
            f"{m.max_candidates}] (0 = max_candidates), got {m.max_instances!r}"
        )
    if m.pool_size < m.max_candidates:
        raise ConfigError("config.model.pool_size must be >= config.model.max_candidates")
    gate = config.loss.mask_iou_gate_epoch
    if not isinstance(gate, int) or gate < -1:
        raise ConfigError(
            f"config.loss.mask_iou_gate_epoch must be an epoch >= 0 or -1 (never), got {gate!r}"
        )
    if not (0 <= t.stage_heatmap_epoch <= t.stage_mask_epoch):
        raise ConfigError("need 0 <= train.stage_heatmap_epoch <= train.stage_mask_epoch")
    if sorted(d.point_buckets) != list(d.point_buckets) or not d.point_buckets:
        raise ConfigError("config.data.point_buckets must be a non-empty increasing list")
    if max(d.point_buckets) < d.max_points:
        raise ConfigError(
            f"config.data.max_points={d.max_points} exceeds the largest point bucket "
            f"{max(d.point_buckets)}; add a bucket or lower max_points"
        )
    ratios = m.level_capacity_ratio
    ratios = level_values(ratios)
    if not all(0.0 < r <= 1.0 for r in ratios) or len(ratios) not in (1, len(m.widths) - 1):
        raise ConfigError(
            "config.model.level_capacity_ratio must be a number in (0, 1] or "
            "one per level transition (len(model.widths) - 1 numbers)"
        )
    ppv = m.pairs_per_voxel
    ppv = level_values(ppv)
    if len(ppv) not in (1, len(m.widths)) or not all(0.0 < x <= 27.0 for x in ppv):
        raise ConfigError(
            f"config.model.pairs_per_voxel must be one number in (0, 27] or "
            f"{len(m.widths)} of them (one per level), got {ppv!r}"
        )
    if not 0.0 < m.expected_level_ratio <= 1.0:
        raise ConfigError("config.model.expected_level_ratio must be in (0, 1]")
    if len(m.widths) < 2:
        raise ConfigError("config.model.widths needs at least two levels")
    if not isinstance(m.chunked_mask_loss, bool):
        raise ConfigError(
            f"config.model.chunked_mask_loss must be True or False, got {m.chunked_mask_loss!r}"
        )
    return config


def _check_keys(config, reference, prefix):
    for key in config.keys():
        name = f"{prefix}{key}"
        if key not in reference:
            close = [k for k in reference.keys() if k[:3] == key[:3]]
            hint = f" (did you mean {', '.join(prefix + k for k in close)}?)" if close else ""
            raise ConfigError(f"unknown config key config.{name}{hint}")
        if isinstance(reference[key], ml_collections.ConfigDict):
            if not isinstance(config[key], ml_collections.ConfigDict):
                raise ConfigError(f"config.{name} must be a section, got {config[key]!r}")
            _check_keys(config[key], reference[key], prefix=f"{name}.")

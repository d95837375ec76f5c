"""Config schema: every shipped config validates; bad keys and values name the key."""

import importlib.util
import pathlib

import pytest

from dknet_jax.config import base_config, validate

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def _load(name: str, arg=None):
    spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


@pytest.mark.parametrize(
    "name,arg", [("scannet", None), ("s3dis", None), ("synthetic", None), ("synthetic", "tiny")]
)
def test_shipped_configs_validate(name, arg):
    c = _load(name, arg)
    assert validate(c) is c
    ppv = c.model.pairs_per_voxel
    assert len(ppv) in (1, len(c.model.widths))


def test_unknown_key_and_bad_choice_name_the_key():
    c = base_config()
    c.model.candidate = "nms"  # typo of model.candidates
    with pytest.raises(ValueError, match="candidate"):
        validate(c)
    c = base_config()
    c.model.candidates = "greedy"
    with pytest.raises(ValueError, match="model.candidates"):
        validate(c)


@pytest.mark.parametrize("value", [(0.0,), (8.0, 8.0), (30.0,)])
def test_pairs_per_voxel_checked(value):
    c = base_config()  # 7 levels: one value or seven
    c.model.pairs_per_voxel = value
    with pytest.raises(ValueError, match="pairs_per_voxel"):
        validate(c)
    c.model.pairs_per_voxel = (6.0,) * 7
    validate(c)


def test_mask_iou_fallback_is_a_schema_key():
    c = base_config()
    assert c.loss.mask_iou_fallback is True  # the released code's rule
    c.loss.mask_iou_fallback = False
    validate(c)


@pytest.mark.parametrize("name", ["scannet", "s3dis", "synthetic"])
def test_shipped_configs_keep_the_released_candidate_budget(name):
    # 24 slots per scene halved the AP50 of two memorised rooms (0.46 vs 0.94 with the
    # released 150): the budget must leave room for every instance plus the duplicates
    # that merging removes. The pool only sets speed (LN-NMS is exact at any pool size).
    c = _load(name)
    assert c.model.max_candidates >= 150
    assert c.model.pool_size >= c.model.max_candidates


def test_merge_thresholds_checked():
    for key in ("model", "test"):
        c = base_config()
        c[key].merge_threshold = 1.5
        with pytest.raises(ValueError, match=f"{key}.merge_threshold"):
            validate(c)


def test_scannet_config_uses_the_x1_5_bucket_ladder():
    from dknet_jax.data.batching import batch_capacities, make_ladder

    c = _load("scannet", None)
    assert c.data.point_buckets == make_ladder(16_384, 1_048_576, (1.0, 1.5), multiple=1024)
    assert max(c.data.point_buckets) >= c.data.batch_size * c.data.max_points
    # the 4 synthetic ScanNet-sized rooms of bench_train.py (points of rooms 0-3): 525,284
    # points fill 67% of the 786,432-row bucket; the powers-of-2 ladder takes 1,048,576 (50%)
    rooms = [109_101, 156_122, 110_150, 149_911]
    n, _ = batch_capacities(
        rooms, [10] * 4, buckets=c.data.point_buckets, instance_buckets=c.data.instance_buckets
    )
    assert n == 786_432 and 0.66 < sum(rooms) / n < 0.68
    pow2 = base_config().data.point_buckets
    n2, _ = batch_capacities(rooms, [10] * 4, buckets=pow2, instance_buckets=(16, 64))
    assert n2 == 1_048_576


def test_memory_levers_are_checked_schema_keys():
    c = base_config()
    assert c.model.remat == "none" and c.train.precision == "f32"
    for key, bad in (("model.remat", "blocks"), ("train.precision", "fp16")):
        c = base_config()
        section, name = key.split(".")
        c[section][name] = bad
        with pytest.raises(ValueError, match=key):
            validate(c)


def test_overflow_safe_settings():
    from dknet_jax.config import is_overflow_safe, overflow_safe

    c = _load("scannet")
    assert c.model.tile_fallback is False and not is_overflow_safe(c)
    safe = overflow_safe(c)
    assert tuple(safe.model.level_capacity_ratio) == (1.0,) and safe.model.tile_fallback
    assert is_overflow_safe(safe) and validate(safe) is safe
    # a copy: the original keeps its settings; everything else is the same
    assert c.model.level_capacity_ratio == (0.5,) and not c.model.tile_fallback
    safe.model.level_capacity_ratio, safe.model.tile_fallback = c.model.level_capacity_ratio, False
    assert safe.to_dict() == c.to_dict()

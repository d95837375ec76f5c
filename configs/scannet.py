"""DKNet on ScanNet v2 with the paper's settings (docs/method.md; the released code's
numbers where the paper is silent).

  python scripts/prepare_scannet.py --scannet_root /data/scannet --out data/scannet
  python scripts/train.py --config=configs/scannet.py --workdir work_dirs/scannet

Expected (paper, val): mAP 50.8, AP50 66.7, AP25 76.9. Ablations, e.g.
  --config.model.candidates=nms   --config.model.aggregation=train_only
  --config.model.kernel_from=top
`--config=configs/scannet.py:tiny` gives a test-sized variant;
`--config=configs/scannet.py:released` the released model's switches (the config of a
checkpoint converted by scripts/convert_released.py; docs/released_model.md section 5).
"""

from dknet_jax.config import base_config, released_settings


def get_config(arg: str | None = None):
    c = base_config()
    c.data.dataset = "scannet"
    c.data.root = "data/scannet"
    # point buckets 2**k x {1, 1.5} (data.batching.make_ladder(16_384, 1_048_576, (1, 1.5),
    # multiple=1024)) instead of powers of two: 4 ScanNet-sized rooms (525k points) pack
    # into 786,432 rows (67% full) instead of 1,048,576 (50%), and XLA's memory estimate of
    # the train step scales with the rows; 7 batch shapes instead of 5 over 200 rooms
    # (docs/benchmarks.md, "Training step memory")
    c.data.point_buckets = (
        16_384, 24_576, 32_768, 49_152, 65_536, 98_304, 131_072,
        196_608, 262_144, 393_216, 524_288, 786_432, 1_048_576,
    )  # fmt: skip
    if arg == "released":
        released_settings(c)
    elif arg == "tiny":
        c.model.widths = (8, 16)
        c.model.blocks_per_level = 1
        c.data.max_points = 4096
        c.data.batch_size = 2
        c.data.point_buckets = (4096, 8192)
        c.train.epochs = 1
    return c

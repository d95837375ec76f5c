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

"""DKNet on S3DIS (Area 5 held out), paper settings: 5 cm voxels, 13 classes, every
annotated object is an instance (so no "background" classes).

  python scripts/prepare_s3dis.py \
      --s3dis_root /data/Stanford3dDataset_v1.2_Aligned_Version --out data/s3dis
  python scripts/train.py --config=configs/s3dis.py --workdir work_dirs/s3dis

Expected (paper, Area 5): mCov 64.7, mWCov 65.6, mPrec 70.8, mRec 65.3.
"""

from dknet_jax.config import base_config


def get_config(arg: str | None = None):
    c = base_config()
    c.data.dataset = "s3dis"
    c.data.root = "data/s3dis"
    c.data.train_split = "train"  # Areas 1-4, 6
    c.data.val_split = "val"  # Area 5
    c.data.voxel_size = 0.05
    c.model.num_classes = 13
    c.model.first_instance_class = 0
    return c

"""Shape glossary and the typed pytrees passed between stages.

Letters: B scenes, N points, V voxels, R rules (kernel-map pairs), K candidates / instance
slots, G ground-truth instances, C channels, S classes.

Static-shape conventions (everything under ``jit`` has a capacity):
- Scenes are packed flat: ``batch_id[i]`` is the scene of row ``i``; padded rows have
  ``batch_id == B`` and ``valid == False``.
- A sentinel index equals the capacity of the indexed array (``segment_sum(...,
  num_segments=cap)`` drops it; gathers use ``mode="fill"``).
- Labels use -100 for "ignore / no instance".
"""

from __future__ import annotations

import flax.struct
import jax

Array = jax.Array

IGNORE_LABEL = -100


@flax.struct.dataclass
class PointBatch:
    """B scenes packed into N point rows (N = the bucket's point capacity).

    Attributes:
      xyz: f32[N, 3] point coordinates in metres after augmentation (used for offsets,
        centroids, LN-NMS radii).
      feats: f32[N, 6] network input per point: rgb scaled to [-1, 1] then xyz.
      vox: i32[N, 3] integer voxel coordinate of each point, >= 0 (shifted per scene).
      batch_id: i32[N] scene index 0..B-1; B for padding rows.
      valid: bool[N] real (non-padding) rows.
      semantic: i32[N] class 0..S-1 or -100.
      instance: i32[N] batch-global instance id 0..G-1 (scene offsets already added) or -100.
      superpoint: i32[N] batch-global superpoint id 0..P-1, -1 for padding.
      instance_class: i32[G] semantic class of each GT instance (-100 for empty slots).
      instance_batch: i32[G] scene of each GT instance (B for empty slots).
      instance_valid: bool[G] real GT instance slots.
      scene_valid: bool[B] real scenes (a batch may be padded with empty scenes).
    """

    xyz: Array
    feats: Array
    vox: Array
    batch_id: Array
    valid: Array
    semantic: Array
    instance: Array
    superpoint: Array
    instance_class: Array
    instance_batch: Array
    instance_valid: Array
    scene_valid: Array

    @property
    def num_scenes(self) -> int:
        return self.scene_valid.shape[-1]

"""Synthetic ScanNet-style rooms: the project's default dataset, no download needed.

Place in the data flow: **synthetic** (room meshes, written as raw ScanNet v2 / S3DIS
files) -> `scripts/prepare_scannet.py` / `prepare_s3dis.py` (the code that reads real
scans) -> prepared npz -> training. The pipeline itself never imports this package;
`scripts/make_synthetic.py`, the overfit check and tests do. It imports `dknet_jax.data`
(label tables, PLY writer, ScanNet file names, segmentation), never the other way.

Modules, from the smallest piece up:

| module | builds |
|---|---|
| `primitives` | boxes, cylinders, sheets; their triangle meshes; pose arithmetic |
| `appearance` | materials and, per kind of surface, a mix of them (`draw_color`) |
| `categories` | raw categories and their nyu40 id / S3DIS class |
| `furniture` | `SceneObject`, single pieces (chair, table, cabinet, bed, ...) |
| `groups` | arrangements placed as one unit (a table with its chairs, a desk set, ...) |
| `layout` | `RoomLayout`: outline, walls, doors, windows, collision-free placement |
| `rooms` | room recipes per room type; `layout_room` furnishes one room |
| `scene` | `generate_scene`: tessellation, what a scanner misses, noise -> `SceneMesh` |
| `writers` | raw ScanNet / S3DIS files and whole datasets (`make_dataset`) |
"""

from dknet_jax.synthetic.categories import RAW_CATEGORIES, STRUCTURE_CATEGORIES
from dknet_jax.synthetic.rooms import layout_room
from dknet_jax.synthetic.scene import SIZES, SceneMesh, generate_scene
from dknet_jax.synthetic.writers import (
    LABEL_TABLE_HEADER,
    make_dataset,
    scannet_seg_groups,
    split_scenes,
    write_label_table,
    write_s3dis_room,
    write_scannet_scene,
)

__all__ = [
    "LABEL_TABLE_HEADER",
    "RAW_CATEGORIES",
    "SIZES",
    "STRUCTURE_CATEGORIES",
    "SceneMesh",
    "generate_scene",
    "layout_room",
    "make_dataset",
    "scannet_seg_groups",
    "split_scenes",
    "write_label_table",
    "write_s3dis_room",
    "write_scannet_scene",
]

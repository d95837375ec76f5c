"""Label tables of the ScanNet v2 and S3DIS benchmarks (facts from the datasets' tools).

ScanNet: 20 semantic classes given by nyu40 ids; the 18 instance classes are those minus
wall (1) and floor (2). S3DIS: 13 classes in the common order (ISBNet/Mask3D/S3DIS tools).
"""

from __future__ import annotations

import numpy as np

from dknet_jax.types import IGNORE_LABEL

# ---------------------------------------------------------------------------------------
# ScanNet v2
SCANNET_NYU40_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39)
SCANNET_CLASSES = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window",
    "bookshelf", "picture", "counter", "desk", "curtain", "refrigerator",
    "shower curtain", "toilet", "sink", "bathtub", "otherfurniture",
)
SCANNET_INSTANCE_NYU40_IDS = SCANNET_NYU40_IDS[2:]
SCANNET_INSTANCE_CLASSES = SCANNET_CLASSES[2:]
# semantic index (0..19) of the first instance class; indices >= this are instance classes
SCANNET_FIRST_INSTANCE_CLASS = 2

# nyu40 class names (index = nyu40 id), used to write a label table for synthetic data.
NYU40_NAMES = (
    None, "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window",
    "bookshelf", "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser",
    "pillow", "mirror", "floor mat", "clothes", "ceiling", "books", "refridgerator",
    "television", "paper", "towel", "shower curtain", "box", "whiteboard", "person",
    "night stand", "toilet", "sink", "lamp", "bathtub", "bag", "otherstructure",
    "otherfurniture", "otherprop",
)


def nyu40_to_scannet20() -> np.ndarray:
    """i32[41]: nyu40 id -> benchmark semantic index 0..19, -100 for other ids."""
    table = np.full(41, IGNORE_LABEL, dtype=np.int32)
    for idx, nyu in enumerate(SCANNET_NYU40_IDS):
        table[nyu] = idx
    return table


def map_nyu40(nyu40: np.ndarray) -> np.ndarray:
    """Map nyu40 ids (any int array) to 0..19 / -100; ids outside 0..40 become -100."""
    nyu40 = np.asarray(nyu40)
    table = nyu40_to_scannet20()
    inside = (nyu40 >= 0) & (nyu40 <= 40)
    out = np.full(nyu40.shape, IGNORE_LABEL, dtype=np.int32)
    out[inside] = table[nyu40[inside]]
    return out


# ---------------------------------------------------------------------------------------
# S3DIS
S3DIS_CLASSES = (
    "ceiling", "floor", "wall", "beam", "column", "window", "door", "table", "chair",
    "sofa", "bookcase", "board", "clutter",
)
S3DIS_ALIASES = {"stairs": "clutter"}


def s3dis_class_index(name: str) -> int:
    """Class index 0..12 of an S3DIS annotation name (``chair`` of ``chair_3.txt``);
    ``stairs`` maps to clutter; unknown names return -100."""
    name = S3DIS_ALIASES.get(name, name)
    try:
        return S3DIS_CLASSES.index(name)
    except ValueError:
        return IGNORE_LABEL

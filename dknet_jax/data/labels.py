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
    "wall",
    "floor",
    "cabinet",
    "bed",
    "chair",
    "sofa",
    "table",
    "door",
    "window",
    "bookshelf",
    "picture",
    "counter",
    "desk",
    "curtain",
    "refrigerator",
    "shower curtain",
    "toilet",
    "sink",
    "bathtub",
    "otherfurniture",
)
SCANNET_INSTANCE_NYU40_IDS = SCANNET_NYU40_IDS[2:]
SCANNET_INSTANCE_CLASSES = SCANNET_CLASSES[2:]
# semantic index (0..19) of the first instance class; indices >= this are instance classes
SCANNET_FIRST_INSTANCE_CLASS = 2

# nyu40 class names (index = nyu40 id), used to write a label table for synthetic data.
NYU40_NAMES = (
    None,
    "wall",
    "floor",
    "cabinet",
    "bed",
    "chair",
    "sofa",
    "table",
    "door",
    "window",
    "bookshelf",
    "picture",
    "counter",
    "blinds",
    "desk",
    "shelves",
    "curtain",
    "dresser",
    "pillow",
    "mirror",
    "floor mat",
    "clothes",
    "ceiling",
    "books",
    "refridgerator",
    "television",
    "paper",
    "towel",
    "shower curtain",
    "box",
    "whiteboard",
    "person",
    "night stand",
    "toilet",
    "sink",
    "lamp",
    "bathtub",
    "bag",
    "otherstructure",
    "otherfurniture",
    "otherprop",
)


# ScanNet's nyu40 label colours (index = nyu40 id; 0 = unannotated is black), the colours of
# ScanNet's `*_vh_clean_2.labels.ply` files (ScanNet's util.create_color_palette).
NYU40_PALETTE = np.array(
    [
        (0, 0, 0),
        (174, 199, 232),
        (152, 223, 138),
        (31, 119, 180),
        (255, 187, 120),
        (188, 189, 34),
        (140, 86, 75),
        (255, 152, 150),
        (214, 39, 40),
        (197, 176, 213),
        (148, 103, 189),
        (196, 156, 148),
        (23, 190, 207),
        (178, 76, 76),
        (247, 182, 210),
        (66, 188, 102),
        (219, 219, 141),
        (140, 57, 197),
        (202, 185, 52),
        (51, 176, 203),
        (200, 54, 131),
        (92, 193, 61),
        (78, 71, 183),
        (172, 114, 82),
        (255, 127, 14),
        (91, 163, 138),
        (153, 98, 156),
        (140, 153, 101),
        (158, 218, 229),
        (100, 125, 154),
        (178, 127, 135),
        (120, 185, 128),
        (146, 111, 194),
        (44, 160, 44),
        (112, 128, 144),
        (96, 207, 209),
        (227, 119, 194),
        (213, 92, 176),
        (94, 106, 211),
        (82, 84, 163),
        (100, 85, 144),
    ],
    np.uint8,
)
NYU40_PALETTE.flags.writeable = False

# a fixed colour for each of the 13 S3DIS classes (ours: S3DIS ships no palette)
S3DIS_PALETTE = np.array(
    [
        (0, 255, 0),
        (0, 0, 255),
        (0, 255, 255),
        (255, 255, 0),
        (255, 0, 255),
        (100, 100, 255),
        (200, 200, 100),
        (170, 120, 200),
        (255, 0, 0),
        (200, 100, 100),
        (10, 200, 100),
        (200, 200, 200),
        (50, 50, 50),
    ],
    np.uint8,
)
S3DIS_PALETTE.flags.writeable = False


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
    "ceiling",
    "floor",
    "wall",
    "beam",
    "column",
    "window",
    "door",
    "table",
    "chair",
    "sofa",
    "bookcase",
    "board",
    "clutter",
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

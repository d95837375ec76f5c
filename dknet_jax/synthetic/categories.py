"""What the synthetic generator calls the things it places, and their benchmark labels.

Every object carries a *raw category*, the free-text name a ScanNet annotator gives an
object ("office chair", "kitchen cabinets"). `RAW_CATEGORIES` is the generator's label
table: raw category -> (nyu40 id, S3DIS class). The ScanNet writer turns it into the
dataset's `scannetv2-labels.combined.tsv` (`writers.write_label_table`), so preparation
maps raw categories to classes exactly as for real scans; the S3DIS writer names each
object's annotation file after its S3DIS class.

Books are objects of their own (raw "books", nyu40 23, not a benchmark class), as
ScanNet's annotators mostly labelled them, so a bookshelf instance is the shelf alone.
"""

from __future__ import annotations

# raw category -> (nyu40 id, S3DIS class). Benchmark classes first, then clutter.
RAW_CATEGORIES: dict[str, tuple[int, str]] = {
    "wall": (1, "wall"),
    "floor": (2, "floor"),
    "ceiling": (22, "ceiling"),
    "beam": (38, "beam"),
    "column": (38, "column"),
    "cabinet": (3, "clutter"),
    "kitchen cabinets": (3, "clutter"),
    "file cabinet": (3, "clutter"),
    "bed": (4, "clutter"),
    "chair": (5, "chair"),
    "office chair": (5, "chair"),
    "couch": (6, "sofa"),
    "table": (7, "table"),
    "coffee table": (7, "table"),
    "door": (8, "door"),
    "window": (9, "window"),
    "bookshelf": (10, "bookcase"),
    "picture": (11, "clutter"),
    "counter": (12, "clutter"),
    "kitchen counter": (12, "clutter"),
    "desk": (14, "table"),
    "curtain": (16, "clutter"),
    "refrigerator": (24, "clutter"),
    "shower curtain": (28, "clutter"),
    "toilet": (33, "clutter"),
    "sink": (34, "clutter"),
    "bathtub": (36, "clutter"),
    "trash can": (39, "clutter"),
    "ottoman": (39, "clutter"),
    "tv stand": (39, "clutter"),
    # non-benchmark nyu40 classes ("other clutter")
    "nightstand": (32, "clutter"),
    "pillow": (18, "clutter"),
    "lamp": (35, "clutter"),
    "box": (29, "clutter"),
    "books": (23, "clutter"),
    "monitor": (40, "clutter"),
    "backpack": (37, "clutter"),
    "tv": (25, "clutter"),
    "whiteboard": (30, "board"),
    "mirror": (19, "clutter"),
    "towel": (27, "clutter"),
    "microwave": (40, "clutter"),
}
# The building itself: always annotated, never furniture.
STRUCTURE_CATEGORIES = ("wall", "floor", "ceiling", "beam", "column")

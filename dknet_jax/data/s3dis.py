"""S3DIS preparation: ``Area_N/<room>/Annotations/*.txt`` -> prepared scene arrays.

Place in the data flow: ``R/Area_N/<room>/`` (real, aligned release, or from
`make_synthetic.py --format s3dis`) -> **s3dis** -> `preparation.run_jobs` ->
``O/Area_N_<room>.npz`` (docs/contracts.md section 3) -> input pipeline.

Rules (the decisions this module documents):
- Only ``Annotations/*.txt`` are read (never ``<room>.txt``, whose name may differ from the
  folder's), concatenated in sorted file-name order; each file is one object. The scene
  name is the folder's: ``Area_N_<room>``.
- Class = the file name's leading letters (``chair`` of ``chair_3.txt``), ``stairs`` ->
  clutter, 13 classes in `labels.S3DIS_CLASSES` order. An unknown class keeps its points
  with semantic and instance -100 (warning).
- ``instance``: every object with points, numbered 0..K-1 in file order.
- Duplicate-looking names ``<stem> (1).txt``: when ``<stem>.txt`` exists with identical
  bytes the copy is skipped (warning); otherwise it is kept as its own object (warning).
- Rows ``x y z r g b`` are parsed by `readers.read_rows`: a corrupt row (NUL byte between
  two numbers, control byte inside a number, wrong column count, non-numeric, non-finite)
  is skipped with a warning naming file and line. Colours outside 0..255 are clipped
  (warning).
- ``superpoint``: `superpoints.segment_points` (kNN graph on 2 cm voxel centroids by
  default), ids = a root point index per segment.
"""

from __future__ import annotations

import inspect
import os
import re
import sys
from collections import Counter
from collections.abc import Callable

import numpy as np

from dknet_jax.data.labels import IGNORE_LABEL, s3dis_class_index
from dknet_jax.data.readers import read_rows, warn_data
from dknet_jax.data.superpoints import segment_points

__all__ = ["annotation_files", "find_rooms", "prepare_s3dis", "prepare_s3dis_room"]

_NAME = re.compile(r"^(?P<cls>[A-Za-z]+)(?:_[^ ]*)?(?P<dup> \(\d+\))?\.txt$")


def annotation_files(
    room_dir: str, warn: Callable[[str], None] = warn_data
) -> list[tuple[str, str]]:
    """``[(path, class name)]`` of a room's annotation files, sorted by file name, with
    byte-identical ``<stem> (N).txt`` copies removed."""
    ann = os.path.join(room_dir, "Annotations")
    if not os.path.isdir(ann):
        raise FileNotFoundError(f"{room_dir}: missing Annotations folder {ann}")
    names = sorted(
        n for n in os.listdir(ann) if n.endswith(".txt") and os.path.isfile(os.path.join(ann, n))
    )
    if not names:
        raise FileNotFoundError(f"{room_dir}: no annotation .txt files in {ann}")
    out = []
    for name in names:
        path = os.path.join(ann, name)
        m = _NAME.match(name)
        cls = m.group("cls") if m else name[:-4]
        if m and m.group("dup"):
            original = os.path.join(ann, name[: m.start("dup")] + ".txt")
            if os.path.isfile(original) and _same_bytes(original, path):
                warn(f"{path}: identical copy of {os.path.basename(original)}; skipped")
                continue
            warn(
                f"{path}: duplicate-looking name with different content; kept as a separate object"
            )
        out.append((path, cls))
    return out


def _same_bytes(a: str, b: str) -> bool:
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


def prepare_s3dis_room(
    room_dir: str,
    *,
    k: int = 10,
    voxel_size: float | None = 0.02,
    k_thresh: float = 0.01,
    seg_min_verts: int = 20,
    warn: Callable[[str], None] = warn_data,
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Prepare one S3DIS room (rules in the module docstring).

    Args:
      room_dir: ``R/Area_N/<room>``.
      k, voxel_size, k_thresh, seg_min_verts: superpoint parameters (`segment_points`).
      warn: sink of warning messages.

    Returns:
      (arrays, stats): ``xyz`` f32[N, 3], ``rgb`` u8[N, 3], ``semantic`` i32[N] (0..12 /
      -100), ``instance`` i32[N], ``superpoint`` i32[N]; stats: report counters.
    """
    stats: Counter = Counter(scenes=1)
    xyz, rgb, sem, inst = [], [], [], []
    next_id = 0
    for path, cls_name in annotation_files(room_dir, warn):
        rows = read_rows(path, 6, warn=warn)
        stats["rows_skipped"] += rows.skipped
        v = rows.values
        if len(v) == 0:
            warn(f"{path}: no valid rows; object ignored")
            stats["objects_empty"] += 1
            continue
        cls = s3dis_class_index(cls_name)
        if cls == IGNORE_LABEL:
            warn(
                f"{path}: unknown S3DIS class {cls_name!r}; its points get semantic and "
                f"instance -100"
            )
            stats["objects_unknown_class"] += 1
            stats["points_unknown_class"] += len(v)
            ids = IGNORE_LABEL
        else:
            ids = next_id
            next_id += 1
        col = v[:, 3:6]
        if col.min() < 0 or col.max() > 255:
            warn(f"{path}: colours outside 0..255 clipped")
            stats["colour_rows_clipped"] += int(np.sum(np.any((col < 0) | (col > 255), 1)))
        xyz.append(v[:, :3].astype(np.float32))
        rgb.append(np.clip(np.rint(col), 0, 255).astype(np.uint8))
        sem.append(np.full(len(v), cls, np.int32))
        inst.append(np.full(len(v), ids, np.int32))
    if not xyz:
        raise ValueError(f"{room_dir}: no points in any annotation file")
    arrays = {
        "xyz": np.concatenate(xyz),
        "rgb": np.concatenate(rgb),
        "semantic": np.concatenate(sem),
        "instance": np.concatenate(inst),
    }
    sp = segment_points(
        arrays["xyz"], k=k, k_thresh=k_thresh, seg_min_verts=seg_min_verts, voxel_size=voxel_size
    )
    arrays["superpoint"] = sp.astype(np.int32)
    stats.update(points=len(sp), instances=next_id, superpoints=len(np.unique(sp)))
    return arrays, dict(stats)


def find_rooms(root: str, areas: list[int] | None = None) -> list[tuple[str, str]]:
    """``[(scene name Area_N_<room>, room folder)]`` under ``R/Area_N/``, sorted."""
    out = []
    area_dirs = sorted(
        d
        for d in os.listdir(root)
        if re.fullmatch(r"Area_\d+", d) and os.path.isdir(os.path.join(root, d))
    )
    if areas is not None:
        area_dirs = [d for d in area_dirs if int(d[5:]) in set(areas)]
    for area in area_dirs:
        for room in sorted(os.listdir(os.path.join(root, area))):
            d = os.path.join(root, area, room)
            if os.path.isdir(d) and not room.startswith("."):
                out.append((f"{area}_{room}", d))
    return out


def _room_job(room_dir: str, params: dict, *, warn=warn_data):
    return prepare_s3dis_room(room_dir, warn=warn, **params)


def prepare_s3dis(
    root: str,
    out: str,
    *,
    areas: list[int] | None = None,
    test_area: int = 5,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    **params,
):
    """Prepare every room: ``O/Area_N_<room>.npz``, split lists ``O/Area_N.txt`` and,
    for the usual protocol, ``O/train.txt`` (areas != test_area) and ``O/val.txt``.

    The superpoint parameters (``k``, ``voxel_size``, ``k_thresh``, ``seg_min_verts``)
    are recorded in ``O/prepare_settings.json``; a rerun with other values stops with
    `preparation.SettingsMismatch` unless ``overwrite``. Failed rooms are named per split
    in the report and a split with no room gets no list (`preparation.write_split_lists`).

    Returns:
      `preparation.Summary` (also written to ``O/prepare_report.json``).
    """
    from dknet_jax.data.preparation import (
        Job,
        check_settings,
        run_jobs,
        write_report,
        write_split_lists,
    )

    if not os.path.isdir(root):
        raise FileNotFoundError(f"S3DIS root not found: {root}")
    rooms = find_rooms(root, areas)
    if not rooms:
        only = f" for --areas {' '.join(map(str, areas))}" if areas is not None else ""
        raise FileNotFoundError(f"no Area_N/<room> folders under {root}{only}")
    # the superpoint parameters decide the arrays: recorded, a rerun must use the same
    room_params = dict(inspect.signature(prepare_s3dis_room).parameters)
    settings = {"dataset": "s3dis"}
    for name in ("k", "voxel_size", "k_thresh", "seg_min_verts"):
        settings[name] = params.get(name, room_params[name].default)
    commit = check_settings(out, settings, overwrite=overwrite, scenes=[n for n, _ in rooms])
    jobs = [
        Job(name, os.path.join(out, f"{name}.npz"), _room_job, (d, params)) for name, d in rooms
    ]
    summary = run_jobs(
        jobs, workers=workers, overwrite=overwrite, desc="S3DIS rooms", progress=progress
    )
    commit(summary)
    done = sorted(
        f[:-4]
        for f in os.listdir(out)  # every prepared room, not just this run's
        if re.fullmatch(r"Area_\d+_.+\.npz", f)
    )
    lists: dict[str, list[str]] = {"train": [], "val": []}
    failed: dict[str, list[str]] = {}

    def splits_of(name: str) -> list[str]:
        area = name.split("_")[0] + "_" + name.split("_")[1]
        return [area, "val" if area == f"Area_{test_area}" else "train"]

    for name in done:
        for split in splits_of(name):
            lists.setdefault(split, []).append(name)
    for name in summary.failed:
        if name in done:  # an older npz of it is still there (overwrite) and listed
            continue
        for split in splits_of(name):
            failed.setdefault(split, []).append(name)
            lists.setdefault(split, [])
    notes: list[str] = []

    def note(message: str) -> None:
        notes.append(message)
        print(f"warning: {message}", file=sys.stderr)

    extra = write_split_lists(out, lists, failed, note)
    summary.warnings.update(notes)
    write_report(
        os.path.join(out, "prepare_report.json"), summary, {"test_area": test_area, **extra}
    )
    return summary

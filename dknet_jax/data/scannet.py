"""ScanNet v2 preparation: raw scan folder -> prepared scene arrays.

Place in the data flow: ``R/scans/<scene>/`` (real or from `make_synthetic.py`) ->
**scannet** -> `preparation.run_jobs` -> ``O/<scene>.npz`` (docs/contracts.md
section 3) -> input pipeline.

Files read per scene, and only these (the hi-res ``_vh_clean.*`` decoys and the
``<scene>.txt`` axis alignment are never touched; coordinates stay raw):
``<scene>_vh_clean_2.ply`` (xyz, rgb), ``<scene>_vh_clean_2.labels.ply`` (nyu40 id per
vertex), ``<scene>_vh_clean_2.0.010000.segs.json`` (superpoints),
``<scene>.aggregation.json`` (objects); plus ``R/scannetv2-labels.combined.tsv``.

Label rules (the decisions this module documents):
- ``semantic``: the labels ply's nyu40 id -> benchmark index 0..19; other nyu40 ids and 0
  (unannotated) -> -100; ids outside 0..40 (stray values of a few real scenes) -> -100
  with a warning.
- ``instance``: objects of the aggregation (deduplicated by ``objectId``, first kept, in
  ascending objectId order) whose raw category maps (tsv raw_category -> nyu40id ->
  benchmark index) to one of the 18 instance classes. An object's vertices are the
  vertices of all its segments. A vertex keeps the instance only when its per-vertex
  semantic label equals the object's class, so every instance is semantically pure and
  its class is the semantic label of any of its points; disagreeing vertices become -100
  (counted). A vertex claimed by two objects stays with the first (counted). Instances
  are numbered 0..K-1 in objectId order, objects left with no vertex get no id.
  Wall/floor, non-benchmark and unmapped objects, and vertices in no object: -100.
- ``superpoint``: the shipped segment ids, kept as given (union-find root vertex
  indices, not 0..S-1).
- Test scenes (listed in ``scannetv2_test.txt``, or without both the labels ply and the
  aggregation): semantic and instance all -100.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import Counter
from collections.abc import Callable

import numpy as np

from dknet_jax.data.labels import (
    IGNORE_LABEL,
    SCANNET_FIRST_INSTANCE_CLASS,
    map_nyu40,
)
from dknet_jax.data.ply import read_ply
from dknet_jax.data.readers import warn_data

__all__ = [
    "LABEL_TABLE",
    "SPLITS",
    "find_scene_dir",
    "prepare_scannet_scene",
    "read_label_table",
    "read_split",
    "scene_files",
]

LABEL_TABLE = "scannetv2-labels.combined.tsv"
SPLITS = ("train", "val", "test")


def scene_files(scene_dir: str, scene: str) -> dict[str, str]:
    """Paths of the four raw files of a scene (the only ones read)."""
    j = lambda name: os.path.join(scene_dir, name)
    return {
        "mesh": j(f"{scene}_vh_clean_2.ply"),
        "labels": j(f"{scene}_vh_clean_2.labels.ply"),
        "segs": j(f"{scene}_vh_clean_2.0.010000.segs.json"),
        "aggregation": j(f"{scene}.aggregation.json"),
    }


def find_scene_dir(root: str, scene: str) -> str:
    """``R/scans/<scene>`` or ``R/scans_test/<scene>`` (ScanNet's test download)."""
    for sub in ("scans", "scans_test"):
        d = os.path.join(root, sub, scene)
        if os.path.isdir(d):
            return d
    raise FileNotFoundError(
        f"{scene}: scene folder not found under {root}/scans or {root}/scans_test"
    )


class LabelTableError(ValueError):
    """The label table cannot be used (binary, no id columns): a user error."""


def read_split(path: str, warn: Callable[[str], None] = warn_data) -> list[str]:
    """Scene ids of a split file (one a line; blank lines ignored; a UTF-8 BOM is not part
    of the first id)."""
    out = []
    with open(path, encoding="utf-8-sig") as fh:
        for no, line in enumerate(fh, 1):
            s = line.strip()
            if not s:
                continue
            if any(c.isspace() for c in s) or os.sep in s:
                warn(f"{path}:{no}: skipped malformed scene id {s!r}")
                continue
            out.append(s)
    return out


def read_label_table(path: str, warn: Callable[[str], None] = warn_data) -> dict[str, int]:
    """ScanNet's ``scannetv2-labels.combined.tsv``: raw_category -> nyu40id.

    Columns are found by header name (``raw_category``, ``nyu40id``); matching is on ids,
    never class names. CRLF line endings are accepted. Malformed rows (too few columns,
    non-integer id, empty category) are skipped with a warning naming file and line; a
    category listed twice keeps its first id (warning if the ids differ).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"label table not found: {path} (expected {LABEL_TABLE} at the dataset root)"
        )
    try:  # utf-8-sig: a BOM is not part of the first column name
        with open(path, encoding="utf-8-sig", newline="") as fh:
            lines = fh.read().split("\n")
    except UnicodeDecodeError as e:
        raise LabelTableError(
            f"{path}: the label table is not a text file ({e.reason} at byte "
            f"{e.start}); expected ScanNet's tab-separated {LABEL_TABLE}"
        ) from e
    header = lines[0].rstrip("\r").split("\t")
    try:
        i_raw, i_nyu = header.index("raw_category"), header.index("nyu40id")
    except ValueError:
        raise LabelTableError(
            f"{path}: header lacks 'raw_category' / 'nyu40id' columns (found {header[:6]}...)"
        ) from None
    table: dict[str, int] = {}
    for no, line in enumerate(lines[1:], 2):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) <= max(i_raw, i_nyu):
            warn(f"{path}:{no}: skipped malformed row ({len(cols)} columns)")
            continue
        raw, nyu = cols[i_raw].strip(), cols[i_nyu].strip()
        try:
            nyu_id = int(nyu)
        except ValueError:
            warn(f"{path}:{no}: skipped row with non-integer nyu40id {nyu!r}")
            continue
        if not raw:
            warn(f"{path}:{no}: skipped row with an empty raw_category")
            continue
        if raw in table:
            if table[raw] != nyu_id:
                warn(
                    f"{path}:{no}: raw_category {raw!r} listed again with nyu40id "
                    f"{nyu_id} (keeping {table[raw]})"
                )
            continue
        table[raw] = nyu_id
    return table


def _need(path: str, scene: str, what: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{scene}: missing {what} file {path}")
    return path


def _load_json(path: str, scene: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{scene}: {path} is not valid JSON ({e})") from e


def prepare_scannet_scene(
    scene_dir: str,
    scene: str,
    label_table: dict[str, int],
    *,
    test: bool | None = None,
    warn: Callable[[str], None] = warn_data,
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Prepare one ScanNet scene (rules in the module docstring).

    Args:
      scene_dir: the scene folder (``R/scans/<scene>``).
      scene: scene id.
      label_table: `read_label_table` output.
      test: True for a test scene (no labels); None decides from the files present.
      warn: sink of warning messages.

    Returns:
      (arrays, stats): arrays ``xyz`` f32[N, 3], ``rgb`` u8[N, 3], ``semantic`` i32[N],
      ``instance`` i32[N], ``superpoint`` i32[N]; stats: counters for the report.

    Raises:
      FileNotFoundError naming the scene and file; ValueError for inconsistent files.
    """
    files = scene_files(scene_dir, scene)
    mesh = read_ply(_need(files["mesh"], scene, "mesh"))
    v = mesh.vertex
    for c in ("x", "y", "z", "red", "green", "blue"):
        if c not in v:
            raise ValueError(f"{scene}: {files['mesh']} lacks vertex property {c!r}")
    xyz = np.stack([v["x"], v["y"], v["z"]], 1).astype(np.float32)
    rgb = np.stack([v["red"], v["green"], v["blue"]], 1).astype(np.uint8)
    n = len(xyz)
    if n == 0:
        raise ValueError(f"{scene}: {files['mesh']} has no vertices")
    if not np.all(np.isfinite(xyz)):
        raise ValueError(f"{scene}: {files['mesh']} has NaN/inf coordinates")

    segs = _load_json(_need(files["segs"], scene, "segments"), scene)
    if "segIndices" not in segs:
        raise ValueError(f"{scene}: {files['segs']} has no 'segIndices'")
    seg = np.asarray(segs["segIndices"], dtype=np.int64)
    if seg.shape != (n,):
        raise ValueError(
            f"{scene}: {files['segs']} has {seg.size} segIndices for {n} mesh vertices"
        )
    stats = Counter(scenes=1, points=n, superpoints=len(np.unique(seg)))
    semantic = np.full(n, IGNORE_LABEL, np.int32)
    instance = np.full(n, IGNORE_LABEL, np.int32)
    arrays = {
        "xyz": xyz,
        "rgb": rgb,
        "semantic": semantic,
        "instance": instance,
        "superpoint": seg.astype(np.int32),
    }

    has_labels = os.path.isfile(files["labels"])
    has_agg = os.path.isfile(files["aggregation"])
    if test is None:
        test = not has_labels and not has_agg
    if test:
        stats["test_scenes"] = 1
        return arrays, dict(stats)
    _need(files["labels"], scene, "labels")
    _need(files["aggregation"], scene, "aggregation")

    # semantic labels ---------------------------------------------------------------
    lab = read_ply(files["labels"]).vertex
    if "label" not in lab:
        raise ValueError(f"{scene}: {files['labels']} has no vertex property 'label'")
    nyu = np.asarray(lab["label"]).astype(np.int64)
    if nyu.shape != (n,):
        raise ValueError(f"{scene}: {files['labels']} has {nyu.size} vertices, the mesh {n}")
    stray = (nyu < 0) | (nyu > 40)
    if stray.any():
        vals = sorted(set(nyu[stray].tolist()))
        warn(
            f"{scene}: {int(stray.sum())} vertices of {files['labels']} carry ids "
            f"outside nyu40 {vals[:10]}; treated as unannotated"
        )
        stats["stray_label_points"] += int(stray.sum())
    semantic[:] = map_nyu40(nyu)

    # instances ---------------------------------------------------------------------
    agg = _load_json(files["aggregation"], scene)
    groups = agg.get("segGroups")
    if not isinstance(groups, list):
        raise ValueError(f"{scene}: {files['aggregation']} has no 'segGroups' list")
    by_object: dict[int, dict] = {}
    for i, g in enumerate(groups):
        try:
            oid = int(g["objectId"])
            segments = [int(s) for s in g["segments"]]
            label = str(g["label"]).strip()
        except (KeyError, TypeError, ValueError):
            warn(f"{scene}: {files['aggregation']}: skipped malformed segGroup #{i}")
            stats["malformed_groups"] += 1
            continue
        if oid in by_object:
            stats["duplicate_groups"] += 1
            continue
        by_object[oid] = {"segments": segments, "label": label}
    if stats["duplicate_groups"]:
        warn(
            f"{scene}: {files['aggregation']} lists {stats['duplicate_groups']} "
            f"segGroups again under an existing objectId; kept the first of each"
        )

    seg_ids = np.unique(seg)
    claimed = np.zeros(n, bool)
    next_id = 0
    for oid in sorted(by_object):
        obj = by_object[oid]
        nyu_id = label_table.get(obj["label"])
        if nyu_id is None:
            warn(
                f"raw category {obj['label']!r} is not in {LABEL_TABLE}; its objects are "
                f"treated as unannotated"
            )
            stats["objects_unmapped"] += 1
            continue
        cls = int(map_nyu40(np.array([nyu_id]))[0])
        if cls < SCANNET_FIRST_INSTANCE_CLASS:  # -100 (not benchmark) or wall / floor
            stats["objects_not_instance_class"] += 1
            continue
        wanted = np.asarray(obj["segments"], np.int64)
        unknown = ~np.isin(wanted, seg_ids)
        if unknown.any():
            stats["unknown_segments"] += int(unknown.sum())
            warn(
                f"{scene}: object {oid} of {files['aggregation']} lists "
                f"{int(unknown.sum())} segment ids absent from {files['segs']}"
            )
        member = np.isin(seg, wanted)
        stats["points_claimed_twice"] += int((member & claimed).sum())
        member &= ~claimed
        agree = member & (semantic == cls)
        stats["points_semantic_disagrees"] += int((member & ~agree).sum())
        claimed |= member
        if not agree.any():
            stats["objects_empty"] += 1
            continue
        instance[agree] = next_id
        next_id += 1
    stats["instances"] = next_id
    stats["points_unannotated"] = int((semantic == IGNORE_LABEL).sum())
    stats["points_in_no_instance"] = int((instance == IGNORE_LABEL).sum())
    for key in ("points_claimed_twice", "points_semantic_disagrees"):
        if stats[key]:
            warn(
                f"{scene}: {stats[key]} {key.replace('_', ' ')} (instance set to -100 "
                f"where the labels ply disagrees; first object kept when claimed twice)"
            )
    return arrays, dict(stats)


def _scene_job(
    root: str,
    scene: str,
    table: dict[str, int],
    test: bool | None,
    *,
    warn: Callable[[str], None] = warn_data,
):
    return prepare_scannet_scene(find_scene_dir(root, scene), scene, table, test=test, warn=warn)


def prepare_scannet(
    root: str,
    out: str,
    *,
    split_dir: str | None = None,
    scenes: list[str] | None = None,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
):
    """Prepare a ScanNet v2 folder: ``O/<scene>.npz`` per scene + split lists.

    Scenes: ``scenes`` if given, else every folder of ``R/scans`` and ``R/scans_test``.
    Splits: ``scannetv2_{train,val,test}.txt`` looked up in ``split_dir`` (default R);
    when present, scenes of the test list are prepared as test scenes and
    ``O/<split>.txt`` lists the scenes of each split that have an npz in O (the npz
    files all stay flat in O). Listed scenes that are absent are counted and reported;
    listed scenes that failed are named per split (``split_failed`` in the report) and a
    split with no prepared scene gets no list (see `preparation.write_split_lists`).
    The label table's digest is recorded in ``O/prepare_settings.json``: a rerun with
    another table stops with `preparation.SettingsMismatch` unless ``overwrite``.

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

    notes: list[str] = []

    def note(message: str) -> None:  # run-level warnings: printed now, kept in the report
        notes.append(message)
        print(f"warning: {message}", file=sys.stderr)

    table_path = os.path.join(root, LABEL_TABLE)
    table = read_label_table(table_path, warn=note)
    split_dir = split_dir or root
    splits = {}
    for name in SPLITS:
        p = os.path.join(split_dir, f"scannetv2_{name}.txt")
        if os.path.isfile(p):
            splits[name] = read_split(p, warn=note)
    if scenes is None:
        scenes = sorted(
            {
                d
                for sub in ("scans", "scans_test")
                if os.path.isdir(os.path.join(root, sub))
                for d in os.listdir(os.path.join(root, sub))
                if os.path.isdir(os.path.join(root, sub, d))
            }
        )
    if not scenes:
        raise FileNotFoundError(f"no scene folders under {root}/scans")
    test_set = set(splits.get("test", ()))
    # what decides a scene's arrays besides its own files: the label mapping
    with open(table_path, "rb") as fh:
        table_digest = hashlib.sha256(fh.read()).hexdigest()[:16]
    commit = check_settings(
        out,
        {"dataset": "scannet", "label_table_sha256": table_digest},
        overwrite=overwrite,
        scenes=scenes,
    )
    jobs = [
        Job(
            s,
            os.path.join(out, f"{s}.npz"),
            _scene_job,
            (root, s, table, True if s in test_set else None),
        )
        for s in scenes
    ]
    summary = run_jobs(
        jobs, workers=workers, overwrite=overwrite, desc="ScanNet scenes", progress=progress
    )
    commit(summary)
    extra = {}
    lists, failed = {}, {}
    for name, listed in splits.items():  # every prepared scene in O, not just this run's
        lists[name] = [s for s in listed if os.path.isfile(os.path.join(out, f"{s}.npz"))]
        failed[name] = [s for s in listed if s in summary.failed and s not in lists[name]]
        extra[f"split_{name}"] = len(lists[name])
        absent = len(listed) - len(lists[name]) - len(failed[name])
        if absent:
            note(f"{absent} scenes of scannetv2_{name}.txt are not prepared (absent)")
    extra.update(write_split_lists(out, lists, failed, note))
    summary.warnings.update(notes)
    write_report(os.path.join(out, "prepare_report.json"), summary, extra)
    return summary

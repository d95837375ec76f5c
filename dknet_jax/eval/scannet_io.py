"""ScanNet benchmark file formats: GT id files, prediction lists and mask files.

Place in the data flow: predictions of any method on disk -> ``evaluate_dirs`` (read with
clear errors) -> ``ScanNetInstanceEvaluator`` -> results; and the other way, model outputs
-> ``write_prediction`` / ``write_gt_ids`` -> files the official script can read.

Formats (ScanNet benchmark):
- GT ``<gt_dir>/<scene>.txt``: one integer per mesh vertex, ``nyu40_id * 1000 + instance``.
- Prediction ``<pred_dir>/<scene>.txt``: one line per instance,
  ``<relative/path/to/mask.txt> <nyu40 label id> <confidence>``; the path is relative to
  ``pred_dir`` and must stay inside it; each mask file has one integer per vertex (0/1;
  any non-zero value counts as set, as in the official script).

Reading follows the official script where it defines behaviour: a mask path listed twice
in one file counts once (first position, last line's label and score), predictions whose
label id is not one of the 18 instance classes' nyu40 ids (wall, 0, 41, -1, ...) are
skipped without reading their mask or using their confidence (one warning per run counts
them), GT scenes without a prediction file are skipped (with a warning). Stricter than the
script, with a clear message instead: NaN scores of instance-class predictions (the
script's ranking of NaN is ill-defined; +-inf are accepted and ranked as it does) and one
mask file shared by two scenes are errors.
"""

from __future__ import annotations

import math
import os
import re
import warnings

import numpy as np

from dknet_jax import io_atomic
from dknet_jax.eval.scannet_instance import CLASS_IDS, ScanNetInstanceEvaluator

RESULT_FILE_NAME = "semantic_instance_evaluation.txt"  # the script's own output, not a scene
DEFAULT_MASK_DIR = "predicted_masks"


class BenchmarkFormatError(ValueError):
    """A benchmark file is missing or malformed; the message names the file and the fix."""


def read_ids(path: str) -> np.ndarray:
    """i64[N] integers of a GT file (one per line)."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is dropped
            lines = f.read().splitlines()
    except OSError as e:
        raise BenchmarkFormatError(f"cannot read GT file {path}: {e}") from e
    if not lines:
        raise BenchmarkFormatError(
            f"GT file {path} is empty; it needs one integer (nyu40_id*1000+instance) per "
            f"vertex of the scene's *_vh_clean_2.ply mesh"
        )
    try:
        return np.array([int(x) for x in lines], dtype=np.int64)
    except ValueError as e:
        raise BenchmarkFormatError(
            f"GT file {path} must hold one integer (nyu40_id*1000+instance) per line: {e}"
        ) from e


def write_gt_ids(path: str, gt_ids) -> None:
    """Writes i64[N] ``nyu40 * 1000 + instance`` ids, one per line."""
    gt_ids = np.asarray(gt_ids, dtype=np.int64).reshape(-1)
    with open(path, "w") as f:
        f.write("".join(f"{int(v)}\n" for v in gt_ids))


def read_mask(path: str, num_vertices: int) -> np.ndarray:
    """bool[N] mask from a 0/1-per-line file; N must equal the mesh's vertex count."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BenchmarkFormatError(f"cannot read mask file {path}: {e}") from e
    b = np.frombuffer(data, dtype=np.uint8)
    n = num_vertices
    # fast path: exactly "d\n" * N (last newline optional), d in {0, 1}
    if b.size in (2 * n, 2 * n - 1) and n > 0:
        digits, newlines = b[0::2], b[1::2]
        if np.all(newlines == 10) and np.all((digits >= 48) & (digits <= 57)):
            return digits != 48
    lines = data.decode("utf-8-sig", errors="replace").splitlines()
    if len(lines) != n:
        raise BenchmarkFormatError(
            f"wrong number of lines in mask file {path}: {len(lines)} vs {n} mesh vertices "
            f"in the GT file; masks need one 0/1 per vertex of the *_vh_clean_2.ply mesh"
        )
    try:
        vals = np.array([int(x) for x in lines], dtype=np.int64)
    except ValueError as e:
        raise BenchmarkFormatError(
            f"mask file {path} must hold one integer (0/1) per line: {e}"
        ) from e
    return vals != 0  # as the official script: any non-zero value is set


def read_prediction_list(pred_file: str, pred_root: str) -> list[tuple[str, int, float]]:
    """Parses ``<scene>.txt``: [(absolute mask path, nyu40 label id, confidence)] in file
    order, duplicates of a mask path merged as the official script does."""
    root = os.path.abspath(pred_root)
    entries: dict[str, tuple[int, float]] = {}
    with open(pred_file, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is dropped
        lines = f.read().splitlines()
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split()
        where = f"{pred_file} line {no}"
        if line.lstrip().startswith("#"):
            raise BenchmarkFormatError(
                f"{where}: comment line {line!r}; the format has no comments (the official "
                f"script stops on this line too): delete it"
            )
        if len(parts) != 3:
            raise BenchmarkFormatError(
                f"{where}: expected '<relative mask path> <nyu40 label id> <confidence>', "
                f"got {line!r}"
            )
        rel, label_s, conf_s = parts
        if os.path.isabs(rel):
            raise BenchmarkFormatError(f"{where}: mask path {rel} must be relative to {root}")
        path = os.path.abspath(os.path.join(os.path.dirname(pred_file), rel))
        if os.path.commonpath([path, root]) != root:
            raise BenchmarkFormatError(f"{where}: mask {path} points outside {root}")
        try:
            label = int(float(label_s))
            conf = float(conf_s)
        except ValueError as e:
            raise BenchmarkFormatError(f"{where}: label id / confidence not numbers: {e}") from e
        if label in CLASS_IDS and math.isnan(conf):  # +-inf rank fine (np.argsort)
            raise BenchmarkFormatError(
                f"{where}: confidence {conf_s} is NaN; the official script's ranking of a NaN "
                f"is ill-defined (Python max/min against it depend on argument order, "
                f"np.unique's NaN handling on the numpy version): give a number (+-inf work)"
            )
        if path in entries:
            warnings.warn(
                f"{where}: mask {rel} listed twice; the later line wins (as the official script)",
                stacklevel=2,
            )
        entries[path] = (label, conf)
    return [(p, lab, c) for p, (lab, c) in entries.items()]


def _skip_note(skipped: list[tuple[str, int]]) -> str:
    """The warning text for predictions skipped because of their label id."""
    ids = sorted({lab for _, lab in skipped})
    files = sorted({f for f, _ in skipped})
    return (
        f"{len(skipped)} prediction line(s) skipped because their label id is not an "
        f"instance class (label ids {', '.join(map(str, ids[:10]))}"
        f"{', ...' if len(ids) > 10 else ''}; in {len(files)} file(s), e.g. {files[0]}), "
        f"as the official script does; the instance classes' nyu40 ids are "
        f"{CLASS_IDS.tolist()}"
    )


def read_prediction(pred_file: str, pred_root: str, num_vertices: int, skipped: list | None = None):
    """Reads one scene's predictions.

    Returns (masks bool[K, N], label_ids i64[K], scores f64[K], paths list[str]) for the
    predictions of the 18 instance classes; the others are skipped unread, like the script.
    ``skipped``: a list that receives (file, label id) per skipped prediction; without it
    a warning counts them.
    """
    entries = []
    dropped = []
    for e in read_prediction_list(pred_file, pred_root):
        if e[1] in CLASS_IDS:
            entries.append(e)
        else:
            dropped.append((pred_file, e[1]))
    if skipped is not None:
        skipped.extend(dropped)
    elif dropped:
        warnings.warn(_skip_note(dropped), stacklevel=2)
    masks = np.zeros((len(entries), num_vertices), dtype=bool)
    for i, (path, _, _) in enumerate(entries):
        masks[i] = read_mask(path, num_vertices)
    labels = np.array([e[1] for e in entries], dtype=np.int64)
    scores = np.array([e[2] for e in entries], dtype=np.float64)
    return masks, labels, scores, [e[0] for e in entries]


def write_prediction(
    pred_dir: str, scene: str, masks, label_ids, scores, mask_dir: str = DEFAULT_MASK_DIR
) -> str:
    """Writes ``<pred_dir>/<scene>.txt`` and its masks under ``<pred_dir>/<mask_dir>/``,
    each through a temp file + rename (the list last); first removes this scene's mask
    files (``<scene>_NNN.txt``) of an earlier run so the folder never mixes runs.

    Args: masks bool[K, N]; label_ids int[K] nyu40 ids; scores float[K] (written at full
    precision so ties are not created). Returns the path of the scene file.
    """
    masks = np.asarray(masks) != 0
    label_ids = np.asarray(label_ids).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if masks.ndim != 2 or label_ids.shape[0] != masks.shape[0] or scores.shape[0] != masks.shape[0]:
        raise ValueError(
            f"need masks [K, N] with K labels and K scores, got {masks.shape}, "
            f"{label_ids.shape}, {scores.shape}"
        )
    for what, value in (("scene", scene), ("mask_dir", mask_dir)):
        if not value or any(c.isspace() for c in value):
            raise ValueError(
                f"{what} {value!r} would write an unparsable prediction line "
                f"(the benchmark splits lines on spaces); use a name without "
                f"whitespace, e.g. the scene id"
            )
    folder = os.path.join(pred_dir, mask_dir)
    os.makedirs(folder, exist_ok=True)
    # masks of an earlier run of this scene (e.g. _007 when this run has 3) would mix runs
    own = re.compile(re.escape(scene) + r"_\d{3,}\.txt")
    for f in os.listdir(folder):
        if own.fullmatch(f) and os.path.isfile(os.path.join(folder, f)):
            os.remove(os.path.join(folder, f))
    lines = []
    for k in range(masks.shape[0]):  # each file via a temp file + rename, list last
        rel = f"{mask_dir}/{scene}_{k:03d}.txt"
        buf = np.full(2 * masks.shape[1], 10, dtype=np.uint8)
        buf[0::2] = 48 + masks[k].astype(np.uint8)
        data = buf.tobytes()
        io_atomic.write_atomic(os.path.join(pred_dir, rel), lambda fh, d=data: fh.write(d), "wb")
        lines.append(f"{rel} {int(label_ids[k])} {float(scores[k])!r}\n")
    out = os.path.join(pred_dir, f"{scene}.txt")
    text = "".join(lines)
    io_atomic.write_atomic(out, lambda fh: fh.write(text), "w")
    return out


def _txt_files(d: str) -> list[str]:
    return sorted(
        f for f in os.listdir(d) if f.endswith(".txt") and os.path.isfile(os.path.join(d, f))
    )


def load_dirs(
    gt_dir: str, pred_dir: str, progress: bool = True
) -> tuple[ScanNetInstanceEvaluator, list[str]]:
    """Reads a GT folder and a prediction folder into an evaluator.

    Returns (evaluator with one scene per prediction file, GT scenes skipped because they
    have no prediction file; a warning names them, as the official script skips them).
    """
    for what, d in (("GT", gt_dir), ("prediction", pred_dir)):
        if not os.path.isdir(d):
            raise BenchmarkFormatError(f"{what} folder {d} does not exist")
    gt_scenes = _txt_files(gt_dir)
    pred_files = [f for f in _txt_files(pred_dir) if f != RESULT_FILE_NAME]
    if not pred_files:
        raise BenchmarkFormatError(
            f"no prediction files (<scene>.txt) in {pred_dir}; masks go in a subfolder"
        )
    orphans = sorted(set(pred_files) - set(gt_scenes))
    if orphans:
        raise BenchmarkFormatError(
            f"prediction files without a GT file in {gt_dir}: {orphans[:5]} "
            f"({len(orphans)} in all); names must match the GT files"
        )
    skipped = sorted(set(gt_scenes) - set(pred_files))
    if skipped:
        warnings.warn(
            f"{len(skipped)} GT scene(s) have no prediction file and are skipped "
            f"(not counted as misses), as the official script does: "
            f"{[s[:-4] for s in skipped[:5]]}",
            stacklevel=2,
        )
    ev = ScanNetInstanceEvaluator()
    owner: dict[str, str] = {}
    dropped: list[tuple[str, int]] = []
    it = pred_files
    if progress:
        from tqdm import tqdm

        it = tqdm(pred_files, desc="scenes", unit="scene")
    for name in it:
        try:
            gt_ids = read_ids(os.path.join(gt_dir, name))
        except UnicodeDecodeError as e:
            raise BenchmarkFormatError(
                f"GT file {os.path.join(gt_dir, name)} is not a text "
                f"file ({e.reason} at byte {e.start})"
            ) from e
        try:
            masks, labels, scores, paths = read_prediction(
                os.path.join(pred_dir, name), pred_dir, gt_ids.shape[0], skipped=dropped
            )
        except UnicodeDecodeError as e:
            raise BenchmarkFormatError(
                f"prediction list {os.path.join(pred_dir, name)} or one of its mask files is "
                f"not a text file ({e.reason} at byte {e.start}); the list holds "
                f"'<mask path> <label id> <confidence>' lines"
            ) from e
        for p in paths:
            if owner.setdefault(p, name) != name:
                raise BenchmarkFormatError(
                    f"mask file {p} is listed by {owner[p]} and {name}; every prediction "
                    f"needs its own mask file"
                )
        ev.add_scene(gt_ids, masks, labels, scores)
    if dropped:
        warnings.warn(_skip_note(dropped), stacklevel=2)
    return ev, [s[:-4] for s in skipped]


def evaluate_dirs(gt_dir: str, pred_dir: str, progress: bool = True) -> tuple[dict, list[str]]:
    """ScanNet instance AP of a prediction folder against a GT folder.

    Returns (results as ``ScanNetInstanceEvaluator.compute``, skipped GT scenes).
    """
    ev, skipped = load_dirs(gt_dir, pred_dir, progress)
    note = ev.undefined_note()
    if note:
        warnings.warn(note, stacklevel=2)
    return ev.compute(), skipped

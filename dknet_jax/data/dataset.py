"""Loading prepared scenes (``<scene>.npz`` from ``prepare_scannet.py`` /
``prepare_s3dis.py``) with validation.

Data flow: prepared npz -> **dataset** (``load_scene`` -> sample dict) -> ``transforms``
-> ``batching`` -> ``pipeline``.

The npz contract (docs/contracts.md section 3): ``xyz`` f32[N, 3] raw coordinates, ``rgb`` u8[N, 3],
``semantic`` i32[N] (0..S-1 or -100), ``instance`` i32[N] (0..K-1 or -100),
``superpoint`` i32[N] (>= 0). Anything else is a :class:`SceneError` naming the file and
saying what is wrong, instead of a failure deep inside the model.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence

import numpy as np

from dknet_jax.types import IGNORE_LABEL

SCENE_SPEC = {  # key -> (dtype, trailing shape)
    "xyz": (np.float32, (3,)),
    "rgb": (np.uint8, (3,)),
    "semantic": (np.int32, ()),
    "instance": (np.int32, ()),
    "superpoint": (np.int32, ()),
}
LABEL_KEYS = ("semantic", "instance")


class SceneError(ValueError):
    """A prepared scene file is missing, unreadable or breaks the npz contract."""


def scene_name(path: str | os.PathLike) -> str:
    """``/a/b/scene0000_00.npz`` -> ``scene0000_00``."""
    base = os.path.basename(os.fspath(path))
    return base[:-4] if base.endswith(".npz") else base


def load_scene(
    path: str | os.PathLike, *, num_classes: int | None = None, require_labels: bool = True
) -> dict:
    """Read and validate one prepared scene.

    Args:
      path: a ``.npz`` file.
      num_classes: S; when given, semantic labels must be in 0..S-1 or -100.
      require_labels: when False, missing ``semantic``/``instance`` (unlabelled test
        scenes) become all -100 instead of an error.
    Returns:
      sample dict: ``xyz`` f32[N, 3], ``rgb`` u8[N, 3], ``semantic``/``instance``/
      ``superpoint`` i32[N], ``name`` str.
    Raises:
      SceneError naming the file: missing/unreadable file, missing key, wrong dtype or
      shape, mismatched N, empty scene, NaN/inf coordinates, labels out of range.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise SceneError(f"{path}: no such scene file (run scripts/prepare_*.py first?)")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:  # zip / npy parse errors of all kinds
        raise SceneError(f"{path}: cannot read as .npz ({type(e).__name__}: {e})") from e
    sample = {}
    n = None
    for key, (dtype, trailing) in SCENE_SPEC.items():
        if key not in arrays:
            if key in LABEL_KEYS and not require_labels:
                continue
            raise SceneError(
                f"{path}: missing key {key!r} (has {sorted(arrays)}); a prepared scene "
                f"needs {list(SCENE_SPEC)}"
            )
        a = arrays[key]
        if a.dtype != dtype:
            raise SceneError(
                f"{path}: {key!r} has dtype {a.dtype}, expected {np.dtype(dtype)} "
                f"(cast it with .astype(np.{np.dtype(dtype).name}) when writing)"
            )
        if a.ndim != 1 + len(trailing) or a.shape[1:] != trailing:
            want = "[N, 3]" if trailing else "[N]"
            raise SceneError(f"{path}: {key!r} has shape {a.shape}, expected {want}")
        if n is None:
            n = a.shape[0]
        elif a.shape[0] != n:
            raise SceneError(
                f"{path}: {key!r} has {a.shape[0]} rows but 'xyz' has {n}; every array "
                f"needs one row per point"
            )
        sample[key] = a
    if n == 0:
        raise SceneError(f"{path}: empty scene (0 points)")
    if not np.isfinite(sample["xyz"]).all():
        bad = int((~np.isfinite(sample["xyz"]).all(axis=1)).sum())
        raise SceneError(f"{path}: 'xyz' has {bad} rows with NaN/inf coordinates")
    for key in LABEL_KEYS:
        if key not in sample:
            sample[key] = np.full(n, IGNORE_LABEL, dtype=np.int32)
    sem, inst, sp = sample["semantic"], sample["instance"], sample["superpoint"]
    bad_sem = (sem != IGNORE_LABEL) & (sem < 0)
    if num_classes is not None:
        bad_sem |= sem >= num_classes
    if bad_sem.any():
        rng = f"0..{num_classes - 1}" if num_classes is not None else ">= 0"
        raise SceneError(
            f"{path}: 'semantic' has values {np.unique(sem[bad_sem])[:5].tolist()} outside "
            f"{rng} and -100"
        )
    bad_inst = (inst < 0) & (inst != IGNORE_LABEL)
    if bad_inst.any():
        raise SceneError(
            f"{path}: 'instance' has negative values {np.unique(inst[bad_inst])[:5].tolist()}"
            f" other than -100"
        )
    if (sp < 0).any():
        raise SceneError(f"{path}: 'superpoint' has negative ids; every point needs one")
    sample["name"] = scene_name(path)
    return sample


def scene_num_points(path: str | os.PathLike) -> int:
    """N of a prepared scene, read from the ``xyz`` array header only (no decompression
    of the data), for planning batches."""
    path = os.fspath(path)
    try:
        with zipfile.ZipFile(path) as z, z.open("xyz.npy") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, _ = np.lib.format.read_array_header_1_0(f)
            else:
                shape, _, _ = np.lib.format.read_array_header_2_0(f)
    except FileNotFoundError as e:
        raise SceneError(f"{path}: no such scene file") from e
    except KeyError as e:
        raise SceneError(f"{path}: missing key 'xyz'") from e
    except Exception as e:
        raise SceneError(f"{path}: cannot read as .npz ({type(e).__name__}: {e})") from e
    if len(shape) != 2 or shape[1] != 3:
        raise SceneError(f"{path}: 'xyz' has shape {shape}, expected [N, 3]")
    return int(shape[0])


def list_scenes(
    root: str | os.PathLike, split: str | None = None, names: Sequence[str] | None = None
) -> list[str]:
    """Paths of the prepared scenes of a split, sorted by name.

    Resolution: explicit ``names`` -> ``root/<name>.npz``; else if ``root/<split>`` is a
    folder, all its ``*.npz``; else if a split list ``root/<split>.txt`` (or
    ``scannetv2_<split>.txt``) exists, the scenes it names; else (``split`` None) all
    ``root/*.npz``. A named scene that has no file is an error naming it.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        state = "is a file" if os.path.exists(root) else "does not exist"
        raise SceneError(
            f"{root}: prepared-scene folder {state} (prepare the data "
            f"with scripts/prepare_*.py or set config.data.root)"
        )
    if names is None and split is not None:
        folder = os.path.join(root, split)
        if os.path.isdir(folder):
            return list_scenes(folder)
        for cand in (f"{split}.txt", f"scannetv2_{split}.txt"):
            lst = os.path.join(root, cand)
            if os.path.isfile(lst):
                try:  # utf-8-sig: a BOM is not part of the first scene name
                    with open(lst, encoding="utf-8-sig") as fh:
                        names = [ln.strip() for ln in fh if ln.strip()]
                except UnicodeDecodeError as e:
                    raise SceneError(
                        f"{lst}: split list is not a text file ({e.reason} at "
                        f"byte {e.start}); one scene name per line"
                    ) from e
                break
        else:
            raise SceneError(
                f"{root}: split {split!r} not found (expected folder {folder}/ or a list "
                f"{split}.txt of scene names)"
            )
    if names is None:
        paths = sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith(".npz"))
        if not paths:
            raise SceneError(f"{root}: no .npz scenes found")
        return paths
    paths = [os.path.join(root, scene_name(n) + ".npz") for n in sorted(names)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise SceneError(
            f"{len(missing)} scene(s) listed for {root} have no file, e.g. {missing[:3]}"
        )
    return paths

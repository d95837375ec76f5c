"""PLY helpers on top of `plyfile`: read vertices/faces, write meshes and point clouds.

Place in the data flow: raw files (ScanNet `*_vh_clean_2.ply` / `.labels.ply`, users'
scans) -> **ply** -> `scannet.py` preparation and `readers.read_scan`. Binary
(little/big-endian) and ASCII PLY are both handled by `plyfile`.
"""

from __future__ import annotations

import os

import numpy as np
import plyfile

__all__ = ["PlyContents", "read_ply", "write_ply"]


class PlyContents:
    """What `read_ply` returns.

    Attributes:
      path: the file read.
      vertex: dict property name -> array[V] (the vertex element's properties, in order).
      faces: i32[F, 3] triangles (polygons fan-triangulated), or None without faces.
      comments: header comments.
    """

    def __init__(
        self,
        path: str,
        vertex: dict[str, np.ndarray],
        faces: np.ndarray | None,
        comments: list[str],
    ):
        self.path = path
        self.vertex = vertex
        self.faces = faces
        self.comments = comments

    @property
    def num_vertices(self) -> int:
        return len(next(iter(self.vertex.values()))) if self.vertex else 0


def _read(path: str, known: dict) -> plyfile.PlyData:
    # Memory-mapping with a known list length skips plyfile's row-by-row parse of binary
    # triangle meshes (docs/benchmarks.md, "Data preparation"); plyfile checks every list
    # length and raises on a polygon, and we fall back.
    return plyfile.PlyData.read(path, mmap="c" if known else False, known_list_len=known)


def _faces_from(path: str, face_el) -> np.ndarray:
    names = face_el.data.dtype.names or ()
    key = next((k for k in ("vertex_indices", "vertex_index") if k in names), None)
    if key is None:
        raise ValueError(
            f"{path}: the face element has no 'vertex_indices' list (properties: {list(names)})"
        )
    col = face_el.data[key]
    if col.dtype != object and col.ndim == 2:
        polys = col
    else:
        lens = np.fromiter((len(p) for p in col), np.int64, len(col))
        if len(col) and np.all(lens == 3):
            polys = np.stack(list(col)) if len(col) else np.zeros((0, 3), np.int64)
        else:
            if np.any(lens < 3):
                raise ValueError(f"{path}: a face has fewer than 3 vertices")
            tris = []
            for p in col:  # fan triangulation of polygons
                p = np.asarray(p)
                tris.append(np.stack([np.repeat(p[0], len(p) - 2), p[1:-1], p[2:]], 1))
            polys = np.concatenate(tris) if tris else np.zeros((0, 3), np.int64)
    polys = np.array(polys)  # copy out of a memory map
    if polys.ndim != 2 or polys.shape[1] != 3:
        polys = polys.reshape(-1, 3)
    return polys.astype(np.int32)


def read_ply(path: str | os.PathLike) -> PlyContents:
    """Read a PLY file's vertex properties and faces.

    Raises:
      FileNotFoundError: the file does not exist (message names it).
      ValueError: the file is not a readable PLY or has no vertex element (names it).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"PLY file not found: {path}")
    try:
        try:  # fast path: triangle meshes (ScanNet) read in one block
            ply = _read(path, {"face": {"vertex_indices": 3}})
        except Exception:
            ply = _read(path, {})
    except Exception as e:  # plyfile raises several types on corrupt headers/bodies
        raise ValueError(f"{path}: not a readable PLY file ({type(e).__name__}: {e})") from e
    names = [el.name for el in ply.elements]
    if "vertex" not in names:
        raise ValueError(f"{path}: PLY has no 'vertex' element (elements: {names})")
    vdata = ply["vertex"].data
    vertex = {name: np.array(vdata[name]) for name in vdata.dtype.names}  # copies
    faces = None
    if "face" in names:
        faces = _faces_from(path, ply["face"])
        if faces.size and (faces.min() < 0 or faces.max() >= len(vdata)):
            raise ValueError(f"{path}: face indices outside [0, {len(vdata)})")
    return PlyContents(path, vertex, faces, list(ply.comments))


def write_ply(
    path: str | os.PathLike,
    vertex: dict[str, np.ndarray],
    faces: np.ndarray | None = None,
    binary: bool = True,
    comments: tuple[str, ...] = (),
) -> None:
    """Write a PLY file.

    Args:
      path: output file, or a binary file object open for writing.
      vertex: dict property name -> array[V]; dtypes are kept (e.g. f4 x/y/z, u1 red/
        green/blue/alpha as in ScanNet, u2 label for `*.labels.ply`).
      faces: optional int[F, 3]; written as ``list uchar int vertex_indices``.
      binary: binary little-endian (True) or ASCII (False).

    The binary file is byte for byte what ``plyfile`` writes; only the triangle list is
    written in one block (plyfile writes list properties row by row, which is slow on a
    ScanNet-sized mesh: docs/benchmarks.md, "Data preparation").
    """
    cols = {k: np.asarray(v) for k, v in vertex.items()}
    num = len(next(iter(cols.values())))
    arr = np.empty(num, dtype=[(k, v.dtype.str) for k, v in cols.items()])
    for k, v in cols.items():
        arr[k] = v
    elements = [plyfile.PlyElement.describe(arr, "vertex")]
    f = None
    if faces is not None:
        f = np.asarray(faces, dtype=np.int32).reshape(-1, 3)
        farr = np.empty(len(f), dtype=[("vertex_indices", "i4", (3,))])
        farr["vertex_indices"] = f
        elements.append(
            plyfile.PlyElement.describe(
                farr, "face", len_types={"vertex_indices": "u1"}, val_types={"vertex_indices": "i4"}
            )
        )
    ply = plyfile.PlyData(elements, text=not binary, byte_order="<", comments=list(comments))
    if not binary:
        ply.write(path if hasattr(path, "write") else os.fspath(path))
        return

    def write(fh) -> None:
        fh.write(ply.header.encode("ascii") + b"\n")
        fh.write(arr.astype(elements[0].dtype("<"), copy=False).tobytes())
        if f is not None:  # a triangle row is (uchar 3, int a, int b, int c)
            rows = np.empty(len(f), [("n", "u1"), ("i", "<i4", (3,))])
            rows["n"], rows["i"] = 3, f
            fh.write(rows.tobytes())

    if hasattr(path, "write"):
        write(path)
    else:
        with open(os.fspath(path), "wb") as fh:
            write(fh)

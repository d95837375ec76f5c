"""Readers for point clouds: users' own scans and robust numeric text rows.

Place in the data flow: a file on disk -> **readers** -> arrays for `predict.py`
(`read_scan`) and the S3DIS preparation (`read_rows`). Prepared npz scenes are loaded by
`dataset.load_scene`.

Bad input never becomes a stack trace from deep inside numpy: whole-file problems
(missing file, empty cloud, NaN/inf coordinates, missing columns) raise `ValueError` /
`FileNotFoundError` naming the file; a malformed text row is skipped with a `DataWarning`
naming the file and line.

Map coordinates: a scan in georeferenced coordinates (double-precision PLY / npz / text
with offsets like 5e5 / 4e6 m) would lose its precision in float32 (0.25 m steps at 4e6 m).
`read_scan` therefore reads coordinates as they are stored (float64 stays float64), and
when any coordinate lies beyond ``ORIGIN_BEYOND_M`` (1 km; float32 steps there are over
0.1 mm) subtracts a per-scan origin in float64 -- the whole-metre floor of the bounding-box
minimum -- before casting to float32; ``xyz + origin`` gives the file's coordinates back,
and ``xyz_input`` keeps them exactly as read. Ordinary room scans keep origin 0. A scan
whose extent is implausible for a room (more than ``ROOM_EXTENT_M`` = 100 m in x or y, or
20 m in z: wrong units such as millimetres, or a whole site) is read with a `DataWarning`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import numpy as np

from dknet_jax.data.ply import read_ply

__all__ = [
    "ORIGIN_BEYOND_M",
    "ROOM_EXTENT_M",
    "DataWarning",
    "Rows",
    "read_rows",
    "read_scan",
    "scan_origin",
    "warn_data",
]

# coordinates beyond this magnitude (m) are shifted by a per-scan origin before float32
ORIGIN_BEYOND_M = 1000.0
# largest plausible extent (m) of one room scan in x, y, z; larger ones get a warning
ROOM_EXTENT_M = (100.0, 100.0, 20.0)

GREY = 128
# bytes a numeric text row may hold; anything else (NUL, control bytes, letters other
# than exponents) marks the row as malformed
_NUMERIC_BYTES = b"0123456789+-.eE \t\r\n"
_MAX_ROW_WARNINGS = 10  # per file; the rest are counted in one summary warning


class DataWarning(UserWarning):
    """Recoverable problem in input data (a skipped row, an unmapped label, ...)."""


def warn_data(message: str) -> None:
    """Default sink for data warnings: `warnings.warn(message, DataWarning)`."""
    warnings.warn(message, DataWarning, stacklevel=3)


class Rows:
    """What `read_rows` returns.

    Attributes:
      values: f64[N, C] parsed rows.
      lines: i64[N] 1-based line number of each row in the file.
      skipped: number of malformed rows skipped (each reported by a warning).
    """

    def __init__(self, values: np.ndarray, lines: np.ndarray, skipped: int):
        self.values, self.lines, self.skipped = values, lines, skipped


def read_rows(
    path: str | os.PathLike, ncols: int | None = None, *, warn: Callable[[str], None] = warn_data
) -> Rows:
    """Parse a whitespace-separated numeric text file row by row, skipping bad rows.

    A row is malformed (skipped, with a warning naming file and line) when it holds a byte
    that cannot be part of a number (NUL, control bytes, letters), has a column count other
    than ``ncols`` (if None: the count of the first non-empty row), is not numeric
    (``1.2.3``, ``-``) or is not finite. Blank lines are ignored. Unlike `np.loadtxt`
    (raises) and `np.genfromtxt` (silent NaN), nothing is dropped without a warning.

    Returns:
      `Rows` with values f64[N, C].

    Raises:
      FileNotFoundError: no such file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text file not found: {path}")
    with open(path, "rb") as fh:
        data = fh.read()
    has_bad = bool(data.translate(None, _NUMERIC_BYTES))
    if not has_bad:
        fast = _read_clean_rows(data, ncols)
        if fast is not None:
            return fast
    bad: list[tuple[int, str, bytes]] = []
    tokens: list[bytes] = []
    lines: list[int] = []
    expected = ncols
    for no, line in enumerate(data.split(b"\n"), 1):
        if has_bad and line.translate(None, _NUMERIC_BYTES):
            bad.append((no, "non-numeric or control bytes", line))
            continue
        parts = line.split()
        if not parts:
            continue
        if expected is None:
            expected = len(parts)
        if len(parts) != expected:
            bad.append((no, f"{len(parts)} columns, expected {expected}", line))
            continue
        tokens.extend(parts)
        lines.append(no)
    ncol = expected or 0
    try:
        values = np.array(tokens, dtype=bytes).astype(np.float64).reshape(-1, ncol)
        keep = np.ones(len(lines), bool)
    except ValueError:  # a token made of numeric bytes that is not a number: row by row
        values = np.zeros((len(lines), ncol))
        keep = np.ones(len(lines), bool)
        for r in range(len(lines)):
            try:
                values[r] = [float(t) for t in tokens[r * ncol : (r + 1) * ncol]]
            except ValueError:
                keep[r] = False
                bad.append((lines[r], "not a number", b" ".join(tokens[r * ncol : (r + 1) * ncol])))
    finite = np.all(np.isfinite(values), axis=1)
    for r in np.nonzero(keep & ~finite)[0]:
        bad.append((lines[r], "not finite", b" ".join(tokens[r * ncol : (r + 1) * ncol])))
    keep &= finite
    bad.sort()
    for no, why, raw in bad[:_MAX_ROW_WARNINGS]:
        warn(f"{path}:{no}: skipped malformed row ({why}): {raw[:80]!r}")
    if len(bad) > _MAX_ROW_WARNINGS:
        warn(
            f"{path}: skipped {len(bad)} malformed rows in all (first "
            f"{_MAX_ROW_WARNINGS} reported above)"
        )
    return Rows(values[keep], np.asarray(lines, np.int64)[keep], len(bad))


def _read_clean_rows(data: bytes, ncols: int | None) -> Rows | None:
    """Vectorised parse of a file made only of numeric bytes; None when any row has the
    wrong column count or a token is not exactly one number (the caller then goes row by
    row)."""
    b = np.frombuffer(data, np.uint8)
    if b.size == 0:
        return Rows(np.zeros((0, ncols or 0)), np.zeros(0, np.int64), 0)
    nl = b == 10
    sep = nl | (b == 32) | (b == 9) | (b == 13)
    start = ~sep
    start[1:] &= sep[:-1]
    line_start = np.r_[0, np.flatnonzero(nl) + 1]
    line_start = line_start[line_start < b.size]
    first_tok = np.searchsorted(np.flatnonzero(start), line_start)
    per_line = np.diff(first_tok, append=int(start.sum()))  # tokens per line
    rows = np.nonzero(per_line)[0]
    if rows.size == 0:
        return Rows(np.zeros((0, ncols or 0)), np.zeros(0, np.int64), 0)
    ncol = int(per_line[rows[0]]) if ncols is None else ncols
    if np.any(per_line[rows] != ncol):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            values = np.fromstring(data, dtype=np.float64, sep=" ")
        except (ValueError, DeprecationWarning):
            return None
    # a malformed token either stops the parse (caught above) or splits into several
    # numbers (``1.2.3`` -> 1.2, .3), which changes the count
    if values.size != rows.size * ncol:
        return None
    values = values.reshape(-1, ncol)
    if not np.all(np.isfinite(values)):
        return None
    return Rows(values, rows.astype(np.int64) + 1, 0)


# ---------------------------------------------------------------------------------------
def _colours(
    path: str, cols: list[np.ndarray] | None, n: int, warn: Callable[[str], None]
) -> np.ndarray:
    if cols is None:
        warn(f"{path}: no colours; using neutral grey ({GREY}, {GREY}, {GREY})")
        return np.full((n, 3), GREY, np.uint8)
    rgb = np.stack([np.asarray(c) for c in cols], axis=1)
    if rgb.dtype == np.uint8:
        return rgb
    rgb = rgb.astype(np.float64)
    if not np.all(np.isfinite(rgb)):
        raise ValueError(f"{path}: colours contain NaN or inf")
    if np.issubdtype(np.asarray(cols[0]).dtype, np.floating) and rgb.size and rgb.max() <= 1.0:
        rgb = rgb * 255.0  # float colours in [0, 1]
    elif np.asarray(cols[0]).dtype == np.uint16 and rgb.size and rgb.max() > 255:
        rgb = rgb / 257.0  # 16-bit colours
    if rgb.size and (rgb.min() < 0 or rgb.max() > 255):
        warn(f"{path}: colours outside [0, 255] clipped")
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _check_xyz(path: str, xyz: np.ndarray) -> np.ndarray:
    xyz = np.asarray(xyz)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise ValueError(f"{path}: coordinates must have shape [N, 3], got {xyz.shape}")
    if xyz.shape[0] == 0:
        raise ValueError(f"{path}: the point cloud is empty")
    if not np.issubdtype(xyz.dtype, np.number):
        raise ValueError(f"{path}: coordinates are not numeric ({xyz.dtype})")
    bad = ~np.all(np.isfinite(xyz), axis=1)
    if bad.any():
        raise ValueError(
            f"{path}: {int(bad.sum())} points have NaN or inf coordinates "
            f"(first at row {int(np.argmax(bad))}); remove them first"
        )
    # as stored: float64 stays float64 (map coordinates), float32 stays float32
    return xyz if xyz.dtype in (np.float32, np.float64) else xyz.astype(np.float64)


def scan_origin(xyz: np.ndarray) -> np.ndarray:
    """f64[3] origin subtracted before the float32 cast: the whole-metre floor of the
    bounding-box minimum when any coordinate's magnitude exceeds ``ORIGIN_BEYOND_M``
    (georeferenced scans), else 0 (float32 is already fine to well below 1 mm)."""
    xyz = np.asarray(xyz, np.float64)
    if not len(xyz) or np.abs(xyz).max() <= ORIGIN_BEYOND_M:
        return np.zeros(3)
    return np.floor(xyz.min(axis=0))


def _check_extent(path: str, xyz: np.ndarray, warn: Callable[[str], None]) -> None:
    size = np.ptp(xyz, axis=0)
    if np.any(size > np.asarray(ROOM_EXTENT_M)):
        warn(
            f"{path}: the scan spans {size[0]:.1f} x {size[1]:.1f} x {size[2]:.1f} m, more "
            f"than a room (x/y up to {ROOM_EXTENT_M[0]:g} m, z up to {ROOM_EXTENT_M[2]:g} m)"
            f"; the model expects one room in metres with z up: check the units (mm/cm?) "
            f"or crop the scan"
        )


def _read_ply_scan(path: str, warn) -> dict:
    ply = read_ply(path)
    v = ply.vertex
    missing = [c for c in "xyz" if c not in v]
    if missing:
        raise ValueError(
            f"{path}: PLY vertices lack coordinate properties {missing} (has {list(v)})"
        )
    xyz = np.stack([v["x"], v["y"], v["z"]], axis=1)
    cols = None
    for names in (
        ("red", "green", "blue"),
        ("r", "g", "b"),
        ("diffuse_red", "diffuse_green", "diffuse_blue"),
    ):
        if all(n in v for n in names):
            cols = [v[n] for n in names]
            break
    return {"xyz": xyz, "cols": cols, "faces": ply.faces}


def _read_npz_scan(path: str, warn) -> dict:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:
        raise ValueError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from e
    if "xyz" not in arrays:
        raise ValueError(f"{path}: .npz needs an 'xyz' array [N, 3] (has {sorted(arrays)})")
    xyz = arrays["xyz"]
    cols = None
    if "rgb" in arrays:
        rgb = np.asarray(arrays["rgb"])
        if rgb.ndim != 2 or rgb.shape != (len(xyz), 3):
            raise ValueError(f"{path}: 'rgb' must have shape [{len(xyz)}, 3], got {rgb.shape}")
        cols = [rgb[:, 0], rgb[:, 1], rgb[:, 2]]
    faces = arrays.get("faces")
    return {"xyz": xyz, "cols": cols, "faces": faces}


def _read_txt_scan(path: str, warn) -> dict:
    rows = read_rows(path, warn=warn)
    ncol = rows.values.shape[1] if rows.values.size else 0
    if rows.values.shape[0] == 0:
        raise ValueError(f"{path}: the point cloud is empty (no numeric rows)")
    if ncol not in (3, 6) and ncol < 6:
        raise ValueError(f"{path}: rows have {ncol} columns; expected x y z (3) or x y z r g b (6)")
    if ncol > 6:
        warn(f"{path}: rows have {ncol} columns; using the first 6 as x y z r g b")
    vals = rows.values
    cols = None if ncol == 3 else [vals[:, 3], vals[:, 4], vals[:, 5]]
    return {"xyz": vals[:, :3], "cols": cols, "faces": None}


_READERS = {
    ".ply": _read_ply_scan,
    ".npz": _read_npz_scan,
    ".txt": _read_txt_scan,
    ".xyz": _read_txt_scan,
}


def read_scan(path: str | os.PathLike, *, warn: Callable[[str], None] = warn_data) -> dict:
    """Read a user's scan: PLY (binary or ASCII, with or without colour, normals, faces),
    ``.npz`` (``xyz`` + optional ``rgb``/``faces``) or ``.txt`` rows ``x y z [r g b]``.

    Returns:
      dict ``xyz`` f32[N, 3] coordinates relative to ``origin`` f64[3] (`scan_origin`:
      0 unless the scan is in map coordinates beyond 1 km), ``xyz_input`` the coordinates
      exactly as read (f64 when the file stores doubles or text, else f32), ``rgb``
      u8[N, 3] (neutral grey 128 with a warning when the file has no colours; float colours
      in [0, 1] are scaled to 0..255), ``faces`` i32[F, 3] or None. A scan larger than a
      room (`ROOM_EXTENT_M`) is read with a warning.

    Raises:
      FileNotFoundError: no such file. ValueError: unsupported extension, unreadable file,
      missing coordinate columns, empty cloud, NaN/inf coordinates, bad face indices.
    """
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in _READERS:
        raise ValueError(f"{path}: unsupported scan format {ext!r}; use one of {sorted(_READERS)}")
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder; pass a scan file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"scan file not found: {path}")
    raw = _READERS[ext](path, warn)
    xyz_input = _check_xyz(path, raw["xyz"])
    xyz64 = xyz_input.astype(np.float64)
    origin = scan_origin(xyz64)
    xyz = (xyz64 - origin).astype(np.float32)  # the float32 cast after the shift
    _check_extent(path, xyz64, warn)
    rgb = _colours(path, raw["cols"], len(xyz), warn)
    faces = raw["faces"]
    if faces is not None:
        faces = np.asarray(faces)
        if faces.ndim != 2 or faces.shape[1] != 3 or not np.issubdtype(faces.dtype, np.integer):
            raise ValueError(
                f"{path}: faces must be int [F, 3], got {faces.dtype}{list(faces.shape)}"
            )
        if faces.size and (faces.min() < 0 or faces.max() >= len(xyz)):
            raise ValueError(f"{path}: face indices outside [0, {len(xyz)})")
        faces = faces.astype(np.int32)
    return {"xyz": xyz, "rgb": rgb, "faces": faces, "origin": origin, "xyz_input": xyz_input}

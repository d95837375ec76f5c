"""Shapes the synthetic rooms are built from, their triangle meshes, and poses.

Every surface in a synthetic room is one of three primitives, given in the local frame of
the object it belongs to:

- `Box`: an axis-aligned box. Faces named in ``skip`` (e.g. ``"-z+y"``) are left open,
  because a scanner never sees them: the underside of a seat, the back of a cabinet that
  stands against a wall.
- `Cylinder`: an upright cylinder (lamp poles and shades, bins, a chair's column) with
  optional caps.
- `Sheet`: a rectangle spanned by two edge vectors from a corner, with rectangular holes
  (doors and windows cut out of a wall) and an optional sine ripple (a curtain's folds).

`tessellate(primitive, spacing)` turns a primitive into a triangle mesh whose edges are
about ``spacing`` metres long and whose triangles face outwards (counter-clockwise seen
from outside), as a reconstructed scan looks at that resolution. The faces of a box share
their rim vertices, so a closed box is one connected piece.

A pose is ``(yaw, tx, ty, tz)``: a turn about the vertical axis, then a shift. It maps a
child frame into its parent (a part into its object, an object into its furniture group,
a group into the room). `compose_poses`, `to_parent` and `to_local` are all the pose
arithmetic the generator needs; nothing ever tilts.
"""

from __future__ import annotations

import dataclasses

import numpy as np

Vec = tuple[float, float, float]
Pose = tuple[float, float, float, float]  # (yaw, tx, ty, tz): child frame -> parent frame


@dataclasses.dataclass(frozen=True)
class Box:
    """Axis-aligned box from corner ``lo`` to corner ``hi``.

    skip: faces left open, as sign + axis pairs, e.g. ``"-z+y"`` (bottom and front).
    """

    lo: Vec
    hi: Vec
    skip: str = ""


@dataclasses.dataclass(frozen=True)
class Cylinder:
    """Upright cylinder of radius ``r`` around (x, y) from height z0 to z1.

    top, bottom: whether the cap at z1 / z0 is closed.
    """

    x: float
    y: float
    z0: float
    z1: float
    r: float
    top: bool = True
    bottom: bool = False


@dataclasses.dataclass(frozen=True)
class Sheet:
    """The rectangle ``origin + s*u + t*v`` for s, t in [0, 1]; it faces along u x v.

    holes: rectangles ``(s0, s1, t0, t1)``, in metres along u and v, whose triangles are
      dropped (a door opening in a wall).
    wave: ``(amplitude, period, phase)``: the sheet is pushed along its normal by
      ``amplitude * sin(2 pi * distance_along_u / period + phase)`` (curtain folds).
    """

    origin: Vec
    u: Vec
    v: Vec
    holes: tuple = ()
    wave: tuple | None = None


Primitive = Box | Cylinder | Sheet


def surface_area(p: Primitive) -> float:
    """Surface area of a primitive in square metres (open faces left out, holes ignored)."""
    if isinstance(p, Box):
        d = np.subtract(p.hi, p.lo)
        faces = {
            "-x": d[1] * d[2],
            "+x": d[1] * d[2],
            "-y": d[0] * d[2],
            "+y": d[0] * d[2],
            "-z": d[0] * d[1],
            "+z": d[0] * d[1],
        }
        return float(sum(a for k, a in faces.items() if k not in p.skip))
    if isinstance(p, Cylinder):
        return float(2 * np.pi * p.r * (p.z1 - p.z0) + np.pi * p.r**2 * (p.top + p.bottom))
    return float(np.linalg.norm(p.u) * np.linalg.norm(p.v))


def primitive_bounds(p: Primitive) -> tuple[np.ndarray, np.ndarray]:
    """(lo f64[3], hi f64[3]): axis-aligned bounds of a primitive in its own frame (a
    wavy sheet padded by its amplitude)."""
    if isinstance(p, Box):
        return np.asarray(p.lo, float), np.asarray(p.hi, float)
    if isinstance(p, Cylinder):
        return np.array([p.x - p.r, p.y - p.r, p.z0]), np.array([p.x + p.r, p.y + p.r, p.z1])
    o, u, v = (np.asarray(x, float) for x in (p.origin, p.u, p.v))
    corners = np.stack([o, o + u, o + v, o + u + v])
    pad = abs(p.wave[0]) if p.wave else 0.0
    return corners.min(0) - pad, corners.max(0) + pad


# ---------------------------------------------------------------------------------------
# Tessellation
def _grid_triangles(nu: int, nv: int) -> np.ndarray:
    """i64[2*nu*nv, 3]: two triangles per cell of an (nu+1) x (nv+1) vertex grid (vertex
    (i, j) has index i*(nv+1)+j), wound to face along u x v."""
    i, j = np.meshgrid(np.arange(nu), np.arange(nv), indexing="ij")
    a = (i * (nv + 1) + j).ravel()
    b, c, d = a + nv + 1, a + nv + 2, a + 1
    return np.concatenate([np.stack([a, b, c], 1), np.stack([a, c, d], 1)])


def _box_mesh(p: Box, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Each kept face is a grid on the box's integer lattice; lattice points shared by two
    faces (the rims) become one vertex."""
    lo, hi = np.asarray(p.lo, float), np.asarray(p.hi, float)
    cells = np.maximum(1, np.round((hi - lo) / spacing)).astype(np.int64)  # per axis
    lattice, faces, base = [], [], 0
    for axis in range(3):
        for sign, name in ((-1, "-"), (1, "+")):
            if name + "xyz"[axis] in p.skip:
                continue
            ua, va = (axis + 1) % 3, (axis + 2) % 3  # e_ua x e_va = +e_axis
            if sign < 0:
                ua, va = va, ua
            iu, iv = np.meshgrid(np.arange(cells[ua] + 1), np.arange(cells[va] + 1), indexing="ij")
            lat = np.zeros(iu.shape + (3,), np.int64)
            lat[..., axis] = 0 if sign < 0 else cells[axis]
            lat[..., ua], lat[..., va] = iu, iv
            lattice.append(lat.reshape(-1, 3))
            faces.append(_grid_triangles(cells[ua], cells[va]) + base)
            base += iu.size
    if not lattice:
        return np.zeros((0, 3)), np.zeros((0, 3), np.int64)
    lat = np.concatenate(lattice)
    keys = (lat[:, 0] * (cells[1] + 1) + lat[:, 1]) * (cells[2] + 1) + lat[:, 2]
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    verts = lo + lat[first] / cells * (hi - lo)
    return verts, inverse[np.concatenate(faces)]


def _cylinder_mesh(p: Cylinder, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """A side of stacked rings, and each closed cap as concentric rings around a centre
    vertex."""
    n_around = max(6, int(round(2 * np.pi * p.r / spacing)))
    n_up = max(1, int(round((p.z1 - p.z0) / spacing)))
    n_rings = max(1, int(round(p.r / spacing)))
    ang = 2 * np.pi * np.arange(n_around) / n_around
    ring = np.stack([p.x + p.r * np.cos(ang), p.y + p.r * np.sin(ang)], 1)
    z = np.linspace(p.z0, p.z1, n_up + 1)
    verts = [
        np.concatenate(
            [ring[None].repeat(n_up + 1, 0), z[:, None, None].repeat(n_around, 1)], 2
        ).reshape(-1, 3)
    ]
    k = np.arange(n_around)
    j = np.arange(n_up)[:, None]
    a, b = j * n_around + k, j * n_around + (k + 1) % n_around  # side quads, facing out
    faces = [
        np.stack([a, b, b + n_around], -1).reshape(-1, 3),
        np.stack([a, b + n_around, a + n_around], -1).reshape(-1, 3),
    ]
    count = (n_up + 1) * n_around
    caps = ((p.top, p.z1, n_up * n_around, True), (p.bottom, p.z0, 0, False))
    for closed, zc, rim_start, facing_up in caps:
        if not closed:
            continue
        rows = [rim_start + k]  # ring vertex indices from the rim inwards
        for m in range(n_rings - 1, 0, -1):
            rr = p.r * m / n_rings
            verts.append(
                np.stack([p.x + rr * np.cos(ang), p.y + rr * np.sin(ang), np.full(n_around, zc)], 1)
            )
            rows.append(count + k)
            count += n_around
        verts.append(np.array([[p.x, p.y, zc]]))
        centre = count
        count += 1
        for outer, inner in zip(rows[:-1], rows[1:], strict=False):
            outer2, inner2 = np.roll(outer, -1), np.roll(inner, -1)
            t = [np.stack([outer, outer2, inner2], 1), np.stack([outer, inner2, inner], 1)]
            faces += t if facing_up else [f[:, ::-1] for f in t]
        t = np.stack([rows[-1], np.roll(rows[-1], -1), np.full(n_around, centre)], 1)
        faces.append(t if facing_up else t[:, ::-1])
    return np.concatenate(verts), np.concatenate(faces)


def _sheet_mesh(p: Sheet, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """A grid over the rectangle, rippled along its normal, minus the triangles whose
    centre lies in a hole."""
    u, v, o = (np.asarray(x, float) for x in (p.u, p.v, p.origin))
    lu, lv = np.linalg.norm(u), np.linalg.norm(v)
    nu, nv = max(1, int(round(lu / spacing))), max(1, int(round(lv / spacing)))
    s, t = np.meshgrid(np.linspace(0, 1, nu + 1), np.linspace(0, 1, nv + 1), indexing="ij")
    verts = o + s.reshape(-1, 1) * u + t.reshape(-1, 1) * v
    if p.wave is not None:
        amp, period, phase = p.wave
        normal = np.cross(u, v) / (lu * lv)
        verts = verts + amp * np.sin(2 * np.pi * s.reshape(-1, 1) * lu / period + phase) * normal
    faces = _grid_triangles(nu, nv)
    if p.holes:
        cs = (faces // (nv + 1)).mean(1) / nu * lu  # triangle centre along u, metres
        ct = (faces % (nv + 1)).mean(1) / nv * lv  # ... and along v
        keep = np.ones(len(faces), bool)
        for s0, s1, t0, t1 in p.holes:
            keep &= ~((cs > s0) & (cs < s1) & (ct > t0) & (ct < t1))
        faces = faces[keep]
    return verts, faces


def tessellate(p: Primitive, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Triangle mesh of a primitive with edges of about ``spacing`` metres.

    Returns:
      (f64[n, 3] vertices, i64[m, 3] triangles) in the primitive's frame.
    """
    if spacing <= 0:
        raise ValueError(f"tessellate: spacing must be > 0, got {spacing}")
    mesh_of = {Box: _box_mesh, Cylinder: _cylinder_mesh, Sheet: _sheet_mesh}.get(type(p))
    if mesh_of is None:
        raise TypeError(
            f"tessellate: unknown primitive {type(p).__name__} (expected Box, Cylinder or Sheet)"
        )
    return mesh_of(p, spacing)


# ---------------------------------------------------------------------------------------
# Poses
def compose_poses(outer: Pose, inner: Pose) -> Pose:
    """The pose of a frame given by ``inner`` inside ``outer``'s frame, expressed in
    outer's parent (e.g. a part's pose in its object, composed with the object's pose)."""
    c, s = np.cos(outer[0]), np.sin(outer[0])
    return (
        outer[0] + inner[0],
        outer[1] + c * inner[1] - s * inner[2],
        outer[2] + s * inner[1] + c * inner[2],
        outer[3] + inner[3],
    )


def to_parent(pose: Pose, points: np.ndarray) -> np.ndarray:
    """f64[n, 3]: points given in the pose's frame, expressed in its parent frame."""
    c, s = np.cos(pose[0]), np.sin(pose[0])
    return points @ np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]]) + np.asarray(pose[1:])


def to_local(pose: Pose, points: np.ndarray) -> np.ndarray:
    """f64[n, 3]: points given in the parent frame, expressed in the pose's frame (the
    inverse of `to_parent`)."""
    c, s = np.cos(pose[0]), np.sin(pose[0])
    return (points - np.asarray(pose[1:])) @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])

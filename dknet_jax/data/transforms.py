"""Per-scene augmentation and host-side voxel coordinates (pure numpy).

Data flow: ``dataset.load_scene`` (npz -> sample dict) -> **transforms** (centre, augment,
crop) -> ``batching.pack_batch`` (B samples -> ``PointBatch``; computes ``vox`` and
``feats`` with :func:`voxel_coords` / :func:`point_features`) -> ``pipeline``.

A *sample* is a dict for one scene: ``xyz`` f32[N, 3] metres, ``rgb`` u8[N, 3] (f32 in
0..255 after colour noise), ``semantic`` i32[N], ``instance`` i32[N], ``superpoint``
i32[N] and ``name`` (str). Every random transform has the form
``fn(sample, rng: np.random.Generator, ...) -> sample``: it returns a new dict (the input is
never modified) and draws only from ``rng``, so a scene's augmentation is reproducible
from the generator it is handed (the pipeline derives it from (seed, epoch, scene)).

Training chain (:func:`augment`, numbers from the released DKNet/PointGroup code,
docs/method.md section 1): centre on the mean -> jitter of the linear map (I + N(0, 0.1))
-> x-flip (p = 0.5) -> rotation about z (uniform angle) -> elastic distortion, two passes
(granularity 6 / 20 voxels, magnitude 40 / 160 voxels at the 2 cm reference voxel, i.e.
0.12 m / 0.40 m and 0.8 m / 3.2 m; the released code scales both with the voxel size,
so they are kept constant in metres here) -> crop to ``max_points`` -> optional colour
noise. Evaluation (:func:`prepare_eval`) only centres: no random transform at test time,
unless handed the released test-time matrix (:func:`released_test_matrices`, config
``test.released_aug``).

Coordinates: the network sees the *centred, augmented* xyz in metres, both as
``PointBatch.xyz`` and as the last 3 channels of ``feats`` (as PointGroup/DKNet, whose
prepared scenes are mean-centred before augmentation). Our prepared npz files keep raw
coordinates, so :func:`centre` subtracts the scene mean first, in training and at test.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy.ndimage import uniform_filter1d

from dknet_jax.types import IGNORE_LABEL

POINT_KEYS = ("xyz", "rgb", "semantic", "instance", "superpoint")


def _with(sample: dict, **changes) -> dict:
    out = dict(sample)
    out.update(changes)
    return out


def _linear(sample: dict, matrix: np.ndarray) -> dict:
    # einsum, not @: avoids BLAS thread start-up on [N, 3] x [3, 3] in a pipeline worker
    # thread (docs/benchmarks.md, "Input pipeline")
    xyz = np.einsum("ni,ij->nj", sample["xyz"].astype(np.float64), matrix)
    return _with(sample, xyz=xyz.astype(np.float32))


# --------------------------------------------------------------------------------------
# deterministic steps


def centre(sample: dict) -> dict:
    """Subtract the scene's mean point: xyz f32[N, 3] -> centred f32[N, 3]."""
    xyz = sample["xyz"].astype(np.float64)
    return _with(sample, xyz=(xyz - xyz.mean(axis=0)).astype(np.float32))


def reindex_instances(instance: np.ndarray) -> np.ndarray:
    """i32[N] ids (>= 0, or -100) -> compact ids 0..K'-1 in increasing order of the old id;
    -100 (any negative id) stays -100."""
    instance = np.asarray(instance)
    out = np.full(instance.shape, IGNORE_LABEL, dtype=np.int32)
    has = instance >= 0
    if has.any():
        _, inverse = np.unique(instance[has], return_inverse=True)
        out[has] = inverse.astype(np.int32)
    return out


def select_points(sample: dict, keep: np.ndarray) -> dict:
    """Keep the rows ``keep`` (bool[N] or indices) of every per-point array; instance ids
    are re-indexed to 0..K'-1 over the kept points."""
    out = dict(sample)
    for key in POINT_KEYS:
        if key in sample:
            out[key] = sample[key][keep]
    if "instance" in out:
        out["instance"] = reindex_instances(out["instance"])
    return out


# --------------------------------------------------------------------------------------
# random transforms: fn(sample, rng) -> sample


def jitter_matrix(rng: np.random.Generator, std: float = 0.1) -> np.ndarray:
    """f64[3, 3] = I + E, E ~ N(0, std) elementwise."""
    return np.eye(3) + rng.normal(0.0, std, size=(3, 3))


def flip_matrix(rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    """f64[3, 3] = diag(-1, 1, 1) with probability p, else I."""
    return np.diag([-1.0, 1.0, 1.0]) if rng.random() < p else np.eye(3)


def rotation_z(theta: float) -> np.ndarray:
    """f64[3, 3] matrix R with (row vector) x @ R = x rotated by theta about +z."""
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])


def random_rotation_matrix(rng: np.random.Generator) -> np.ndarray:
    """f64[3, 3] rotation about z by an angle uniform in [0, 2 pi)."""
    return rotation_z(rng.uniform(0.0, 2.0 * np.pi))


def random_jitter(sample: dict, rng: np.random.Generator, *, std: float = 0.1) -> dict:
    """xyz @ (I + E), E ~ N(0, std) elementwise: a small random linear (shear/scale) map."""
    return _linear(sample, jitter_matrix(rng, std))


def random_flip_x(sample: dict, rng: np.random.Generator, *, p: float = 0.5) -> dict:
    """With probability p, x -> -x (a mirror image; other coordinates unchanged)."""
    return _linear(sample, flip_matrix(rng, p))


def random_rotate_z(sample: dict, rng: np.random.Generator) -> dict:
    """Rotate about the z axis through the origin by an angle uniform in [0, 2 pi)."""
    return _linear(sample, random_rotation_matrix(rng))


def elastic_field(
    xyz: np.ndarray, rng: np.random.Generator, *, granularity: float, magnitude: float
) -> np.ndarray:
    """Smooth random displacement f32[N, 3] at the points xyz f32[N, 3] (metres).

    N(0, 1) noise on a grid of spacing ``granularity`` that covers the points with a
    margin, smoothed by a 3-wide box filter along x, y and z (applied twice, as the
    released code, so the per-axis kernel is [1, 2, 3, 2, 1] / 9 and the grid noise std
    is (19/81)^1.5 = 0.114), trilinearly interpolated at the points (:func:`trilinear`)
    and scaled by ``magnitude``. Continuous and piecewise trilinear, so nearby points move together.
    """
    if granularity <= 0:
        raise ValueError(f"elastic granularity must be > 0, got {granularity}")
    xyz = np.asarray(xyz, dtype=np.float64)
    lo = xyz.min(axis=0) - granularity
    cells = np.ceil((xyz.max(axis=0) + granularity - lo) / granularity).astype(int) + 1
    noise = rng.standard_normal((*cells, 3)).astype(np.float32)
    for _ in range(2):
        for axis in range(3):
            noise = uniform_filter1d(noise, size=3, axis=axis, mode="constant", cval=0.0)
    return (trilinear(noise, lo, granularity, xyz) * magnitude).astype(np.float32)


def trilinear(grid: np.ndarray, origin: np.ndarray, spacing: float, pts: np.ndarray):
    """Trilinear interpolation of ``grid`` f32[X, Y, Z, C] (node (i, j, k) at
    origin + spacing * (i, j, k)) at pts f[N, 3] -> f32[N, C]. Points outside the grid
    are clamped to its border cells (callers keep them inside). Same result (to f32
    rounding) as ``scipy.interpolate.RegularGridInterpolator(method="linear")`` on
    interior points, several times faster for this uniform grid."""
    shape = np.array(grid.shape[:3])
    u = (np.asarray(pts, np.float64) - origin) / spacing
    i0 = np.clip(np.floor(u).astype(np.int64), 0, shape - 2)
    f = np.clip(u - i0, 0.0, 1.0).astype(np.float32)
    flat = grid.reshape(-1, grid.shape[3]).astype(np.float32)
    base = (i0[:, 0] * shape[1] + i0[:, 1]) * shape[2] + i0[:, 2]
    out = np.zeros((len(u), grid.shape[3]), np.float32)
    for dx in (0, 1):
        wx = f[:, 0] if dx else 1.0 - f[:, 0]
        for dy in (0, 1):
            wy = wx * (f[:, 1] if dy else 1.0 - f[:, 1])
            for dz in (0, 1):
                w = wy * (f[:, 2] if dz else 1.0 - f[:, 2])
                corner = np.take(flat, base + (dx * shape[1] + dy) * shape[2] + dz, axis=0)
                out += w[:, None] * corner
    return out


def elastic_distortion(
    sample: dict, rng: np.random.Generator, *, granularity: float, magnitude: float
) -> dict:
    """xyz + :func:`elastic_field` (granularity and magnitude in metres)."""
    disp = elastic_field(sample["xyz"], rng, granularity=granularity, magnitude=magnitude)
    return _with(sample, xyz=sample["xyz"] + disp)


def color_noise(
    sample: dict, rng: np.random.Generator, *, scene_std: float = 0.1, point_std: float = 0.0
) -> dict:
    """rgb -> f32 rgb + one N(0, scene_std) shift per channel for the whole scene (as
    PointGroup) + optional N(0, point_std) per point. Stds are in units of the network's
    [-1, 1] colour scale (1 unit = 127.5 rgb levels); no clipping."""
    rgb = sample["rgb"].astype(np.float32)
    rgb = rgb + 127.5 * rng.normal(0.0, scene_std, size=3).astype(np.float32)
    if point_std > 0:
        rgb = rgb + 127.5 * rng.normal(0.0, point_std, size=rgb.shape).astype(np.float32)
    return _with(sample, rgb=rgb)


def crop_to_max_points(
    sample: dict,
    rng: np.random.Generator,
    *,
    max_points: int,
    box_size: float,
    shrink: float,
) -> dict:
    """Keep at most ``max_points`` points with a random vertical box crop.

    Scenes with <= max_points points are returned unchanged. Otherwise (like the released
    code's 512-voxel crop box that shrinks by 32 voxels in x and y until the count fits):
    a box of side ``box_size`` metres in x and y (z unbounded) is placed around a random
    point (so it is never empty), kept inside the scene's extent where it fits; while it
    holds more than ``max_points`` points its side shrinks by ``shrink`` and it is redrawn.
    If the side reaches 0 (only for degenerate, extremely dense scenes) a random subset of
    ``max_points`` points is kept. Instance ids are re-indexed 0..K'-1 afterwards.
    """
    if max_points <= 0:
        raise ValueError(f"max_points must be > 0, got {max_points}")
    xy = sample["xyz"][:, :2]
    n = len(xy)
    if n <= max_points:
        return dict(sample)
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    side = float(box_size)
    while side > 0:
        anchor = xy[rng.integers(n)]
        corner = anchor - rng.random(2) * side
        corner = np.clip(corner, lo, lo + np.maximum(hi - lo - side, 0.0))
        keep = np.all((xy >= corner) & (xy <= corner + side), axis=1)
        if keep.sum() <= max_points:
            return select_points(sample, keep)
        side -= shrink
    keep = np.sort(rng.choice(n, size=max_points, replace=False))
    return select_points(sample, keep)


# --------------------------------------------------------------------------------------
# chains


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation settings (defaults: the released code at 2 cm voxels).

    ``elastic`` holds (granularity, magnitude) pairs in metres, one per pass; an empty
    tuple disables the distortion. ``max_points=None`` disables the crop.
    """

    jitter_std: float = 0.1
    flip: bool = True
    rotate: bool = True
    elastic: tuple[tuple[float, float], ...] = ((0.12, 0.8), (0.40, 3.2))
    max_points: int | None = 250_000
    crop_box: float = 512 * 0.02  # metres (512 voxels at 2 cm)
    crop_shrink: float = 32 * 0.02  # metres per retry
    color_noise: bool = False
    color_scene_std: float = 0.1
    color_point_std: float = 0.0

    @classmethod
    def for_voxel_size(cls, voxel_size: float, **overrides) -> AugmentConfig:
        """The released code's settings expressed for ``voxel_size`` (metres): crop box
        of 512 voxels shrinking by 32; the elastic numbers are constant in metres."""
        kw = dict(crop_box=512 * voxel_size, crop_shrink=32 * voxel_size)
        kw.update(overrides)
        return cls(**kw)


def augment(sample: dict, rng: np.random.Generator, config: AugmentConfig) -> dict:
    """The training chain (module docstring): centre, jitter, flip, rotate, elastic
    passes, crop, colour noise. Draws only from ``rng``."""
    out = centre(sample)
    matrix = np.eye(3)  # jitter, flip, rotate composed: one pass over the points
    if config.jitter_std > 0:
        matrix = matrix @ jitter_matrix(rng, config.jitter_std)
    if config.flip:
        matrix = matrix @ flip_matrix(rng)
    if config.rotate:
        matrix = matrix @ random_rotation_matrix(rng)
    out = _linear(out, matrix)
    for granularity, magnitude in config.elastic:
        out = elastic_distortion(out, rng, granularity=granularity, magnitude=magnitude)
    if config.max_points is not None:
        out = crop_to_max_points(
            out,
            rng,
            max_points=config.max_points,
            box_size=config.crop_box,
            shrink=config.crop_shrink,
        )
    if config.color_noise:
        out = color_noise(
            out, rng, scene_std=config.color_scene_std, point_std=config.color_point_std
        )
    return out


def prepare_eval(sample: dict, matrix: np.ndarray | None = None) -> dict:
    """Test-time transform: centre only (no randomness); with ``matrix`` f64[3, 3] (from
    :func:`released_test_matrices`) the centred xyz rows are then multiplied by it,
    ``xyz @ matrix`` in float64 and rounded to float32, as the released ``testMerge``
    (its prepared scenes are already mean-centred, so centring first is the same)."""
    sample = centre(sample)
    if matrix is None:
        return sample
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (3, 3):
        raise ValueError(f"prepare_eval: matrix must be f64[3, 3], got shape {matrix.shape}")
    xyz = sample["xyz"].astype(np.float64) @ matrix
    return _with(sample, xyz=xyz.astype(np.float32))


def released_test_matrices(seed: int, count: int) -> np.ndarray:
    """f64[count, 3, 3]: the released test-time transforms of the first ``count`` scenes of
    a split in sorted-name order (R:data/scannetv2_inst.py testMerge, ``dataAugment(xyz,
    False, True, True)``; R:test.py seeds numpy with ``test_seed`` 567).

    Scene i takes the i-th pair of draws of the legacy numpy stream
    ``np.random.seed(seed)``: ``m = I``; ``m[0, 0] *= randint(0, 2) * 2 - 1`` (x-flip with
    probability 1/2); ``theta = rand() * 2 pi``; ``m = m @ [[cos, sin, 0], [-sin, cos, 0],
    [0, 0, 1]]``; points are rows, ``xyz @ m``. This is the released stream when its test
    loader runs in the main process (``test_workers: 0``); with its worker processes
    (``test_workers: 16``) each worker's numpy seed derives from torch's generator after
    the model was built, which numpy cannot replay (docs/released_model.md section 5).
    """
    if not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**32:
        raise ValueError(
            f"released_test_matrices: seed must be an integer in [0, 2**32), got {seed!r}"
        )
    if int(count) < 0:
        raise ValueError(f"released_test_matrices: count must be >= 0, got {count}")
    stream = np.random.RandomState(int(seed))
    out = np.empty((int(count), 3, 3), dtype=np.float64)
    for i in range(int(count)):
        m = np.eye(3)
        m[0][0] *= stream.randint(0, 2) * 2 - 1
        theta = stream.rand() * 2 * np.pi
        c, s = np.cos(theta), np.sin(theta)
        out[i] = np.matmul(m, [[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])
    return out


# --------------------------------------------------------------------------------------
# network inputs


VOXEL_ORIGINS = ("centre", "scene_min")


def voxel_coords(xyz: np.ndarray, voxel_size: float, origin: str = "centre") -> np.ndarray:
    """i32[N, 3] voxel coordinates of one scene, starting at 0 on every axis.

    ``origin`` (config ``data.voxel_origin``) says where the grid is anchored:

    - ``"centre"`` (ours): ``floor(xyz / voxel_size)``, the voxel faces on multiples of
      ``voxel_size`` from the origin of the (centred) coordinates, then shifted by the
      per-axis minimum voxel (an integer shift: the same voxels).
    - ``"scene_min"`` (released): the grid starts at the scene's minimum point, with the
      released arithmetic (R:data/scannetv2_inst.py testMerge/trainMerge: ``xyz *
      scale; xyz -= xyz.min(0); .long()``) in float64 with ``scale = 1 / voxel_size``:
      ``floor(s - min(s))``, ``s = xyz * scale``, the per-axis minimum over this scene.

    The two grids differ by a sub-voxel shift, so points near a voxel face can land in
    different voxels. Raises ValueError for an unknown ``origin`` or ``voxel_size <= 0``.
    """
    if origin not in VOXEL_ORIGINS:
        raise ValueError(
            f"voxel_coords: origin {origin!r} is not one of {VOXEL_ORIGINS} (config "
            f"data.voxel_origin: 'centre' = ours, 'scene_min' = the released grid)"
        )
    if not voxel_size > 0:
        raise ValueError(f"voxel_coords: voxel_size must be > 0, got {voxel_size}")
    xyz = np.asarray(xyz, dtype=np.float64)
    if origin == "scene_min":
        scaled = xyz * (1.0 / voxel_size)
        if len(scaled):
            scaled = scaled - scaled.min(axis=0)
        return np.floor(scaled).astype(np.int32)
    vox = np.floor(xyz / voxel_size).astype(np.int64)
    if len(vox):
        vox -= vox.min(axis=0)
    return vox.astype(np.int32)


def point_features(rgb: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    """f32[N, 6] network input: rgb / 127.5 - 1 (so 0..255 -> [-1, 1]), then xyz (the
    centred, augmented coordinates in metres)."""
    colour = np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0
    return np.concatenate([colour, np.asarray(xyz, dtype=np.float32)], axis=1)

"""Pictures of a point cloud without a 3D viewer: numpy z-buffer splatting to PNG.

Place in the data flow: ``scan`` (per-point instance / class colours) -> **render**
(``render_views``: a top view and a perspective view side by side, ``uint8[H, W, 3]``) ->
``add_legend`` (a strip of class names, pillow) -> ``save_png``.

Everything up to the legend is pure numpy, so it is testable pixel by pixel:

- Pixel coordinates: column ``u`` grows to the right, row ``v`` grows downwards; a point
  lands on pixel ``(round(v), round(u))``.
- Top view (orthographic, looking down -z): x to the right, y up the image. The scene's
  xy box is scaled uniformly to fit ``size`` minus ``margin`` pixels and centred, so the
  point with the smallest x and the largest y of a box filling the panel lands on pixel
  ``(margin, margin)`` (the top-left corner). Depth = -z: the highest point is drawn.
- Perspective: a pinhole camera looking at the box centre from ``azimuth`` degrees around
  +z (0 = from +x) and ``elevation`` degrees above the horizon, outside the bounding
  sphere, zoomed so the projection fills the panel. Depth = distance along the view
  axis: the nearest point is drawn.
- Splatting: each point covers a square of ``(2r+1)^2`` pixels; the z-buffer keeps, per
  pixel, the smallest depth (ties: the earlier point). By default ``r`` closes the gaps
  between neighbouring samples (:func:`surface_spacing` in metres times the pixels per
  metre at the point's depth, so nearer points are drawn larger in perspective).
"""

from __future__ import annotations

import colorsys
import os

import numpy as np

__all__ = [
    "BACKGROUND",
    "GREY",
    "add_legend",
    "auto_radius",
    "distinct_colors",
    "project_perspective",
    "project_top",
    "render_perspective",
    "render_top",
    "render_views",
    "save_png",
    "splat",
    "surface_spacing",
]

BACKGROUND = (255, 255, 255)
GREY = (170, 170, 170)  # points that belong to no instance


def distinct_colors(k: int) -> np.ndarray:
    """u8[k, 3]: ``k`` well-separated colours (golden-ratio hue steps, alternating
    saturation/value), never grey, deterministic."""
    out = np.zeros((max(k, 0), 3), np.uint8)
    for i in range(max(k, 0)):
        h = (0.02 + i * 0.618033988749895) % 1.0
        s = (0.85, 0.6, 0.95)[i % 3]
        v = (0.9, 0.75, 0.6)[(i // 3) % 3]
        out[i] = np.round(np.array(colorsys.hsv_to_rgb(h, s, v)) * 255)
    return out


def _check(xyz: np.ndarray, colors: np.ndarray, size) -> tuple[np.ndarray, np.ndarray, int, int]:
    xyz = np.asarray(xyz, np.float64)
    colors = np.asarray(colors)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise ValueError(f"render: xyz must be [N, 3], got {list(xyz.shape)}")
    if colors.shape != xyz.shape:
        raise ValueError(
            f"render: colors must be [N, 3] like xyz {list(xyz.shape)}, got {list(colors.shape)}"
        )
    if not np.all(np.isfinite(xyz)):
        raise ValueError("render: xyz contains NaN or inf")
    w, h = (int(s) for s in size)
    if w < 1 or h < 1:
        raise ValueError(f"render: size must be positive (W, H), got {size}")
    return xyz, colors.astype(np.uint8), w, h


def project_top(xyz: np.ndarray, size: tuple[int, int], margin: int = 8):
    """Orthographic top view. xyz f64[N, 3] -> (u f64[N], v f64[N], depth f64[N], scale)
    with depth = -z (smaller is nearer the viewer above) and scale = pixels per metre."""
    w, h = size
    lo, hi = xyz[:, :2].min(axis=0), xyz[:, :2].max(axis=0)
    ext = hi - lo
    room = np.array([w - 1 - 2 * margin, h - 1 - 2 * margin], np.float64)
    with np.errstate(divide="ignore"):
        scales = np.where(ext > 0, np.maximum(room, 0) / np.where(ext > 0, ext, 1), np.inf)
    s = float(scales.min()) if np.isfinite(scales.min()) else 1.0
    ou = (w - 1 - ext[0] * s) / 2.0
    ov = (h - 1 - ext[1] * s) / 2.0
    u = ou + (xyz[:, 0] - lo[0]) * s
    v = ov + (hi[1] - xyz[:, 1]) * s
    return u, v, -xyz[:, 2], s


def _camera(xyz: np.ndarray, azimuth: float, elevation: float, fov: float):
    lo, hi = xyz.min(axis=0), xyz.max(axis=0)
    centre = (lo + hi) / 2.0
    radius = max(float(np.linalg.norm(hi - lo)) / 2.0, 1e-6)
    dist = radius / np.sin(np.radians(fov) / 2.0) * 1.02
    az, el = np.radians(azimuth), np.radians(elevation)
    eye = centre + dist * np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)])
    fwd = (centre - eye) / np.linalg.norm(centre - eye)
    right = np.cross(fwd, [0.0, 0.0, 1.0])
    if np.linalg.norm(right) < 1e-9:  # looking straight down
        right = np.array([1.0, 0.0, 0.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, fwd)
    return eye, fwd, right, up


def project_perspective(
    xyz: np.ndarray,
    size: tuple[int, int],
    *,
    azimuth: float = -60.0,
    elevation: float = 60.0,
    fov: float = 50.0,
    margin: int = 8,
):
    """Pinhole view from outside the bounding sphere, zoomed and centred so the points'
    projection fills the panel (less ``margin``). xyz f64[N, 3] -> (u, v, depth, scale)
    f64[N]; depth = distance along the view axis (points behind the camera get depth inf),
    scale = pixels per metre at each point's depth."""
    w, h = size
    eye, fwd, right, up = _camera(xyz, azimuth, elevation, fov)
    d = xyz - eye
    xc, yc, zc = d @ right, d @ up, d @ fwd
    front = zc > 1e-6
    zs = np.where(front, zc, 1.0)
    pu, pv = xc / zs, -yc / zs  # image-plane coordinates at focal length 1
    if front.any():
        lo = np.array([pu[front].min(), pv[front].min()])
        hi = np.array([pu[front].max(), pv[front].max()])
    else:
        lo = hi = np.zeros(2)
    ext = hi - lo
    room = np.maximum(np.array([w - 1 - 2 * margin, h - 1 - 2 * margin], np.float64), 0)
    scales = np.where(ext > 0, room / np.where(ext > 0, ext, 1), np.inf)
    focal = float(scales.min()) if np.isfinite(scales.min()) else 1.0
    u = (w - 1 - ext[0] * focal) / 2.0 + (pu - lo[0]) * focal
    v = (h - 1 - ext[1] * focal) / 2.0 + (pv - lo[1]) * focal
    return u, v, np.where(front, zc, np.inf), np.where(front, focal / zs, 0.0)


def surface_spacing(xyz: np.ndarray, sample: int = 4000) -> float:
    """Typical distance (metres) between neighbouring samples of a scanned surface: the
    median distance from a point to its 4th-nearest neighbour (the larger step of a
    regular grid whose two steps differ by less than 2x), over a fixed subsample of at
    most ``sample`` points, corrected for the subsampling (surfaces are 2-D: spacing ~
    1/sqrt(density))."""
    from scipy.spatial import cKDTree

    pts = np.asarray(xyz, np.float64)
    full = len(pts)
    if full < 5:
        return 0.0
    if full > sample:
        pts = pts[np.linspace(0, full - 1, sample).astype(np.int64)]
    d, _ = cKDTree(pts).query(pts, k=5)
    return float(np.median(d[:, 4])) * float(np.sqrt(len(pts) / full))


def auto_radius(spacing: float, scale, max_radius: int = 4) -> np.ndarray:
    """i64 splat radius (scalar or per point) that closes gaps between samples
    ``spacing`` metres apart drawn at ``scale`` pixels per metre: ceil(spacing*scale/2),
    clipped to 0..``max_radius``."""
    r = np.ceil(0.5 * spacing * np.asarray(scale, np.float64))
    return np.clip(np.nan_to_num(r), 0, max_radius).astype(np.int64)


def splat(
    u: np.ndarray,
    v: np.ndarray,
    depth: np.ndarray,
    colors: np.ndarray,
    size: tuple[int, int],
    *,
    radius=0,
    background=BACKGROUND,
) -> np.ndarray:
    """Z-buffered point splatting.

    Args:
      u, v: f64[N] pixel column / row of each point (rounded to the nearest pixel).
      depth: f64[N]; per pixel the smallest finite depth wins (ties: lower point index).
      colors: u8[N, 3].
      size: (W, H).
      radius: int or int[N]: each point covers the (2r+1)^2 square around its pixel.
    Returns:
      u8[H, W, 3] image.
    """
    w, h = size
    img = np.empty((h, w, 3), np.uint8)
    img[:] = np.asarray(background, np.uint8)
    n = len(u)
    rad = np.broadcast_to(np.asarray(radius, np.int64), (n,))
    ok = np.isfinite(depth) & np.isfinite(u) & np.isfinite(v)
    pix_all, src_all = [], []
    for r in np.unique(rad[ok]):
        idx = np.flatnonzero(ok & (rad == r))
        cu = np.round(u[idx]).astype(np.int64)
        cv = np.round(v[idx]).astype(np.int64)
        offs = np.arange(-r, r + 1)
        du, dv = (a.reshape(-1) for a in np.meshgrid(offs, offs))
        pu = (cu[:, None] + du[None, :]).reshape(-1)
        pv = (cv[:, None] + dv[None, :]).reshape(-1)
        src = np.repeat(idx, len(du))
        inside = (pu >= 0) & (pu < w) & (pv >= 0) & (pv < h)
        pix_all.append(pv[inside] * w + pu[inside])
        src_all.append(src[inside])
    if not pix_all or sum(len(p) for p in pix_all) == 0:
        return img
    pix, src = np.concatenate(pix_all), np.concatenate(src_all)
    # sort by pixel, then depth, then point index; the first of each pixel wins
    sel = np.lexsort((src, depth[src], pix))
    pix_s = pix[sel]
    first = np.ones(len(sel), bool)
    first[1:] = pix_s[1:] != pix_s[:-1]
    img.reshape(-1, 3)[pix_s[first]] = np.asarray(colors, np.uint8)[src[sel[first]]]
    return img


def _shade(colors: np.ndarray, t: np.ndarray, strength: float) -> np.ndarray:
    """Darken colours by ``strength * t`` (t in [0, 1])."""
    f = 1.0 - strength * np.clip(t, 0.0, 1.0)
    return np.clip(np.round(colors.astype(np.float64) * f[:, None]), 0, 255).astype(np.uint8)


def _unit(x: np.ndarray) -> np.ndarray:
    fin = np.isfinite(x)
    if not fin.any():
        return np.zeros_like(x)
    lo, hi = x[fin].min(), x[fin].max()
    return np.where(fin, (x - lo) / (hi - lo) if hi > lo else 0.0, 0.0)


def render_top(
    xyz,
    colors,
    size=(640, 480),
    *,
    radius: int | None = None,
    margin: int = 8,
    shade: bool = False,
    background=BACKGROUND,
) -> np.ndarray:
    """u8[H, W, 3] top view (see the module docstring); ``shade`` darkens lower points."""
    xyz, colors, w, h = _check(xyz, colors, size)
    img_bg = np.empty((h, w, 3), np.uint8)
    img_bg[:] = np.asarray(background, np.uint8)
    if len(xyz) == 0:
        return img_bg
    u, v, depth, scale = project_top(xyz, (w, h), margin)
    if shade:
        colors = _shade(colors, 1.0 - _unit(xyz[:, 2]), 0.35)
    r = auto_radius(surface_spacing(xyz), scale) if radius is None else int(radius)
    return splat(u, v, depth, colors, (w, h), radius=r, background=background)


def render_perspective(
    xyz,
    colors,
    size=(640, 480),
    *,
    azimuth: float = -60.0,
    elevation: float = 60.0,
    fov: float = 50.0,
    radius: int | None = None,
    margin: int = 8,
    shade: bool = False,
    background=BACKGROUND,
) -> np.ndarray:
    """u8[H, W, 3] perspective view; ``shade`` darkens farther points (depth cue)."""
    xyz, colors, w, h = _check(xyz, colors, size)
    if len(xyz) == 0:
        img = np.empty((h, w, 3), np.uint8)
        img[:] = np.asarray(background, np.uint8)
        return img
    u, v, depth, scale = project_perspective(
        xyz, (w, h), azimuth=azimuth, elevation=elevation, fov=fov, margin=margin
    )
    if shade:
        colors = _shade(colors, _unit(depth), 0.45)
    r = auto_radius(surface_spacing(xyz), scale) if radius is None else int(radius)
    return splat(u, v, depth, colors, (w, h), radius=r, background=background)


def render_views(
    xyz,
    colors,
    size=(1280, 480),
    *,
    radius: int | None = None,
    shade: bool = False,
    background=BACKGROUND,
    **perspective,
) -> np.ndarray:
    """u8[H, W, 3]: the top view in the left half (``W // 2`` columns) and the
    perspective view in the right half (the remaining columns).

    xyz: f[N, 3] metres (z up); colors: u8[N, 3]; size: (W, H) of the whole image.
    ``perspective``: azimuth / elevation / fov of :func:`render_perspective`."""
    w, h = (int(s) for s in size)
    if w < 2:
        raise ValueError(f"render_views: width must be >= 2 (two panels), got {w}")
    left = w // 2
    top = render_top(xyz, colors, (left, h), radius=radius, shade=shade, background=background)
    persp = render_perspective(
        xyz, colors, (w - left, h), radius=radius, shade=shade, background=background, **perspective
    )
    return np.concatenate([top, persp], axis=1)


def add_legend(
    image: np.ndarray,
    entries,
    *,
    title: str | None = None,
    background=BACKGROUND,
    max_rows: int = 12,
) -> np.ndarray:
    """Append a legend strip below ``image`` (u8[H, W, 3]) -> u8[H + L, W, 3].

    entries: list of (text, (r, g, b)), drawn as colour swatches with their text, flowed
    left to right; at most ``max_rows`` rows (the rest summarised as "+ n more")."""
    from PIL import Image, ImageDraw, ImageFont

    h, w = image.shape[:2]
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    row_h, pad, sw = 16, 6, 11
    items, x, rows = [], pad, 1
    title_h = row_h if title else 0
    for i, (text, color) in enumerate(entries):
        tw = int(probe.textlength(text, font=font))
        need = sw + 4 + tw + 14
        if x + need > w - pad and x > pad:
            if rows == max_rows:
                more = f"+ {len(entries) - i} more"
                x = min(x, max(pad, w - pad - int(probe.textlength(more, font=font))))
                items.append((None, more, None, x))
                break
            rows, x = rows + 1, pad
        items.append((rows - 1, text, color, x))
        x += need
    if not entries:
        rows = 0
    strip = Image.new("RGB", (w, title_h + rows * row_h + 2 * pad), tuple(background))
    draw = ImageDraw.Draw(strip)
    if title:
        draw.text((pad, pad), title, fill=(0, 0, 0), font=font)
    last_row = max(rows - 1, 0)
    for row, text, color, x in items:
        if row is None:  # overflow marker after the last row
            draw.text((x, pad + title_h + last_row * row_h), text, fill=(0, 0, 0), font=font)
            continue
        y = pad + title_h + row * row_h
        draw.rectangle(
            [x, y + 1, x + sw, y + 1 + sw], fill=tuple(int(c) for c in color), outline=(60, 60, 60)
        )
        draw.text((x + sw + 4, y), text, fill=(0, 0, 0), font=font)
    return np.concatenate([image, np.asarray(strip, np.uint8)], axis=0)


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write u8[H, W, 3] as a PNG (``path``: a file name or a binary file object)."""
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"save_png: need uint8[H, W, 3], got {image.dtype}{list(image.shape)}")
    Image.fromarray(image, "RGB").save(
        path if hasattr(path, "write") else os.fspath(path), format="PNG"
    )

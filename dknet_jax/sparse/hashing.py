"""Coordinate hashing and kernel maps, built on the device inside ``jit``.

Place in the data flow: ``voxelize`` (voxel coords) -> **hashing** (neighbour tables, down /
up maps, per-offset tiles) -> ``conv`` (gather-GEMM-scatter) -> ``model/backbone``.

Keys. A row ``(b, x, y, z)`` is packed into one ``uint32`` by mixed radix over the
bounding box of the set (plus a margin of one cell on each side, so that the +-1
neighbour queries stay inside the box)::

    key = ((b' * EX + x') * EY + y') * EZ + z'     x' = x - min_x + 1,  EX = max_x - min_x + 3

with ``b' = b - min_b``. The box (:class:`Bounds`) can be passed in: a UNet reduces it
once for the finest level and halves it per level (:meth:`Bounds.halve`). The key space
is ``EB * EX * EY * EZ`` cells and must stay below ``KEY_LIMIT`` (~4.29e9): e.g. 8
ScanNet scenes of 15 m x 15 m x 5 m at 2 cm (8 * 753 * 753 * 253 = 1.15e9) or 4 S3DIS
halls of 60 m x 20 m x 6 m at 5 cm (4 * 1203 * 403 * 123 = 2.4e8) fit. Key order equals
lexicographic (b, x, y, z) order. When the box does not fit, the ``overflow`` flag of
the returned frame / map is set; callers raise on concrete inputs
(:func:`check_key_budget`) and poison outputs with NaN under ``jit`` so that the failure
is never silent. Padded rows get key ``SENTINEL_KEY``.

Lookup: ``argsort`` the keys once, ``searchsorted`` the queries. The submanifold table
searches in key order, once per ``(dx, dy)`` column of the 3x3x3 cube: the three ``dz``
neighbours sit just before, at and just after the found place (keys of a column are
consecutive integers along z), so 9 searches give all 27 offsets
(:func:`_neighbour_table`).

Offsets. ``k = 9a + 3b + c`` for ``(a, b, c) in {0,1,2}^3`` means the displacement
``(a-1, b-1, c-1)`` and matches ``weight[a, b, c]`` of a ``[3,3,3,Cin,Cout]`` weight;
offset ``26 - k`` is the mirror of ``k``. Down/up maps use the child offset
``c = 4(x&1) + 2(y&1) + (z&1)`` which matches ``weight[x&1, y&1, z&1]`` of ``[2,2,2,..]``.

Levels. A UNet needs the maps of every level: :func:`level_maps` builds them all in one
pass (the coarse sets from one sort of every level's keys, each level in its own key
range; the coarse levels' neighbour tables from one search over their concatenation; the
tiles of all levels from one running count and one scatter) and gives the same maps as
the chain :func:`subm_map` / :func:`down_map` level by level. XLA:CPU compiles one kernel
per distinct operation and shape, so seven levels of different sizes built one by one
compiled seven copies of every step.

Tiles. For the XLA convolution the existing pairs of a map are compacted into ``NT``
tiles of ``T`` rows, sorted by offset, each offset's run padded to a multiple of ``T``,
so that every tile has one offset (see :class:`Tiles`); the used tiles form a prefix.
Submanifold tiles leave the centre offset out (a plain matmul in ``conv``).
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

SENTINEL_KEY = np.uint32(0xFFFFFFFF)
# Number of key cells allowed; the f32 product used for the check has a relative error of
# ~3e-7, so the limit keeps a margin of ~1e-3 below 2**32 - 1.
KEY_LIMIT = 4.29e9

CENTER = 13


@flax.struct.dataclass
class KeyFrame:
    """Mixed-radix frame of a coordinate set.

    Attributes:
      origin: i32[4] per column (b, x, y, z) the value that maps to digit 0 (min - margin).
      extent: i32[4] number of digits per column.
      overflow: bool[] the key space ``prod(extent)`` exceeds ``KEY_LIMIT``.
    """

    origin: Array
    extent: Array
    overflow: Array


@flax.struct.dataclass
class Tiles:
    """Pairs of a kernel map compacted into tiles of one offset each.

    ``NT`` tiles of ``T`` rows; pair row ``p`` lies in tile ``p // T``. Padding rows have
    ``row == num_rows`` and ``col == num_cols`` (out-of-range sentinels).

    Attributes:
      row: i32[NT * T] table row of each pair (the voxel that owns the table row).
      col: i32[NT * T] table entry of each pair (the neighbour / parent it points at).
      tile_k: i32[NT] offset of each tile.
      ok: bool[] every existing pair found a place (False: capacity exceeded; the
        convolution then falls back to the dense per-offset path, or, compiled without
        that path, ``conv.subm_conv(fallback=False)``, its caller reports an overflow).
      used: i32[] tiles that hold pairs (a prefix: tiles ``>= used`` are all padding), at
        most ``NT``. The CPU convolution walks only these, so a generous capacity costs
        index memory, not convolution time.
      complete: static; the capacity covers every pair the table could ever hold, so
        ``ok`` is always True and no fallback is needed.
    """

    row: Array
    col: Array
    tile_k: Array
    ok: Array
    used: Array
    complete: bool = flax.struct.field(pytree_node=False, default=False)

    @property
    def tile_rows(self) -> int:
        return self.row.shape[0] // self.tile_k.shape[0]


@flax.struct.dataclass
class SubmMap:
    """Submanifold 3x3x3 kernel map of one level.

    Attributes:
      nbr: i32[V, 27] row of the neighbour at offset k, ``V`` (sentinel) when missing or
        when the row itself is padding.
      tiles: Tiles over the off-centre entries of ``nbr`` (row = output voxel, col =
        input voxel; the centre offset 13 is left out), or None.
      overflow: bool[] the key frame overflowed (results are invalid).
    """

    nbr: Array
    tiles: Tiles | None
    overflow: Array


@flax.struct.dataclass
class DownMap:
    """Kernel-2 stride-2 map from a fine level (V rows) to a coarse level (Vc rows).

    Attributes:
      coords: i32[Vc, 4] coarse coordinates ``(b, x//2, y//2, z//2)``, sorted
        lexicographically; padded rows repeat the last real row's batch + 1.
      valid: bool[Vc] real coarse rows.
      parent: i32[V] coarse row of each fine voxel (``Vc`` for padded fine rows).
      child: i32[V] child offset 0..7 of each fine voxel inside its parent.
      tiles: Tiles over the [V, 8] child table (row = fine voxel, col = coarse voxel).
      count: i32[] number of real coarse voxels (may exceed Vc: see overflow).
      overflow: bool[] key frame overflow or more than Vc coarse voxels.
    """

    coords: Array
    valid: Array
    parent: Array
    child: Array
    tiles: Tiles
    count: Array
    overflow: Array


# ----------------------------------------------------------------------------- keys


@flax.struct.dataclass
class Bounds:
    """Per-column bounding box of the valid rows of a coordinate set.

    Attributes:
      lo, hi: i32[4] per column (b, x, y, z) the smallest / largest value over the valid
        rows (0 when there is none).
    The box of a set's stride-2 parents (``(b, x >> 1, y >> 1, z >> 1)``) is the box of
    the set shifted the same way (:meth:`halve`), so a UNet computes the reductions once
    for its finest level and derives every coarser level's box without reducing again.
    """

    lo: Array
    hi: Array

    def halve(self) -> Bounds:
        """Box of the stride-2 parents of the set."""
        return Bounds(lo=parent_coords(self.lo), hi=parent_coords(self.hi))


def parent_coords(coords, shift=1):
    """Stride-``2**shift`` parent ``(b, x >> shift, y >> shift, z >> shift)`` (floor
    division) of ``int[..., 4]`` rows: a numpy array for numpy input (host-side checks), a
    jax array otherwise. An array ``shift`` broadcasts against the rows' leading axes
    (e.g. ``shift: [n, 1]`` and rows ``[1, V, 4]`` give ``[n, V, 4]``)."""
    xp = np if isinstance(coords, np.ndarray) else jnp
    rest = coords[..., 1:] >> (shift if isinstance(shift, int) else shift[..., None])
    batch = xp.broadcast_to(coords[..., :1], rest.shape[:-1] + (1,))
    return xp.concatenate([batch, rest], axis=-1)


def child_offset(coords: Array) -> Array:
    """i32[V] offset ``4(x&1) + 2(y&1) + (z&1)`` of each row of ``coords: i32[V, 4]`` inside
    its stride-2 parent (``weight[x&1, y&1, z&1]`` of a ``[2, 2, 2, ...]`` weight)."""
    return ((coords[:, 1] & 1) * 4 + (coords[:, 2] & 1) * 2 + (coords[:, 3] & 1)).astype(jnp.int32)


def bounds(coords: Array, valid: Array) -> Bounds:
    """:class:`Bounds` of ``coords: i32[V, 4]`` over rows where ``valid: bool[V]`` (one
    min-reduction over ``[coords, -coords]``: XLA:CPU splits every large reduction into
    several kernels, so one reduction instead of three saves compile time)."""
    coords = jnp.asarray(coords, jnp.int32)
    big = jnp.iinfo(jnp.int32).max
    both = jnp.concatenate([coords, -coords], axis=1)  # coordinates are > -2**31
    m = jnp.min(jnp.where(jnp.asarray(valid, bool)[:, None], both, big), axis=0)
    lo, hi = m[:4], -m[4:]
    empty = m[0] == big
    return Bounds(lo=jnp.where(empty, 0, lo), hi=jnp.where(empty, 0, hi))


def key_frame(
    coords: Array, valid: Array, *, margin: int = 1, box: Bounds | None = None
) -> KeyFrame:
    """Bounding box frame of ``coords: i32[V, 4]`` over rows where ``valid: bool[V]``.

    ``box``: the rows' :class:`Bounds` when already known (e.g. derived from a finer
    level with :meth:`Bounds.halve`); it must equal ``bounds(coords, valid)``. A box with
    leading axes (``lo, hi: i32[..., 4]``, e.g. one row per level) gives one frame per row
    (``coords`` and ``valid`` are then unused)."""
    if box is None:
        box = bounds(coords, valid)
    lo, hi = box.lo, box.hi
    pad = jnp.array([0, margin, margin, margin], jnp.int32)
    origin = lo - pad
    overflow = _frame_cells(box, margin) > KEY_LIMIT
    extent = (hi - lo + 1 + 2 * pad).astype(jnp.int32)
    return KeyFrame(origin=origin, extent=extent, overflow=overflow)


def _frame_cells(box: Bounds, margin: int) -> Array:
    """f32[...] key cells of the frame of ``box`` (f32: no int overflow for absurd boxes)."""
    pad = jnp.array([0, margin, margin, margin], jnp.float32)
    ext_f = box.hi.astype(jnp.float32) - box.lo.astype(jnp.float32) + 1.0 + 2.0 * pad
    return jnp.prod(ext_f, axis=-1)


def pack_keys(frame: KeyFrame, coords: Array, valid: Array) -> Array:
    """u32[V] keys of ``coords: i32[V, 4]`` in ``frame``; rows not ``valid`` or outside the
    frame get ``SENTINEL_KEY``. Leading axes broadcast (``frame.origin: i32[..., 4]``)."""
    d = jnp.asarray(coords, jnp.int32) - frame.origin
    inside = jnp.all((d >= 0) & (d < frame.extent), axis=-1) & valid
    du = jnp.where(inside[..., None], d, 0).astype(jnp.uint32)
    e = frame.extent.astype(jnp.uint32)
    key = ((du[..., 0] * e[..., 1] + du[..., 1]) * e[..., 2] + du[..., 2]) * e[..., 3] + du[..., 3]
    return jnp.where(inside, key, SENTINEL_KEY)


def _lookup(sorted_keys: Array, order: Array, query: Array, num_rows: int) -> Array:
    """Row index of each query key (``num_rows`` when absent); sentinel queries miss."""
    pos = jnp.searchsorted(sorted_keys, query, method="scan")
    pos = jnp.minimum(pos, num_rows - 1)
    hit = (sorted_keys[pos] == query) & (query != SENTINEL_KEY)
    return jnp.where(hit, order[pos], num_rows).astype(jnp.int32)


def check_key_budget(coords) -> None:
    """Host-side check of a concrete ``coords: i32[V, 4]``; raises ValueError when the
    bounding box (plus the neighbour margin) does not fit the 32-bit key space."""
    c = np.asarray(coords)
    if c.size == 0:
        return
    ext = c.max(0).astype(np.float64) - c.min(0) + 1 + np.array([0, 2, 2, 2])
    cells = float(np.prod(ext))
    if cells > KEY_LIMIT:
        raise ValueError(
            f"sparse coordinates span too large a box for the 32-bit voxel keys: "
            f"(batches, x, y, z) extents {ext.astype(np.int64).tolist()} give {cells:.3g} "
            f"cells > {KEY_LIMIT:.3g}. Use a coarser voxel size, crop the scenes, shift each "
            f"scene to start at 0, or use fewer scenes per batch."
        )


# Block height of :func:`prefix_count`'s triangular matmuls.
PREFIX_BLOCK = 64


def prefix_count(mask: Array) -> Array:
    """Inclusive running count of ``mask: bool[N, ...]`` (or small non-negative integers)
    along axis 0 (i32, same shape): ``jnp.cumsum(mask, axis=0)``, computed as matmuls.

    Rows are taken in blocks of :data:`PREFIX_BLOCK`; a lower-triangular ones matrix
    times each block gives the counts within it, and the blocks' totals are counted the
    same way (recursively) and added. Exact: every product and partial sum is an integer
    below 2**24 in f32 (N < 16.7M). On XLA:CPU a cumulative sum over 131,072 rows
    compiles into ~11 reduce-window kernels (0.3-0.5 s of compile each time, ~20 of them
    per UNet); this is a few dots and adds: about half the compile and 2.5x faster at
    [131072, 27] (docs/benchmarks.md, "Train-step compile time").
    """
    n = mask.shape[0]
    x = mask.reshape(n, -1).astype(jnp.float32)
    b = PREFIX_BLOCK
    nb = -(-n // b)
    if nb * b != n:
        x = jnp.pad(x, ((0, nb * b - n), (0, 0)))
    i = jax.lax.broadcasted_iota(jnp.int32, (b, b), 0)
    lower = (i >= i.T).astype(jnp.float32)
    within = jnp.einsum(
        "ij,njk->nik", lower, x.reshape(nb, b, -1), precision=jax.lax.Precision.HIGHEST
    )
    if nb > 1:
        totals = within[:, -1, :]
        within = within + (prefix_count(totals) - totals.astype(jnp.int32))[:, None, :]
    return within.reshape(nb * b, -1)[:n].astype(jnp.int32).reshape(mask.shape)


def unique_rows(coords: Array, valid: Array, *, capacity: int, box: Bounds | None = None):
    """Unique rows of ``coords: i32[N, 4]`` among ``valid: bool[N]`` in a static capacity.

    ``box``: the valid rows' :class:`Bounds` when known (saves the reductions).

    Returns:
      ucoords: i32[U, 4] unique rows sorted lexicographically (U = capacity); padded rows
        are ``(b_pad, 0, 0, 0)`` with b_pad = 1 + the largest real batch index.
      uvalid: bool[U] real unique rows.
      inverse: i32[N] unique row of each input row (U for invalid rows or rows whose
        unique row did not fit the capacity).
      count: i32[] number of unique rows (may exceed U).
      overflow: bool[] key frame overflow or count > U.
    """
    coords = jnp.asarray(coords, jnp.int32)
    n = coords.shape[0]
    u = int(capacity)
    box = bounds(coords, valid) if box is None else box
    frame = key_frame(coords, valid, margin=0, box=box)
    keys = pack_keys(frame, coords, valid)
    order = jnp.argsort(keys).astype(jnp.int32)
    sk = keys[order]
    real = sk != SENTINEL_KEY
    new = real & jnp.concatenate([jnp.ones((1,), bool), sk[1:] != sk[:-1]])
    rank = prefix_count(new) - 1
    count = rank[-1] + 1  # = sum(new), without another reduction
    inv_sorted = jnp.where(real & (rank < u), rank, u)
    inverse = jnp.zeros((n,), jnp.int32).at[order].set(inv_sorted)
    first = jnp.where(new & (rank < u), rank, u)
    ucoords = jnp.zeros((u, 4), jnp.int32).at[first].set(coords[order], mode="drop")
    uvalid = jnp.arange(u) < count
    pad_b = jnp.where(count > 0, box.hi[0] + 1, 0)
    pad_row = jnp.zeros((4,), jnp.int32).at[0].set(pad_b)
    ucoords = jnp.where(uvalid[:, None], ucoords, pad_row)
    return ucoords, uvalid, inverse, count, frame.overflow | (count > u)


# ---------------------------------------------------------------------------- tiles


def default_tile_rows(num_pairs: int) -> int:
    """Tile height for ~``num_pairs`` pairs: large enough for an efficient matmul, small
    enough that per-offset padding (< offsets * T rows) stays a few percent (T is about
    1/1024 to 1/512 of the pairs). At least 32 rows: every tile carries its own ``[Cin,
    Cout]`` weight, which must not cost more than the tile's rows at the UNet's widths (up
    to 224). At most 4096 (``conv.STEP_ROWS``: one tile per step of the CPU loop, a plain
    2-D matmul). The cap was 1024: on a 158k-voxel room (2M pairs) tiles of 2048 rows
    made the CPU conv's forward+backward 1.6x faster (docs/benchmarks.md)."""
    t = 2 ** max(5, int(math.floor(math.log2(max(num_pairs, 1) / 1024.0 + 1e-9))) + 1)
    return int(min(4096, t))


def build_tiles(
    table: Array, num_cols: int, *, num_tiles: int, tile_rows: int, complete: bool = False
) -> Tiles:
    """Compact the existing entries of ``table: i32[V, K]`` (entry < ``num_cols``) into
    ``num_tiles`` tiles of ``tile_rows`` rows, sorted by column k then row. ``complete``
    (static) asserts that ``num_tiles`` covers every possible entry."""
    (tiles,) = build_level_tiles(
        table,
        table < num_cols,
        [table.shape[0]],
        [num_cols],
        num_tiles=[num_tiles],
        tile_rows=[tile_rows],
        complete=[complete],
    )
    return tiles


def _segment_of(index: Array, starts) -> Array:
    """i32[...] segment of each ``index`` for the static segment starts ``starts`` (the
    first is 0): how many of ``starts[1:]`` are <= index."""
    bounds_ = jnp.asarray(np.asarray(starts[1:], np.int32))
    if bounds_.shape[0] == 0:
        return jnp.zeros(index.shape, jnp.int32)
    return jnp.sum(index[..., None] >= bounds_, axis=-1, dtype=jnp.int32)


def _per_row(values, rows) -> Array:
    """i32[sum(rows)] ``values[l]`` on each of the ``rows[l]`` rows of segment ``l``
    (computed from the row index: no constant with one entry per row in the program)."""
    starts = np.concatenate([[0], np.cumsum(rows)[:-1]])
    seg = _segment_of(jnp.arange(int(np.sum(rows)), dtype=jnp.int32), starts)
    return jnp.asarray(np.asarray(values, np.int32))[seg]


def build_level_tiles(
    table: Array,
    mask: Array,
    rows: list[int],
    num_cols: list[int],
    *,
    num_tiles: list[int],
    tile_rows: list[int],
    complete: list[bool],
) -> list[Tiles]:
    """:func:`build_tiles` of several tables stacked along the rows, in one pass.

    ``table: i32[sum(rows), K]`` is the row-wise concatenation of one table per level
    (``rows[l]`` rows each, entries in that level's own column space); ``mask: bool[...,
    K]`` marks its existing entries. Level ``l`` gets ``num_tiles[l]`` tiles of
    ``tile_rows[l]`` rows with its own row / column sentinels ``rows[l]`` / ``num_cols[l]``,
    exactly as :func:`build_tiles` of its table alone. One running count and one scatter
    serve every level: on XLA:CPU each distinct kernel costs compile time, and a UNet's
    seven levels would otherwise compile seven copies of the same steps."""
    num_rows, num_k = table.shape
    nl = len(rows)
    row_start = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
    caps = np.asarray(num_tiles, np.int64) * np.asarray(tile_rows, np.int64)
    out_start = np.concatenate([[0], np.cumsum(caps)]).astype(np.int64)
    total = int(out_start[-1])
    # One running count: the rank of each entry within its column, and (at each level's
    # last row) the counts, so no reduction is compiled for them.
    count = prefix_count(mask)  # [S, K] inclusive
    ends = count[row_start[1:] - 1]  # [L, K] counts up to each level's last row
    starts = jnp.concatenate([jnp.zeros((1, num_k), jnp.int32), ends[:-1]], axis=0)
    n_k = ends - starts  # [L, K] entries per level and column
    t = jnp.asarray(np.asarray(tile_rows, np.int32))[:, None]
    padded = (n_k + t - 1) // t  # tiles per level and offset
    # Inclusive prefix sum over the K offsets as a masked sum (K <= 27).
    upto = jnp.arange(num_k)[:, None] >= jnp.arange(num_k)[None, :]
    tile_end = jnp.sum(
        jnp.where(upto[None], padded[:, None, :], 0), axis=2, dtype=jnp.int32
    )  # [L, K]
    tile_start = tile_end - padded
    row_ids = jnp.arange(num_rows, dtype=jnp.int32)
    lev = _segment_of(row_ids, row_start[:-1])  # [S] level of each row
    rank = count - 1 - starts[lev]  # [S, K] rank within the level's column
    pos = tile_start[lev] * t[lev] + rank
    cap_row = jnp.asarray(caps.astype(np.int32))[lev][:, None]
    pos = jnp.where(
        mask & (pos < cap_row),
        pos + jnp.asarray(out_start[:-1].astype(np.int32))[lev][:, None],
        total,
    )
    local_row = row_ids - jnp.asarray(row_start[:-1].astype(np.int32))[lev]
    pairs = jnp.stack([jnp.broadcast_to(local_row[:, None], table.shape), table], axis=-1)
    placed = (
        jnp.full((total, 2), -1, jnp.int32).at[pos.ravel()].set(pairs.reshape(-1, 2), mode="drop")
    )
    out = []
    for lvl in range(nl):
        seg = placed[int(out_start[lvl]) : int(out_start[lvl + 1])]
        hit = seg[:, 0] >= 0
        tile_ids = jnp.arange(num_tiles[lvl], dtype=jnp.int32)
        tile_k = jnp.sum(tile_end[lvl][None, :] <= tile_ids[:, None], axis=1, dtype=jnp.int32)
        out.append(
            Tiles(
                row=jnp.where(hit, seg[:, 0], rows[lvl]),
                col=jnp.where(hit, seg[:, 1], num_cols[lvl]),
                tile_k=jnp.minimum(tile_k, num_k - 1),
                ok=tile_end[lvl, -1] <= num_tiles[lvl],
                used=jnp.minimum(tile_end[lvl, -1], num_tiles[lvl]).astype(jnp.int32),
                complete=bool(complete[lvl]),
            )
        )
    return out


def num_tiles_for(num_pairs: int, num_offsets: int, tile_rows: int) -> int:
    """Tiles needed for up to ``num_pairs`` pairs over ``num_offsets`` offsets (worst-case
    padding of each offset's run)."""
    return int(math.ceil(num_pairs / tile_rows)) + num_offsets


# ------------------------------------------------------------------------- kernel maps


def _neighbour_table(
    frame: KeyFrame, coords: Array, valid: Array, base: Array | None = None
) -> Array:
    """i32[V, 27] submanifold neighbour table (sentinel V) of the valid rows.

    Several levels at once: ``frame`` with one frame per row (``origin, extent: i32[V,
    4]``) and ``base: u32[V]`` the first key of each row's level (levels' key ranges
    disjoint): neighbours are then found within each row's own level only.

    Searched in key order: the keys are sorted once, and with the frame's margin the
    neighbour at ``(dx, dy, dz)`` of a valid row has key ``key + dx EY EZ + dy EZ + dz``.
    One binary search per ``(dx, dy)`` column (9, all in one ``searchsorted``) finds where
    ``key + dx EY EZ + dy EZ`` would sit; the ``dz = -1, 0, +1`` neighbours are then the
    entries just before, at, and just after that place, since keys are unique integers.
    The queries of a column, made in key order, are themselves sorted, so consecutive
    searches walk the same path (cache-friendly). The table is then permuted back to the
    rows' own order. Against 13 searches in row order and a mirroring scatter: 2.8x
    faster on a 159k-voxel room, and fewer kernels to compile (docs/benchmarks.md).
    """
    v = coords.shape[0]
    keys = pack_keys(frame, coords, valid)
    if base is not None:
        keys = jnp.where(keys == SENTINEL_KEY, SENTINEL_KEY, keys + base)
    # The keys sorted, and each row's place among them by a search (valid rows have
    # distinct keys; padded rows all land on the first sentinel, which is never a hit):
    # on XLA:CPU a plain sort plus a search is ~4x faster than an argsort.
    sk = jnp.sort(keys)
    rank = jnp.searchsorted(sk, keys, method="scan").astype(jnp.int32)  # row -> place
    order = jnp.zeros((v,), jnp.int32).at[rank].set(jnp.arange(v, dtype=jnp.int32))
    real = sk != SENTINEL_KEY  # valid rows, a prefix of the sorted order
    e = frame.extent.astype(jnp.uint32)
    # [4, V] the sorted rows' own frames, or [4, 1] one frame for all.
    e = e[order].T if e.ndim == 2 else e[:, None]

    # -1, 0, +1 as two's-complement uint32: products and sums wrap modulo 2**32, so the
    # results are exact key differences wherever the true key is in range (valid rows).
    def u32(values):
        return jax.lax.bitcast_convert_type(jnp.asarray(np.array(values, np.int32)), jnp.uint32)

    g = np.array([(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1)], np.int32)  # [9, 2]
    # Key step of each column: [9, 1], or [9, V] with one frame per row.
    step = u32(g[:, 0])[:, None] * (e[2] * e[3]) + u32(g[:, 1])[:, None] * e[3]
    q = sk[None, :] + step  # [9, V]; each row sorted (valid prefix)
    # One search for all columns (one loop to compile), column after column.
    p = jnp.searchsorted(sk, q.ravel(), method="scan").astype(jnp.int32).reshape(9, v)
    last = v - 1
    at = (sk[jnp.minimum(p, last)] == q).astype(jnp.int32)
    # dz = -1, 0, +1: just before, at, just after the place of the dz = 0 key.
    cand = jnp.stack([p - 1, p, p + at], axis=1)  # [9, 3, V]
    cand = jnp.clip(cand, 0, last)
    target = q[:, None, :] + u32([-1, 0, 1])[None, :, None]
    hit = real[None, None, :] & (sk[cand] == target)
    pos = jnp.where(hit, cand, v).reshape(27, v)  # offset k = 3 (column) + dz + 1
    nbr_sorted = jnp.where(pos < v, order[jnp.minimum(pos, last)], v)  # [27, V]
    return nbr_sorted[:, rank].T


def subm_map(
    coords: Array,
    valid: Array,
    *,
    pairs_per_voxel: float | None = 16.0,
    tile_rows: int | None = None,
    box: Bounds | None = None,
) -> SubmMap:
    """Submanifold 3x3x3 neighbour table of ``coords: i32[V, 4]`` (rows ``valid: bool[V]``).

    Args:
      coords: i32[V, 4] unique rows (b, x, y, z) among valid rows, any order.
      valid: bool[V] real rows.
      pairs_per_voxel: tile capacity in off-centre pairs per row (a room at 2 cm has
        ~12 of 26); >= 26 holds every possible pair (``tiles.complete``: no fallback
        ever). None builds no tiles (dense per-offset / Pallas path only).
      tile_rows: tile height T (default from the capacity).
      box: the valid rows' :class:`Bounds` when known (saves the reductions).
    Returns:
      SubmMap with nbr i32[V, 27] (sentinel V).
    """
    coords = jnp.asarray(coords, jnp.int32)
    valid = jnp.asarray(valid, bool)
    v = coords.shape[0]
    frame = key_frame(coords, valid, box=box)
    nbr = _neighbour_table(frame, coords, valid)
    tiles = None
    if pairs_per_voxel is not None:
        # The centre offset (the identity on valid rows) is no pair of the tiles: the
        # convolution applies it as one plain matmul.
        off_centre = nbr.at[:, CENTER].set(v)
        num_tiles, t, complete = _subm_tile_spec(pairs_per_voxel, v, tile_rows)
        tiles = build_tiles(off_centre, v, num_tiles=num_tiles, tile_rows=t, complete=complete)
    return SubmMap(nbr=nbr, tiles=tiles, overflow=frame.overflow)


def _subm_tile_spec(pairs_per_voxel: float, rows: int, tile_rows: int | None = None):
    """(num_tiles, tile_rows, complete) of a submanifold map's tiles: room for
    ``pairs_per_voxel`` off-centre pairs per row (>= 26: every possible pair)."""
    pairs = int(math.ceil(min(pairs_per_voxel, 26.0) * rows))
    t = tile_rows or default_tile_rows(pairs)
    return num_tiles_for(pairs, 26, t), t, pairs_per_voxel >= 26.0


def down_map(
    coords: Array,
    valid: Array,
    *,
    capacity: int | None = None,
    tile_rows: int | None = None,
    box: Bounds | None = None,
) -> DownMap:
    """Kernel-2 stride-2 map of ``coords: i32[V, 4]`` to its coarse set.

    Coarse rows are ``(b, x//2, y//2, z//2)`` (floor division), unique, sorted
    lexicographically, in a static ``capacity`` (default V; coarse count <= fine count).
    ``box``: the fine valid rows' :class:`Bounds` when known (saves the reductions).
    """
    coords = jnp.asarray(coords, jnp.int32)
    valid = jnp.asarray(valid, bool)
    v = coords.shape[0]
    vc = v if capacity is None else int(capacity)
    coarse = parent_coords(coords)
    child = child_offset(coords)
    cbox = None if box is None else box.halve()
    ccoords, cvalid, parent, count, overflow = unique_rows(coarse, valid, capacity=vc, box=cbox)
    table = _child_table(child, parent, vc)
    t = tile_rows or default_tile_rows(v)
    # One pair per fine voxel: the capacity always suffices.
    tiles = build_tiles(table, vc, num_tiles=num_tiles_for(v, 8, t), tile_rows=t, complete=True)
    return DownMap(
        coords=ccoords,
        valid=cvalid,
        parent=parent,
        child=child,
        tiles=tiles,
        count=count,
        overflow=overflow,
    )


def _child_table(child: Array, parent: Array, num_coarse: int) -> Array:
    hit = (jnp.arange(8, dtype=jnp.int32)[None, :] == child[:, None]) & (
        parent[:, None] < num_coarse
    )
    return jnp.where(hit, parent[:, None], num_coarse)


def match_down_map(
    coords: Array,
    valid: Array,
    coarse_coords: Array,
    coarse_valid: Array,
    *,
    tile_rows: int | None = None,
) -> DownMap:
    """Down map from ``coords: i32[V, 4]`` to a given coarse set ``coarse_coords:
    i32[Vc, 4]`` (unique rows, any order): each fine row's parent is the coarse row equal
    to ``(b, x//2, y//2, z//2)``, ``Vc`` when absent."""
    coords = jnp.asarray(coords, jnp.int32)
    coarse_coords = jnp.asarray(coarse_coords, jnp.int32)
    valid = jnp.asarray(valid, bool)
    coarse_valid = jnp.asarray(coarse_valid, bool)
    v, vc = coords.shape[0], coarse_coords.shape[0]
    up = parent_coords(coords)
    both = jnp.concatenate([coarse_coords, up], axis=0)
    frame = key_frame(both, jnp.concatenate([coarse_valid, valid]), margin=0)
    ckeys = pack_keys(frame, coarse_coords, coarse_valid)
    order = jnp.argsort(ckeys).astype(jnp.int32)
    parent = _lookup(ckeys[order], order, pack_keys(frame, up, valid), vc)
    child = child_offset(coords)
    t = tile_rows or default_tile_rows(v)
    tiles = build_tiles(
        _child_table(child, parent, vc),
        vc,
        num_tiles=num_tiles_for(v, 8, t),
        tile_rows=t,
        complete=True,
    )
    return DownMap(
        coords=coarse_coords,
        valid=coarse_valid,
        parent=parent,
        child=child,
        tiles=tiles,
        count=jnp.sum(coarse_valid, dtype=jnp.int32),
        overflow=frame.overflow,
    )


# ------------------------------------------------------------------- level pyramid


def _level_frames(box: Bounds, shift: Array, *, margin: int):
    """Frames of the stride-``2**shift`` parent sets of a set with ``box`` (one per entry
    of ``shift: i32[n]``), each level's first key ``base: u32[n]`` (its frame's cells after
    the previous levels'), and whether the levels' keys together overflow the key space."""
    boxes = Bounds(lo=parent_coords(box.lo[None], shift), hi=parent_coords(box.hi[None], shift))
    frame = key_frame(None, None, margin=margin, box=boxes)
    cells = frame.extent.astype(jnp.uint32)
    cells = cells[:, 0] * cells[:, 1] * cells[:, 2] * cells[:, 3]
    n = shift.shape[0]
    below = jnp.arange(n)[:, None] > jnp.arange(n)[None, :]
    base = jnp.sum(jnp.where(below, cells[None, :], jnp.uint32(0)), axis=1, dtype=jnp.uint32)
    return frame, base, jnp.sum(_frame_cells(boxes, margin)) > KEY_LIMIT


def coarse_levels(coords: Array, valid: Array, capacities: list[int], *, box: Bounds):
    """The stride-2, 4, ..., 2**n parent sets of ``coords: i32[V, 4]`` in one pass.

    Level ``j`` (1..n, ``n = len(capacities)``) holds the unique rows ``(b, x >> j, y >> j,
    z >> j)`` of the valid rows, sorted lexicographically, in ``capacities[j-1]`` rows,
    padded as :func:`unique_rows` pads; as a set it equals ``j`` successive halvings.
    All levels' keys sit in one sorted array, each level in its own key range (its frame's
    cells after the previous levels'), so one sort, one search, one running count and two
    scatters serve every level. ``box``: the valid rows' :class:`Bounds`.

    Returns:
      levels: per level ``(coords i32[U_j, 4], valid bool[U_j], count i32[], overflow
        bool[])`` with ``count`` the level's unique rows (may exceed ``U_j``) and
        ``overflow`` the key space of all levels overflowed or ``count > U_j``.
      parents: per level ``j`` = 0..n-1, i32[U_j] the row of level ``j + 1`` holding each
        row's parent (``U_{j+1}`` for padded rows or parents past the capacity), with
        ``U_0 = V``.
    """
    coords = jnp.asarray(coords, jnp.int32)
    valid = jnp.asarray(valid, bool)
    v, n = coords.shape[0], len(capacities)
    caps = np.asarray(capacities, np.int32)
    shift = jnp.arange(1, n + 1, dtype=jnp.int32)
    frame, base, key_overflow = _level_frames(box, shift, margin=0)
    up = parent_coords(coords[None], shift[:, None])  # [n, V, 4]
    keys = pack_keys(
        KeyFrame(origin=frame.origin[:, None], extent=frame.extent[:, None], overflow=None),
        up,
        valid[None],
    )
    keys = jnp.where(keys == SENTINEL_KEY, SENTINEL_KEY, keys + base[:, None]).ravel()
    # A plain sort of the keys and one search per row instead of an argsort: on XLA:CPU
    # sorting (key, index) pairs took 220 ms for 786k keys, the keys alone 32 ms and the
    # search 22 ms.
    sk = jnp.sort(keys)
    real = sk != SENTINEL_KEY
    new = real & jnp.concatenate([jnp.ones((1,), bool), sk[1:] != sk[:-1]])
    count = prefix_count(new)  # [n V] inclusive
    # Every valid row has one key per level and the levels' key ranges are ordered, so
    # level j's keys are the sorted positions [(j-1) m, j m) with m valid rows.
    m = jnp.sum(valid, dtype=jnp.int32)
    at = jnp.arange(n + 1, dtype=jnp.int32) * m - 1
    upto = jnp.where(at >= 0, count[jnp.maximum(at, 0)], 0)  # [n + 1] new keys before
    counts = upto[1:] - upto[:-1]  # [n]
    first = jnp.searchsorted(sk, keys, method="scan").astype(jnp.int32)  # first equal key
    rank = (count[first] - 1).reshape(n, v) - upto[:-1, None]  # [n, V] row in its level
    cap = jnp.asarray(caps)[:, None]
    kept = (keys != SENTINEL_KEY).reshape(n, v) & (rank < cap)
    inverse = jnp.where(kept, rank, cap)  # inverse[j - 1, i]: row of level j holding row i
    start = np.concatenate([[0], np.cumsum(caps)]).astype(np.int32)
    # Rows under one parent write the same coordinates to its row.
    target = jnp.where(kept, rank + jnp.asarray(start[:-1])[:, None], int(start[-1]))
    ucoords = (
        jnp.zeros((int(start[-1]), 4), jnp.int32)
        .at[target.ravel()]
        .set(up.reshape(-1, 4), mode="drop")
    )
    # Parent of each row of level j (j >= 1): the level-(j+1) row of any input row under it.
    plevels = n - 1
    if plevels > 0:
        pstart = start[:plevels]
        target = jnp.where(
            inverse[:-1] < jnp.asarray(caps[:-1])[:, None],
            inverse[:-1] + jnp.asarray(pstart)[:, None],
            int(start[plevels]),
        )
        pcat = (
            jnp.zeros((int(start[plevels]),), jnp.int32)
            .at[target.ravel()]
            .set(inverse[1:].ravel(), mode="drop")
        )
    levels, parents = [], [inverse[0]]
    for j in range(n):
        uvalid = jnp.arange(caps[j]) < counts[j]
        pad_b = jnp.where(counts[j] > 0, box.hi[0] + 1, 0)
        pad_row = jnp.zeros((4,), jnp.int32).at[0].set(pad_b)
        u = jnp.where(uvalid[:, None], ucoords[start[j] : start[j + 1]], pad_row)
        levels.append((u, uvalid, counts[j], key_overflow | (counts[j] > caps[j])))
        if j + 1 < n:
            parents.append(jnp.where(uvalid, pcat[start[j] : start[j + 1]], caps[j + 1]))
    return levels, parents


def level_maps(
    coords: Array,
    valid: Array,
    capacities: list[int],
    *,
    pairs_per_voxel: list[float | None],
    box: Bounds | None = None,
) -> tuple[list[SubmMap], list[DownMap]]:
    """The kernel maps of a UNet's levels: :func:`subm_map` of every level and
    :func:`down_map` between consecutive levels, built in one pass over all levels.

    Level 0 is ``coords: i32[V, 4]`` (``valid: bool[V]``, ``V = capacities[0]``); level
    ``l`` holds the stride-``2**l`` parents in ``capacities[l]`` rows. Same maps as the
    chain ``down_map`` -> ``subm_map`` level by level (tested), as long as no level
    overflows its capacity (then outputs are poisoned in both). ``pairs_per_voxel[l]``: the
    level's tile capacity, as in :func:`subm_map` (each level's tiles are sized for its
    own rows and pairs).

    Why: XLA:CPU compiles one kernel per distinct operation and shape, and the maps of
    seven levels of different sizes compiled seven copies of every step (~7 s of a train
    step's compile). Here the coarse sets come from one sort, the neighbour tables of all
    coarse levels from one search over their concatenation (keys in disjoint ranges), and
    the tiles of all levels from one running count and one scatter.
    """
    coords = jnp.asarray(coords, jnp.int32)
    valid = jnp.asarray(valid, bool)
    caps = [int(c) for c in capacities]
    nl = len(caps)
    assert caps[0] == coords.shape[0], (caps, coords.shape)
    box = bounds(coords, valid) if box is None else box
    coarse, parents = coarse_levels(coords, valid, caps[1:], box=box) if nl > 1 else ([], [])
    lcoords = [coords] + [c for c, _, _, _ in coarse]
    lvalid = [valid] + [u for _, u, _, _ in coarse]

    # Submanifold tables: level 0 alone (its frame is the budget checked on the host), the
    # coarse levels concatenated with one frame and key range per level.
    frame0 = key_frame(coords, valid, box=box)
    tables = [_neighbour_table(frame0, coords, valid)]
    overflow = [frame0.overflow]
    if nl > 1:
        frames, base, coarse_over = _level_frames(box, jnp.arange(1, nl, dtype=jnp.int32), margin=1)
        lev = _per_row(np.arange(nl - 1), caps[1:])  # coarse level of each row
        row_frame = KeyFrame(
            origin=frames.origin[lev], extent=frames.extent[lev], overflow=coarse_over
        )
        cat = _neighbour_table(
            row_frame, jnp.concatenate(lcoords[1:]), jnp.concatenate(lvalid[1:]), base[lev]
        )
        s = cat.shape[0]
        start = np.concatenate([[0], np.cumsum(caps[1:])])
        for j in range(1, nl):
            t = cat[start[j - 1] : start[j]]
            tables.append(jnp.where(t < s, t - start[j - 1], caps[j]))
            overflow.append(coarse_over)

    # Tiles: one pass for the submanifold tables (off-centre entries), one for the down maps.
    subm_tiles = [None] * nl
    tiled = [lvl for lvl in range(nl) if pairs_per_voxel[lvl] is not None]
    if tiled:
        spec = [_subm_tile_spec(pairs_per_voxel[lvl], caps[lvl]) for lvl in tiled]
        rows = [caps[lvl] for lvl in tiled]
        table = jnp.concatenate([tables[lvl] for lvl in tiled])
        mask = (table < _per_row(rows, rows)[:, None]) & (jnp.arange(27) != CENTER)[None, :]
        built = build_level_tiles(
            table,
            mask,
            rows,
            rows,
            num_tiles=[a for a, _, _ in spec],
            tile_rows=[b for _, b, _ in spec],
            complete=[c for _, _, c in spec],
        )
        for lvl, tl in zip(tiled, built, strict=True):
            subm_tiles[lvl] = tl
    subms = [
        SubmMap(nbr=tables[lvl], tiles=subm_tiles[lvl], overflow=overflow[lvl]) for lvl in range(nl)
    ]
    downs = []
    if nl > 1:
        fine = jnp.concatenate(lcoords[:-1])
        child = child_offset(fine)
        parent = jnp.concatenate(parents)
        fvalid = jnp.concatenate(lvalid[:-1])
        next_cap = _per_row(caps[1:], caps[:-1])
        hit = (jnp.arange(8, dtype=jnp.int32)[None, :] == child[:, None]) & (
            fvalid & (parent < next_cap)
        )[:, None]
        table = jnp.where(hit, parent[:, None], next_cap[:, None])
        spec = [default_tile_rows(c) for c in caps[:-1]]
        built = build_level_tiles(
            table,
            hit,
            caps[:-1],
            caps[1:],
            num_tiles=[num_tiles_for(c, 8, t) for c, t in zip(caps[:-1], spec, strict=True)],
            tile_rows=spec,
            complete=[True] * (nl - 1),
        )
        fstart = np.concatenate([[0], np.cumsum(caps[:-1])])
        for lvl in range(nl - 1):
            c, u, cnt, over = coarse[lvl]
            downs.append(
                DownMap(
                    coords=c,
                    valid=u,
                    parent=parents[lvl],
                    child=child[fstart[lvl] : fstart[lvl + 1]],
                    tiles=built[lvl],
                    count=cnt,
                    overflow=over,
                )
            )
    return subms, downs

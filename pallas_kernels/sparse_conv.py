"""Fused gather-matmul over a neighbour table: the GPU path of the sparse convolutions.

Place in the data flow: ``dknet_jax/sparse/conv.py`` builds kernel maps (a neighbour table
``nbr: i32[V, K]`` per convolution) and, when the Pallas path is selected, calls
:func:`gather_matmul` instead of the XLA gather-GEMM-scatter. The op is

    out[i] = sum_k feats[nbr[i, k]] @ weight[k]          (missing neighbours add nothing)

i.e. an implicit GEMM: the ``[V, K, Cin]`` tensor of gathered rows is never built. The
Triton kernel walks a grid of ``block_rows`` output rows (x ``block_cout`` output
channels); one loop over (offset k, input-channel chunk) steps gathers the block's
neighbour rows of ``feats`` (one ``block_cin`` chunk, masked load), multiplies by that
chunk of ``weight[k]`` and accumulates in f32; the block is stored once.

Tile sizes: :func:`derive_block_sizes` picks them per (Cin, Cout, dtype, stages) so that
the modelled shared memory (:func:`smem_bytes`) stays under a budget (default: the
H100/H200 per-program limit less a margin). The model and its calibration are in
:func:`smem_bytes`; ``scripts/triton_smem.py`` checks every UNet shape against an offline
Triton compile for sm_90.

Backward (``jax.custom_vjp``):
- d_weight[k] = sum_i feats[nbr[i, k]]^T g[i], one offset at a time (jnp, ``lax.map``).
- d_feats with ``mirrored=True`` (a submanifold table whose offset k mirrors K-1-k) is the
  same kernel again, gathers only: ``gather_matmul(g, nbr, W')`` with W'[k] = W[K-1-k]^T.
  With ``mirrored=False`` it is a scatter-add (``.at[].add``) per offset.

:func:`gather_matmul_reference` is the plain-jnp definition (gathers ``[V, K, Cin]``);
tests compare both with a brute-force numpy loop, on CPU with ``interpret=True``.

Backend: passing ``plgpu.CompilerParams`` (Triton) selects Pallas' Triton backend even where
the default GPU backend is Mosaic GPU. JAX 0.11 deprecates the Triton backend (still
present); a Mosaic GPU port is the way forward once it is removed. f32 dots use Triton's
default precision (TF32 on Ampere+), like XLA's default f32 matmuls on GPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Triton's dot needs every operand dimension >= 16; block dims must be powers of two.
_MIN_DIM = 16


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the kernel (all powers of two, >= 16).

    Attributes:
      block_rows: output rows per program (the M of each per-offset matmul).
      block_cin: input channels per chunk of the per-offset matmul (the contraction dim);
        the padded Cin is a multiple of it, chunks are a static loop inside the kernel.
      block_cout: output channels per program (second grid axis).
      num_warps: Triton warps per program.
      num_stages: Triton software-pipelining stages of the offset loop.
    """

    block_rows: int
    block_cin: int
    block_cout: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_rows", "block_cin", "block_cout"):
            v = getattr(self, name)
            if v < _MIN_DIM or v & (v - 1):
                raise ValueError(
                    f"BlockSizes.{name}={v}: must be a power of two >= {_MIN_DIM} "
                    "(Triton block dims and dot operands)."
                )


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def padded_channels(c: int) -> int:
    """Channel count the kernel works with: next power of two, at least 16."""
    return max(_MIN_DIM, _next_pow2(c))


# Shared memory one Triton program may use on an H100 / H200 (sm_90): 227 KiB, the
# "available" of the H200's "Shared memory size limit exceeded" error.
SMEM_LIMIT_SM90 = 232_448
# What derive_block_sizes aims under by default: the limit less 8 KiB for what the model
# does not see (a Triton version's extra scratch, barriers).
DEFAULT_SMEM_BUDGET = SMEM_LIMIT_SM90 - 8192
# Fixed shared memory of every program in the model (barriers, small reduction scratch).
_SMEM_FIXED = 1024


def smem_bytes(blocks: BlockSizes, dtype=jnp.float32, *, resident_chunks: int = 1) -> int:
    """Modelled shared memory (bytes) of one program of the gather-matmul kernel.

    The kernel's loop body loads two operand tiles per step, the gathered feats rows
    ``[block_rows, block_cin]`` and the weight chunk ``[block_cin, block_cout]``, and
    feeds them to a dot. Triton's software pipeliner stages such loads through shared
    memory, one buffer per pipeline stage: ``num_stages`` copies of both tiles (at least
    one: with ``num_stages=1`` the dot operands still pass through shared memory). The
    f32 accumulator ``[block_rows, block_cout]`` lives in registers, but converting the
    MMA result to the store's layout goes through shared memory; the model charges the
    whole tile (measured extras were half of it or less). Plus ``_SMEM_FIXED`` bytes::

        smem = max(1, num_stages) * resident_chunks * (br*bc + bc*bo) * itemsize
               + br * bo * 4 + 1024

    ``resident_chunks``: input-channel chunks whose tiles are live in one step. It is 1
    for this kernel (one loop over (offset, chunk) steps). The first version unrolled the
    chunks inside the offset loop (``Cin_p / block_cin`` chunks resident), and that is what
    the model was calibrated on: on an H200 the UNet asked for 294,912 bytes with blocks
    (128, 64, 128) and 409,600 bytes with (128, 64, 64), f32, 2 stages; the model gives
    more than both for the UNet shapes that can have produced them (tests). For the
    current layout, offline Triton 3.9 compiles for sm_90 (``scripts/triton_smem.py``)
    stay under the model for every UNet shape (numbers in docs/benchmarks.md).
    """
    item = jnp.dtype(dtype).itemsize
    br, bc, bo = blocks.block_rows, blocks.block_cin, blocks.block_cout
    operands = (br * bc + bc * bo) * item * resident_chunks
    return max(1, blocks.num_stages) * operands + br * bo * 4 + _SMEM_FIXED


def derive_block_sizes(
    num_rows: int,
    cin: int,
    cout: int,
    dtype=jnp.float32,
    *,
    num_stages: int = 2,
    smem_budget: int = DEFAULT_SMEM_BUDGET,
) -> BlockSizes:
    """The largest tiles for a Cin -> Cout weight whose :func:`smem_bytes` fits the budget.

    Start from 128 rows (fewer, down to 16, for tiny inputs so padding stays small), a
    64-channel contraction chunk and 128 output channels, each capped at the padded
    size; while over ``smem_budget`` halve, in this order, the contraction chunk to 32,
    the output block to 64, the rows to 64, then chunk 16, output 32, rows 32, output 16,
    rows 16. A smaller chunk only adds loop steps; a smaller output block re-gathers the
    rows once more per extra program; fewer rows re-load the weight more often.

    Args:
      num_rows: output rows of the call (V_out).
      cin, cout: channels of the weight (padded to :func:`padded_channels`).
      dtype: dtype of feats and weight (the accumulator is f32 whatever it is).
      num_stages: Triton pipeline stages (>= 1).
      smem_budget: bytes one program may use (default: the sm_90 limit less 8 KiB).

    Raises:
      ValueError: when even 16 x 16 x 16 tiles exceed the budget.
    """
    if num_stages < 1:
        raise ValueError(f"derive_block_sizes: num_stages={num_stages} must be >= 1.")
    cin_p, cout_p = padded_channels(cin), padded_channels(cout)
    dims = {
        "rows": min(128, max(_MIN_DIM, _next_pow2(num_rows))),
        "cin": min(cin_p, 64),
        "cout": min(cout_p, 128),
    }
    shrink = [("cin", 32), ("cout", 64), ("rows", 64), ("cin", 16)]
    shrink += [("cout", 32), ("rows", 32), ("cout", 16), ("rows", 16)]

    def make():
        warps = 8 if dims["rows"] * dims["cout"] >= 128 * 128 else 4
        return BlockSizes(dims["rows"], dims["cin"], dims["cout"], warps, num_stages)

    blocks = make()
    for name, floor in shrink:
        while smem_bytes(blocks, dtype) > smem_budget and dims[name] > floor:
            dims[name] //= 2
            blocks = make()
    if smem_bytes(blocks, dtype) > smem_budget:
        raise ValueError(
            f"derive_block_sizes: even {blocks} needs {smem_bytes(blocks, dtype)} bytes of "
            f"shared memory for {cin}->{cout} {jnp.dtype(dtype).name}, over the budget "
            f"{smem_budget}; raise smem_budget or lower num_stages."
        )
    return blocks


def default_block_sizes(num_rows: int, cin: int, cout: int, dtype=jnp.float32) -> BlockSizes:
    """Tiles the kernel uses by default: :func:`derive_block_sizes` with 2 stages and
    :data:`DEFAULT_SMEM_BUDGET` (fits an H100 / H200 program)."""
    return derive_block_sizes(num_rows, cin, cout, dtype)


def gather_matmul_reference(feats: jax.Array, nbr: jax.Array, weight: jax.Array) -> jax.Array:
    """Plain-jnp reference: out[i] = sum_k feats[nbr[i, k]] @ weight[k].

    Args:
      feats: f[V, Cin] input rows.
      nbr: i32[V_out, K] neighbour table; entries < 0 or >= V are missing (add nothing).
      weight: f[K, Cin, Cout].

    Returns:
      f[V_out, Cout] (materialises the gathered f[V_out, K, Cin]).
    """
    num_in = feats.shape[0]
    idx = jnp.where((nbr >= 0) & (nbr < num_in), nbr, num_in)  # sentinel -> fill 0
    gathered = jnp.take(feats, idx, axis=0, mode="fill", fill_value=0)
    out = jnp.einsum("vkc,kcd->vd", gathered, weight, preferred_element_type=jnp.float32)
    return out.astype(jnp.result_type(feats.dtype, weight.dtype))


def _gather_matmul_kernel(feats_ref, nbr_ref, w_ref, out_ref, *, num_in: int, blocks: BlockSizes):
    """One program: rows [i*br, (i+1)*br) x output channels [j*bo, (j+1)*bo).

    feats_ref: [V, Cin_p] whole; nbr_ref: [K, V_out_p] whole (offset-major, -1 padded);
    w_ref: [K, Cin_p, Cout_p] whole; out_ref: [br, bo] block.

    One loop over the K * (Cin_p / bc) (offset, input-channel chunk) steps, so Triton's
    software pipeliner keeps ``num_stages`` copies of ONE chunk's operand tiles in shared
    memory. (A static Python loop over the chunks inside the offset loop made every
    chunk's tiles resident at once: ``Cin_p / bc`` times the shared memory, which is what
    overflowed on the H200; see :func:`smem_bytes`.)
    """
    br, bc, bo = blocks.block_rows, blocks.block_cin, blocks.block_cout
    row0 = pl.program_id(0) * br
    col0 = pl.program_id(1) * bo
    num_offsets = nbr_ref.shape[0]
    num_chunks = feats_ref.shape[1] // bc

    def step(t, acc):
        # lax.div/rem (t >= 0): jnp's floor // and % do not lower to Triton here.
        k = lax.div(t, num_chunks)
        c0 = lax.rem(t, num_chunks) * bc
        idx = nbr_ref[k, pl.ds(row0, br)]  # i32[br]
        valid = (idx >= 0) & (idx < num_in)
        safe = jnp.where(valid, idx, 0)
        mask = jnp.broadcast_to(valid[:, None], (br, bc))
        cols = c0 + jnp.arange(bc, dtype=jnp.int32)
        # Gather: two broadcasting integer-array indices -> [br, bc] (masked rows 0).
        rows = plgpu.load(feats_ref.at[safe[:, None], cols[None, :]], mask=mask, other=0)
        w = w_ref[k, pl.ds(c0, bc), pl.ds(col0, bo)]  # [bc, bo]
        return acc + jnp.dot(rows, w, preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, num_offsets * num_chunks, step, jnp.zeros((br, bo), jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)


def _gather_matmul_impl(
    feats, nbr, weight, *, interpret: bool, block_rows: int | None = None, blocks=None
):
    """Pads to the tiles, runs the kernel, slices back. Shapes as gather_matmul.

    ``blocks`` None: :func:`default_block_sizes` for this call's shape and dtype. Given
    blocks have their channel tiles capped at the padded channels (powers of two, so they
    still divide them); ``block_rows`` overrides the rows."""
    num_in, cin = feats.shape
    num_out, num_k = nbr.shape
    cout = weight.shape[2]
    cin_p, cout_p = padded_channels(cin), padded_channels(cout)
    if blocks is None:
        blocks = default_block_sizes(num_out, cin, cout, feats.dtype)
    blocks = dataclasses.replace(
        blocks,
        block_cin=min(blocks.block_cin, cin_p),
        block_cout=min(blocks.block_cout, cout_p),
    )
    if block_rows is not None:
        blocks = dataclasses.replace(blocks, block_rows=block_rows)
    num_out_p = pl.cdiv(num_out, blocks.block_rows) * blocks.block_rows

    if cin_p != cin:
        feats = jnp.pad(feats, ((0, 0), (0, cin_p - cin)))
    if (cin_p, cout_p) != (cin, cout):
        weight = jnp.pad(weight, ((0, 0), (0, cin_p - cin), (0, cout_p - cout)))
    nbr_t = jnp.pad(
        nbr.astype(jnp.int32).T, ((0, 0), (0, num_out_p - num_out)), constant_values=-1
    )  # [K, V_out_p], offset-major: contiguous loads

    grid = (num_out_p // blocks.block_rows, cout_p // blocks.block_cout)
    kernel = functools.partial(_gather_matmul_kernel, num_in=num_in, blocks=blocks)
    out = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[
            pl.BlockSpec((num_in, cin_p), lambda i, j: (0, 0)),
            pl.BlockSpec((num_k, num_out_p), lambda i, j: (0, 0)),
            pl.BlockSpec((num_k, cin_p, cout_p), lambda i, j: (0, 0, 0)),
        ],
        out_specs=pl.BlockSpec((blocks.block_rows, blocks.block_cout), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((num_out_p, cout_p), feats.dtype),
        compiler_params=plgpu.CompilerParams(
            num_warps=blocks.num_warps, num_stages=blocks.num_stages
        ),
        interpret=interpret,
        name="sparse_gather_matmul",
    )(feats, nbr_t, weight)
    return out[:num_out, :cout]


def _weight_grad(feats, nbr, g):
    """d_weight f32[K, Cin, Cout] = per offset: feats[nbr[:, k]]^T @ g (no [V, K, Cin])."""
    num_in = feats.shape[0]
    idx = jnp.where((nbr >= 0) & (nbr < num_in), nbr, num_in)

    def one_offset(idx_k):
        rows = jnp.take(feats, idx_k, axis=0, mode="fill", fill_value=0)  # [V_out, Cin]
        return jnp.dot(rows.T, g, preferred_element_type=jnp.float32)

    return lax.map(one_offset, idx.T)


def _scatter_feats_grad(g, nbr, weight, num_in):
    """d_feats f32[V, Cin] for an arbitrary table: scatter-add g @ W[k]^T per offset."""
    idx = jnp.where((nbr >= 0) & (nbr < num_in), nbr, num_in)  # num_in: dropped

    def body(k, acc):
        contrib = jnp.dot(g, weight[k].T, preferred_element_type=jnp.float32)
        return acc.at[idx[:, k]].add(contrib, mode="drop")

    acc = jnp.zeros((num_in, weight.shape[1]), jnp.float32)
    return lax.fori_loop(0, nbr.shape[1], body, acc)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _gather_matmul_vjp(feats, nbr, weight, mirrored, interpret, block_rows, blocks):
    del mirrored
    return _gather_matmul_impl(
        feats, nbr, weight, interpret=interpret, block_rows=block_rows, blocks=blocks
    )


def _gm_fwd(feats, nbr, weight, mirrored, interpret, block_rows, blocks):
    out = _gather_matmul_vjp(feats, nbr, weight, mirrored, interpret, block_rows, blocks)
    return out, (feats, nbr, weight)


def _gm_bwd(mirrored, interpret, block_rows, blocks, res, g):
    feats, nbr, weight = res
    d_weight = _weight_grad(feats, nbr, g)
    if mirrored:
        w_mirror = jnp.flip(weight, axis=0).transpose(0, 2, 1)  # W'[k] = W[K-1-k]^T
        d_feats = _gather_matmul_impl(
            g, nbr, w_mirror, interpret=interpret, block_rows=block_rows, blocks=blocks
        )
    else:
        d_feats = _scatter_feats_grad(g, nbr, weight, feats.shape[0])
    return d_feats.astype(feats.dtype), None, d_weight.astype(weight.dtype)


_gather_matmul_vjp.defvjp(_gm_fwd, _gm_bwd)


def _check_inputs(feats, nbr, weight, mirrored, block_rows, blocks):
    if feats.ndim != 2:
        raise ValueError(f"gather_matmul: feats must be [V, Cin], got shape {feats.shape}.")
    if nbr.ndim != 2 or not jnp.issubdtype(nbr.dtype, jnp.integer):
        raise ValueError(
            f"gather_matmul: nbr must be an integer [V, K] table, got {nbr.dtype}{nbr.shape}."
        )
    if weight.ndim != 3 or weight.shape[0] != nbr.shape[1] or weight.shape[1] != feats.shape[1]:
        raise ValueError(
            f"gather_matmul: weight must be [K, Cin, Cout] = [{nbr.shape[1]}, "
            f"{feats.shape[1]}, Cout] to match nbr {nbr.shape} and feats {feats.shape}; "
            f"got {weight.shape}."
        )
    if mirrored and nbr.shape[0] != feats.shape[0]:
        raise ValueError(
            "gather_matmul: mirrored=True needs a square submanifold table (nbr rows == "
            f"feats rows), got nbr {nbr.shape} for feats {feats.shape}; pass mirrored=False."
        )
    if block_rows is not None and (block_rows < _MIN_DIM or block_rows & (block_rows - 1)):
        raise ValueError(
            f"gather_matmul: block_rows={block_rows} must be a power of two >= {_MIN_DIM}, "
            "or None for the default."
        )
    if blocks is not None and not isinstance(blocks, BlockSizes):
        raise ValueError(
            f"gather_matmul: blocks must be a BlockSizes or None (derived from the shape), "
            f"got {type(blocks).__name__}."
        )


@functools.partial(jax.jit, static_argnames=("mirrored", "interpret", "block_rows", "blocks"))
def gather_matmul(
    feats: jax.Array,
    nbr: jax.Array,
    weight: jax.Array,
    *,
    mirrored: bool = False,
    interpret: bool = False,
    block_rows: int | None = None,
    blocks: BlockSizes | None = None,
) -> jax.Array:
    """Fused gather-matmul: out[i] = sum_k feats[nbr[i, k]] @ weight[k] (Pallas/Triton).

    Args:
      feats: f[V, Cin] input rows.
      nbr: i32[V_out, K] neighbour table (V_out == V for a submanifold conv); entries
        < 0 or >= V are missing neighbours and add nothing.
      weight: f[K, Cin, Cout].
      mirrored: the table is a submanifold table whose offset k is the mirror of K-1-k
        (nbr[i, k] = j implies nbr[j, K-1-k] = i); the feats gradient then reuses this
        kernel (gathers only). False: scatter-add backward, any table.
      interpret: run the Pallas interpreter (CPU tests) instead of compiling for Triton.
      block_rows: output rows per program (power of two >= 16); None: from ``blocks``.
      blocks: tiles of the forward call and of the mirrored feats-gradient call (channel
        tiles capped at each call's padded channels); None derives each call's tiles from
        its shape and dtype (:func:`default_block_sizes`, within the sm_90 shared memory).

    Returns:
      f[V_out, Cout], dtype ``result_type(feats, weight)``, accumulated in f32.
      Differentiable w.r.t. feats and weight.
    """
    _check_inputs(feats, nbr, weight, mirrored, block_rows, blocks)
    dtype = jnp.result_type(feats.dtype, weight.dtype)
    feats, weight = feats.astype(dtype), weight.astype(dtype)
    if nbr.shape[0] == 0 or nbr.shape[1] == 0 or feats.shape[0] == 0:
        return jnp.zeros((nbr.shape[0], weight.shape[2]), dtype)
    nbr = nbr.astype(jnp.int32)
    return _gather_matmul_vjp(feats, nbr, weight, mirrored, interpret, block_rows, blocks)

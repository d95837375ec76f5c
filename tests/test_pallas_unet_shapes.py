"""Every sparse-conv shape of the configs' UNets through the Pallas gather-matmul.

The shapes come from the model (``subm_conv_shapes`` of the UNet each config builds),
checked against a list written out from the architecture by hand. For each kernel call
(forward Cin -> Cout and the mirrored feats gradient Cout -> Cin) the derived tiles must
be valid and within the sm_90 shared-memory budget of the model, and the forward +
gradient must lower through Pallas' Triton backend for ``cuda`` (done on a CPU: the
Triton IR is built, Triton itself compiles only on a GPU or offline with
``scripts/triton_smem.py``). A few shapes run in the Pallas interpreter against a numpy
pair loop.
"""

from __future__ import annotations

import importlib.util
import itertools
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dknet_jax.model.backbone import projection_shapes, subm_conv_shapes, unet_from_config
from pallas_kernels.sparse_conv import (
    DEFAULT_SMEM_BUDGET,
    default_block_sizes,
    derive_block_sizes,
    gather_matmul,
    padded_channels,
    smem_bytes,
)

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
CONFIG_NAMES = ("synthetic", "scannet", "s3dis")


def _config(name):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", CONFIGS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(None)


def _model_shapes(name):
    return subm_conv_shapes(unet_from_config(_config(name).model))


def _kernel_calls():
    """Unique (Cin, Cout) of the kernel over all configs: forward and mirrored backward."""
    calls = set()
    for name in CONFIG_NAMES:
        for cin, cout in _model_shapes(name):
            calls |= {(cin, cout), (cout, cin)}
    return sorted(calls)


KERNEL_CALLS = _kernel_calls()
FORWARD_SHAPES = sorted({s for name in CONFIG_NAMES for s in _model_shapes(name)})


def _by_hand(in_channels, widths, blocks):
    """The UNet's subm convs written out from docs/method.md: input conv; per level
    `blocks` residual blocks of two w -> w convs; per decoder level (all but the
    coarsest) a first block 2w -> w, w -> w and `blocks - 1` blocks of w -> w twice."""
    shapes = [(in_channels, widths[0])]
    for w in widths:
        shapes += [(w, w)] * (2 * blocks)
    for w in widths[:-1]:
        shapes += [(2 * w, w), (w, w)] + [(w, w)] * (2 * (blocks - 1))
    return sorted(shapes)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_conv_shapes_come_from_the_model(name):
    m = _config(name).model
    shapes = _model_shapes(name)
    assert sorted(shapes) == _by_hand(m.in_channels, tuple(m.widths), m.blocks_per_level)
    # 1x1 skip projections: only the decoders' first blocks (2w -> w); plain matmuls.
    net = unet_from_config(m)
    assert sorted(projection_shapes(net)) == sorted((2 * w, w) for w in m.widths[:-1])


def test_paper_unet_covers_the_issue_shapes():
    shapes = set(_model_shapes("scannet"))
    assert (6, 32) in shapes and (224, 224) in shapes
    assert {(2 * w, w) for w in (32, 64, 96, 128, 160, 192)} <= shapes  # up to 384 -> 192
    assert (192, 384) in KERNEL_CALLS  # the mirrored backward of 384 -> 192
    assert len(_model_shapes("scannet")) == 1 + 7 * 4 + 6 * 4


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("num_stages", [1, 2, 3])
def test_every_kernel_call_has_valid_tiles_within_budget(dtype, num_stages):
    for (cin, cout), rows in itertools.product(KERNEL_CALLS, (64, 4096, 150_000)):
        b = derive_block_sizes(rows, cin, cout, dtype, num_stages=num_stages)
        for d in (b.block_rows, b.block_cin, b.block_cout):
            assert d >= 16 and d & (d - 1) == 0, (cin, cout, b)
        assert padded_channels(cin) % b.block_cin == 0, (cin, cout, b)
        assert padded_channels(cout) % b.block_cout == 0, (cin, cout, b)
        assert smem_bytes(b, dtype) <= DEFAULT_SMEM_BUDGET, (cin, cout, b)


def _triton_calls(hlo_text):
    """(grid_x, grid_y, num_stages, num_warps) of every Triton custom call, in order."""
    calls = []
    for line in hlo_text.splitlines():
        if "__gpu$xla.gpu.triton" in line:
            cfg = dict(re.findall(r"\b(grid_x|grid_y|num_stages|num_warps) = (\d+)", line))
            calls.append(
                tuple(int(cfg[k]) for k in ("grid_x", "grid_y", "num_stages", "num_warps"))
            )
    return calls


@pytest.mark.parametrize("cin,cout", FORWARD_SHAPES)
def test_every_unet_shape_lowers_to_triton(cin, cout):
    """Forward and both gradients lowered for cuda; the two kernel launches (forward,
    mirrored feats gradient) carry the derived tiles of their own shapes."""
    v = 4096
    f = jax.ShapeDtypeStruct((v, cin), jnp.float32)
    n = jax.ShapeDtypeStruct((v, 27), jnp.int32)
    w = jax.ShapeDtypeStruct((27, cin, cout), jnp.float32)

    def loss(f, n, w):
        return jnp.sum(gather_matmul(f, n, w, mirrored=True))

    lowered = jax.jit(jax.value_and_grad(loss, (0, 2))).trace(f, n, w)
    text = lowered.lower(lowering_platforms=("cuda",)).as_text()
    want = []
    for a, b in ((cin, cout), (cout, cin)):
        blk = default_block_sizes(v, a, b)
        grid_y = padded_channels(b) // blk.block_cout
        want.append((v // blk.block_rows, grid_y, blk.num_stages, blk.num_warps))
    assert sorted(_triton_calls(text)) == sorted(want)


# Brute-force pair loop (float64), as in pallas_kernels/test_sparse_conv.py.
def _brute(feats, nbr, weight, cot):
    out = np.zeros((nbr.shape[0], weight.shape[2]))
    d_feats, d_weight = np.zeros(feats.shape), np.zeros(weight.shape)
    for i, k in zip(*np.nonzero(nbr >= 0), strict=True):
        j = nbr[i, k]
        out[i] += feats[j] @ weight[k]
        d_feats[j] += weight[k] @ cot[i]
        d_weight[k] += np.outer(feats[j], cot[i])
    return out, d_feats, d_weight


def _subm_table(rng, v, extent=4):
    flat = rng.choice(extent**3, size=v, replace=False)
    coords = np.stack(np.unravel_index(flat, (extent,) * 3), axis=1)
    where = {tuple(c): i for i, c in enumerate(coords.tolist())}
    offsets = np.array(list(itertools.product(range(3), repeat=3))) - 1
    return np.array(
        [[where.get(tuple((c + d).tolist()), -1) for d in offsets] for c in coords], np.int32
    )


@pytest.mark.parametrize("cin,cout", [(6, 32), (384, 192), (224, 224)])
def test_unet_shapes_interpret_match_brute_force(cin, cout):
    """Derived default tiles (several channel chunks, two output programs for 192/224)
    in the Pallas interpreter: forward and both gradients of a mirrored table."""
    rng = np.random.default_rng(cin)
    nbr = _subm_table(rng, 24)
    v = len(nbr)
    feats = rng.normal(size=(v, cin)).astype(np.float32)
    weight = (rng.normal(size=(27, cin, cout)) / np.sqrt(27 * cin)).astype(np.float32)
    cot = rng.normal(size=(v, cout)).astype(np.float32)

    def loss(f, w):
        out = gather_matmul(f, nbr, w, mirrored=True, interpret=True)
        return jnp.sum(out * cot), out

    (_, out), (d_feats, d_weight) = jax.value_and_grad(loss, (0, 1), has_aux=True)(feats, weight)
    e_out, e_feats, e_weight = _brute(feats, nbr, weight, cot)
    for got, want in ((out, e_out), (d_feats, e_feats), (d_weight, e_weight)):
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=2e-5 * scale, rtol=2e-5)


@pytest.mark.slow
def test_gpu_check_unet_step_passes_in_the_interpreter():
    """The GPU script's full-UNet step (impl=pallas vs xla vs XLA-highest, fwd+bwd) on a
    tiny UNet in the Pallas interpreter: the script itself works and the paths agree."""
    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "gpu_check_pallas.py"
    spec = importlib.util.spec_from_file_location("gpu_check_pallas", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--interpret", "--unet_only", "--repeats", "1"]) == 0

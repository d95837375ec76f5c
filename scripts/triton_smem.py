"""Shared memory of the Pallas gather-matmul kernel for every UNet conv, without a GPU.

For each submanifold conv shape of the configs' UNets (forward Cin -> Cout and the
mirrored feats-gradient kernel Cout -> Cin) it takes the tiles ``gather_matmul`` would
use (``derive_block_sizes``), lowers the kernel through Pallas' Triton backend for
``cuda`` (jax does this on a CPU), and, when the ``triton`` package is importable,
compiles that Triton IR for sm_90 (H100 / H200) and reads the shared memory the compiled
program asks for. It prints that next to the model (``smem_bytes``) and the budget.

  python scripts/triton_smem.py                      # configs synthetic, scannet, s3dis
  python scripts/triton_smem.py --configs scannet --dtype bfloat16 --num_stages 3

``triton`` is no dependency of the project: install it in a separate environment and put
its site-packages on PYTHONPATH after the project's. Without it only the lowering runs.
The compiler here is the pip package, not the Triton inside jaxlib/XLA that runs the
kernel on a card, so the numbers calibrate the model; a device run has the last word.

Exit status: 0 every shape lowers (and compiles within the budget, under the model),
1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys
import tempfile

import jax
import jax.numpy as jnp

from dknet_jax.model.backbone import subm_conv_shapes, unet_from_config
from pallas_kernels import sparse_conv as sc

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def load_config(name: str):
    spec = importlib.util.spec_from_file_location(f"config_{name}", CONFIGS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(None)


def kernel_shapes(config_names) -> list[tuple[int, int]]:
    """Unique (Cin, Cout) kernel calls: every subm conv forward and its mirrored backward."""
    shapes = set()
    for name in config_names:
        for cin, cout in subm_conv_shapes(unet_from_config(load_config(name).model)):
            shapes |= {(cin, cout), (cout, cin)}
    return sorted(shapes)


def triton_ir(num_rows: int, cin: int, cout: int, blocks, dtype) -> str:
    """Text of the Triton module Pallas emits for one kernel call (lowered for cuda)."""
    from jax._src.pallas.triton import pallas_call_registration as reg

    captured = []
    original = reg.lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        result = original(*args, **kwargs)
        captured.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    f = jax.ShapeDtypeStruct((num_rows, cin), dtype)
    n = jax.ShapeDtypeStruct((num_rows, 27), jnp.int32)
    w = jax.ShapeDtypeStruct((27, cin, cout), dtype)
    fn = jax.jit(lambda f, n, w: sc._gather_matmul_impl(f, n, w, interpret=False, blocks=blocks))
    reg.lowering.lower_jaxpr_to_triton_module = capture
    try:
        fn.trace(f, n, w).lower(lowering_platforms=("cuda",))
    finally:
        reg.lowering.lower_jaxpr_to_triton_module = original
    if len(captured) != 1:
        raise RuntimeError(f"expected one Triton module, lowering produced {len(captured)}")
    return captured[0]


def compiled_smem(ir_text: str, blocks) -> int:
    """Shared memory bytes of the Triton IR compiled for sm_90 by the pip ``triton``."""
    import triton
    from triton.backends.compiler import GPUTarget

    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "kernel.ttir"
        path.write_text(ir_text)
        kernel = triton.compile(
            str(path),
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": blocks.num_warps, "num_stages": blocks.num_stages},
        )
    return int(kernel.metadata.shared)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["synthetic", "scannet", "s3dis"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--num_stages", type=int, default=2)
    p.add_argument("--budget", type=int, default=sc.DEFAULT_SMEM_BUDGET)
    p.add_argument("--rows", type=int, default=150_000, help="V of the lowered call")
    args = p.parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    try:
        import triton

        have_triton = f"triton {triton.__version__}"
    except ImportError:
        have_triton = None
    print(f"jax {jax.__version__}; compiler: {have_triton or 'none (lowering only)'}")
    print(f"budget {args.budget} B (sm_90 limit {sc.SMEM_LIMIT_SM90}), {args.dtype}")
    print("Cin->Cout | blocks (rows, cin, cout, warps, stages) | model B | triton B | ok")
    bad = []
    for cin, cout in kernel_shapes(args.configs):
        blocks = sc.derive_block_sizes(
            args.rows, cin, cout, dtype, num_stages=args.num_stages, smem_budget=args.budget
        )
        model = sc.smem_bytes(blocks, dtype)
        got, ok = "-", model <= args.budget
        try:
            ir_text = triton_ir(args.rows, cin, cout, blocks, dtype)
            if have_triton:
                got = compiled_smem(ir_text, blocks)
                ok = ok and got <= min(model, args.budget)
        except Exception as e:  # report every shape, then fail
            got, ok = f"{type(e).__name__}: {str(e)[:200]}", False
        b = blocks
        print(
            f"{cin}->{cout} | ({b.block_rows}, {b.block_cin}, {b.block_cout}, {b.num_warps}, "
            f"{b.num_stages}) | {model} | {got} | {'ok' if ok else 'FAIL'}",
            flush=True,
        )
        if not ok:
            bad.append((cin, cout))
    if bad:
        print(f"FAILED: {bad}")
        return 1
    print("ALL OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())

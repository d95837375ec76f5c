"""Cross-check the weight conversion against the released architecture run in torch + spconv.

Place in the data flow: a standalone check of ``dknet_jax/released/`` (issue 14), outside
the package and CI. It builds the released DKNet ScanNet network in torch + spconv from the
facts of docs/released_model.md sections 2-3 (this module's own code, the released names
so that ``load_state_dict(strict=True)`` accepts a released checkpoint), writes a
released-format checkpoint (``spec.random_state_dict`` + ``pth.save_pth``), loads it with
``torch.load``, runs the per-point forward in eval mode on a small synthetic scene, converts
the same file with ``scripts/convert_released.py`` and runs our JAX model on the same
voxels. Printed per output (backbone features, semantic logits, offsets, heatmap logits,
mask features, kernel tower): the max abs error and the max error normalised by
``max(1, max |torch|)``. Exit 0 when every normalised error is <= ``--tol``, 1 otherwise,
2 (one line on stderr) when torch or spconv cannot be imported.

    python scripts/crosscheck_released_torch.py [--points 600] [--seed 1] [--tol 1e-4]

Needs ``torch`` and ``spconv`` 2.x (CPU wheels: ``pip install torch spconv``); neither is
a dependency of this package. torch runs on one thread: spconv's CPU kernels race on
several (see ``main``).
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTHS = (32, 64, 96, 128, 160, 192, 224)
INSTALL = (
    "crosscheck_released_torch.py: needs torch and spconv 2.x, which are not importable "
    "({err}); install them in this environment (CPU: pip install torch spconv) and rerun"
)


def import_torch():
    """(torch, spconv.pytorch) or raises ImportError."""
    import spconv.pytorch as spconv
    import torch

    return torch, spconv


def build_released(torch, spconv):
    """The released DKNet (ScanNet config) as torch modules with the released entry names:
    the UNet and heads of docs/released_model.md section 2, inference only."""
    nn = torch.nn

    def norm(c):  # the released norm_fn of the UNet and the linear heads
        return nn.BatchNorm1d(c, eps=1e-4, momentum=0.1)

    def tower(cin, cout):  # 3 x [Conv1d(no bias), BatchNorm1d (eps 1e-5), ReLU], Conv1d
        layers = [
            nn.Sequential(nn.Conv1d(cin, cin, 1, bias=False), nn.BatchNorm1d(cin), nn.ReLU())
            for _ in range(3)
        ]
        return nn.Sequential(*layers, nn.Conv1d(cin, cout, 1))

    class Residual(spconv.SparseModule):
        def __init__(self, cin, cout, key):
            super().__init__()
            skip = nn.Identity() if cin == cout else spconv.SubMConv3d(cin, cout, 1, bias=False)
            self.i_branch = spconv.SparseSequential(skip)
            self.conv_branch = spconv.SparseSequential(
                norm(cin),
                nn.ReLU(),
                spconv.SubMConv3d(cin, cout, 3, padding=1, bias=False, indice_key=key),
                norm(cout),
                nn.ReLU(),
                spconv.SubMConv3d(cout, cout, 3, padding=1, bias=False, indice_key=key),
            )

        def forward(self, x):
            plain = spconv.SparseConvTensor(x.features, x.indices, x.spatial_shape, x.batch_size)
            out = self.conv_branch(x)
            return out.replace_feature(out.features + self.i_branch(plain).features)

    class Level(spconv.SparseModule):
        def __init__(self, planes, level):
            super().__init__()
            key, w = f"subm{level}", planes[0]
            self.blocks = spconv.SparseSequential(
                collections.OrderedDict((f"block{i}", Residual(w, w, key)) for i in range(2))
            )
            self.deeper = len(planes) > 1
            if self.deeper:
                down = f"spconv{level}"
                self.conv = spconv.SparseSequential(
                    norm(w),
                    nn.ReLU(),
                    spconv.SparseConv3d(w, planes[1], 2, stride=2, bias=False, indice_key=down),
                )
                self.u = Level(planes[1:], level + 1)
                self.deconv = spconv.SparseSequential(
                    norm(planes[1]),
                    nn.ReLU(),
                    spconv.SparseInverseConv3d(planes[1], w, 2, bias=False, indice_key=down),
                )
                self.blocks_tail = spconv.SparseSequential(
                    collections.OrderedDict(
                        (f"block{i}", Residual(w * (2 - i), w, key)) for i in range(2)
                    )
                )

        def forward(self, x):
            out = self.blocks(x)
            if not self.deeper:
                return out
            skip = out.features  # the inverse conv returns rows in this tensor's order
            up = self.deconv(self.u(self.conv(out)))
            return self.blocks_tail(up.replace_feature(torch.cat([skip, up.features], 1)))

    class WeightGenerator(nn.Module):
        def __init__(self):
            super().__init__()
            self.before_embedding_tower = nn.Sequential(
                nn.Sequential(nn.Conv1d(16, 16, 1, bias=False), nn.BatchNorm1d(16), nn.ReLU())
            )
            self.controller = nn.Conv1d(16, 337, 1)

    class Released(nn.Module):
        def __init__(self):
            super().__init__()
            d = WIDTHS[0]
            self.input_conv = spconv.SparseSequential(
                spconv.SubMConv3d(6, d, 3, padding=1, bias=False, indice_key="subm1")
            )
            self.unet = Level(WIDTHS, 1)
            self.output_layer = spconv.SparseSequential(norm(d), nn.ReLU())
            self.linear = nn.Sequential(
                nn.Linear(d, d),
                norm(d),
                nn.ReLU(),
                nn.Linear(d, d),
                norm(d),
                nn.ReLU(),
                nn.Linear(d, 20),
            )
            self.offset = nn.Sequential(nn.Linear(d, d), norm(d), nn.ReLU())
            self.offset_linear = nn.Linear(d, 3)
            self.candidate_linear = nn.Sequential(
                nn.Linear(d + 3, d), norm(d), nn.ReLU(), nn.Linear(d, d), norm(d), nn.ReLU()
            )
            self.precision_linear = nn.Linear(d, 1)
            self.recall_linear = nn.Linear(d, 1)  # unused by the released forward
            self.mask_branch = tower(d, 16)
            self.kernel_branch = tower(d, 16)
            self.merge_branch = tower(35, 1)
            self.semantic_branch = tower(16, 20)  # unused by the released forward
            self.weight_generator = WeightGenerator()

        def point_forward(self, x, p2v):
            v = self.output_layer(self.unet(self.input_conv(x))).features
            f = v[p2v]
            off = self.offset_linear(self.offset(f))
            c = self.candidate_linear(torch.cat([f, off], 1))

            def per_point_tower(t):  # the released [1, C, N] layout of the towers
                return t(f.t().unsqueeze(0)).squeeze(0).t()

            return {
                "backbone features": f,
                "semantic logits": self.linear(f),
                "offsets": off,
                "heatmap logits": self.precision_linear(c)[:, 0],
                "mask features": per_point_tower(self.mask_branch),
                "kernel tower": per_point_tower(self.kernel_branch),
            }

    return Released()


def synthetic_scene(n: int, seed: int):
    """Points in three blobs (2 cm voxels, several points per voxel), rgb in [-1, 1]:
    (xyz f32[N, 3] >= 0, rgb f32[N, 3], voxel coords i32[N, 3])."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0.15, 0.15, 0.1], [0.4, 0.2, 0.15], [0.25, 0.42, 0.3]])
    xyz = centres[rng.integers(0, 3, n)] + rng.normal(0, 0.05, (n, 3))
    xyz = (xyz - xyz.min(0)).astype(np.float32)
    rgb = rng.uniform(-1, 1, (n, 3)).astype(np.float32)
    return xyz, rgb, np.floor(xyz / np.float32(0.02)).astype(np.int32)


def torch_outputs(torch, spconv, path, xyz, rgb, vox):
    """The released network on the checkpoint at ``path``: mean voxel features (the
    released voxelisation mode 4), then the per-point forward; numpy float64 outputs."""
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    net = build_released(torch, spconv)
    net.load_state_dict(state, strict=True)
    net.eval()
    feats = torch.from_numpy(np.concatenate([rgb, xyz], 1))
    rows = torch.from_numpy(np.concatenate([np.zeros((len(vox), 1), np.int32), vox], 1))
    coords, p2v = torch.unique(rows, dim=0, return_inverse=True)
    sums = torch.zeros(len(coords), feats.shape[1]).index_add_(0, p2v, feats)
    counts = torch.bincount(p2v, minlength=len(coords)).to(feats.dtype)[:, None]
    shape = np.maximum(vox.max(0) + 1, 128).tolist()  # released: clip(max + 1, full_scale)
    x = spconv.SparseConvTensor(sums / counts, coords.int().contiguous(), shape, 1)
    with torch.no_grad():
        out = net.point_forward(x, p2v)
    return {k: v.double().numpy() for k, v in out.items()}


def jax_outputs(path, work, xyz, rgb, vox):
    """Our model from the converted work dir, the same points and voxels."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dknet_jax.inference.predictor import load_model
    from dknet_jax.model.dknet import abstract_model
    from dknet_jax.types import PointBatch

    spec = importlib.util.spec_from_file_location(
        "convert_released", os.path.join(ROOT, "scripts", "convert_released.py")
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.convert(path, work, log=lambda m: None)
    loaded = load_model(work, log=lambda m: None)
    config = loaded.config
    config.model.level_capacity_ratio = (1.0,)  # a small sparse scene never overflows
    graphdef = abstract_model(config)[0]
    n = len(xyz)
    batch = PointBatch(
        xyz=jnp.asarray(xyz),
        feats=jnp.asarray(np.concatenate([rgb, xyz], 1)),
        vox=jnp.asarray(vox),
        batch_id=jnp.zeros(n, jnp.int32),
        valid=jnp.ones(n, bool),
        semantic=jnp.full(n, -100, jnp.int32),
        instance=jnp.full(n, -100, jnp.int32),
        superpoint=jnp.zeros(n, jnp.int32),
        instance_class=jnp.full(4, -100, jnp.int32),
        instance_batch=jnp.full(4, 1, jnp.int32),
        instance_valid=jnp.zeros(4, bool),
        scene_valid=jnp.ones(1, bool),
    )

    @jax.jit
    def run(params, rest, batch):
        m = nnx.merge(graphdef, params, rest, copy=True)
        m.eval()
        fp, overflow = m.point_features(batch)
        heads, _ = m.point_heads(batch, fp)
        return fp, overflow, heads

    fp, overflow, heads = run(loaded.params, loaded.rest, batch)
    if bool(overflow):
        raise RuntimeError("a voxel capacity overflowed in our model; raise --points spread")
    out = {
        "backbone features": fp,
        "semantic logits": heads.semantic_logits,
        "offsets": heads.offset,
        "heatmap logits": heads.heat_logits,
        "mask features": heads.mask_feats,
        "kernel tower": heads.reduce_feats,
    }
    return {k: np.asarray(v, np.float64) for k, v in out.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=600, help="points of the scene")
    parser.add_argument("--seed", type=int, default=1, help="state dict and scene seed")
    parser.add_argument("--tol", type=float, default=1e-4, help="max normalised error")
    args = parser.parse_args(argv)
    try:
        torch, spconv = import_torch()
    except ImportError as err:
        print(INSTALL.format(err=err), file=sys.stderr)
        return 2
    if args.points < 10:
        parser.error(f"--points must be >= 10, got {args.points}")

    from dknet_jax.released import pth
    from dknet_jax.released import spec as S

    # spconv 2.3.8's CPU convolutions give wrong, run-to-run different features when torch
    # runs them on several threads (a race: two forwards of the same input differed by
    # 0.16 at a random layer, single-threaded they agree bit for bit and match
    # dknet_jax/released/reference.py to 1e-6), so the released side runs on one thread
    torch.set_num_threads(1)
    torch.manual_seed(0)
    xyz, rgb, vox = synthetic_scene(args.points, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "DKNet.pth")
        state = S.random_state_dict(seed=args.seed)
        pth.save_pth({"model": state, "optimizer": {"state": {}, "param_groups": []}}, path)
        ref = torch_outputs(torch, spconv, path, xyz, rgb, vox)
        ours = jax_outputs(path, os.path.join(tmp, "work"), xyz, rgb, vox)
    print(f"torch {torch.__version__}, spconv {_spconv_version()}, {args.points} points")
    worst = 0.0
    for name, want in ref.items():
        got = ours[name]
        if got.shape != want.shape:
            print(f"{name}: shape {got.shape} (ours) != {want.shape} (torch)")
            return 1
        err = float(np.abs(got - want).max())
        norm = err / max(1.0, float(np.abs(want).max()))
        worst = max(worst, norm)
        print(
            f"{name:18s} max |torch| {np.abs(want).max():9.4g}  max abs err {err:9.3g}  "
            f"normalised {norm:9.3g}"
        )
    ok = worst <= args.tol
    print(f"{'OK' if ok else 'FAIL'}: worst normalised error {worst:.3g} (tol {args.tol:g})")
    return 0 if ok else 1


def _spconv_version() -> str:
    try:
        import spconv

        return spconv.__version__
    except (ImportError, AttributeError):
        return "?"


if __name__ == "__main__":
    sys.exit(main())

"""The released DKNet ScanNet state dict as data: every name, shape and role.

Derived from the released code (github.com/W1zheng/DKNet, commit cb9982c), config
``config/DKNet_run1_scannet.yaml`` (d 32, classes 20, block_reps 2, residual blocks,
use_coords -> 6 input channels, no transformer); file:line evidence in
docs/released_model.md. Every entry is an :class:`Entry` (name, shape, role, bn eps).

Roles:
  ``subm3`` / ``subm1`` / ``down2`` / ``up2``: spconv weights, KRSC layout
    ``[Cout, kx, ky, kz, Cin]`` (spconv >= 2.2 always; 2.1 on GPU for kernels <= 32
    offsets). ``subm1`` is the 1x1 ``i_branch`` projection, which spconv computes as
    ``x @ weight.reshape(Cin, Cout)`` (a reinterpretation, not a transpose; see the doc).
  ``bn_weight`` / ``bn_bias`` / ``bn_mean`` / ``bn_var`` / ``bn_count``: BatchNorm1d
    (``bn_count`` = ``num_batches_tracked``, int64 scalar, unused at inference).
  ``linear_w`` ``[out, in]`` / ``linear_b``: ``nn.Linear``.
  ``conv1d_w`` ``[out, in, 1]`` / ``conv1d_b``: 1x1 ``nn.Conv1d`` (towers, weight generator).

``UNUSED_PREFIXES`` lists the modules the released forward never calls.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

D = 32  # cfg.d
CLASSES = 20  # cfg.classes
IN_CHANNELS = 6  # cfg.input_channel 3 (rgb) + 3 (use_coords: xyz)
WIDTHS = tuple(D * (i + 1) for i in range(7))  # UBlock([d, 2d, ..., 7d])
BLOCK_REPS = 2
TOWER_DIM = 16  # self.output_dim
TOWER_CONVS = 3  # self.mask_conv_num
KERNEL_LEN = (TOWER_DIM + 3) * 16 + 16 + 16 * 1 + 1  # conv_shape [16, 1] on 19 inputs: 337

EPS_BACKBONE = 1e-4  # norm_fn = partial(nn.BatchNorm1d, eps=1e-4, momentum=0.1)
EPS_TOWER = 1e-5  # layers.conv_with_kaiming_uniform: BatchNorm1d(out) with defaults
BN_MOMENTUM = 0.1  # both (PyTorch convention: new = (1 - m) * old + m * batch)

UNUSED_PREFIXES = ("semantic_branch.", "recall_linear.")

CONV_ROLES = ("subm3", "subm1", "down2", "up2")
BN_ROLES = ("bn_weight", "bn_bias", "bn_mean", "bn_var", "bn_count")


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    role: str
    eps: float | None = None  # BatchNorm entries only

    @property
    def dtype(self):
        return np.int64 if self.role == "bn_count" else np.float32


def _bn(prefix: str, c: int, eps: float) -> list[Entry]:
    return [
        Entry(prefix + "weight", (c,), "bn_weight", eps),
        Entry(prefix + "bias", (c,), "bn_bias", eps),
        Entry(prefix + "running_mean", (c,), "bn_mean", eps),
        Entry(prefix + "running_var", (c,), "bn_var", eps),
        Entry(prefix + "num_batches_tracked", (), "bn_count", eps),
    ]


def _krsc(cout: int, k: int, cin: int) -> tuple[int, ...]:
    return (cout, k, k, k, cin)


def _residual_block(p: str, cin: int, cout: int) -> list[Entry]:
    """backbone/unet.py ResidualBlock: i_branch (1x1 subm when cin != cout, else Identity),
    conv_branch = [BN(cin), ReLU, subm3(cin->cout), BN(cout), ReLU, subm3(cout->cout)]."""
    out = []
    if cin != cout:
        out.append(Entry(p + "i_branch.0.weight", _krsc(cout, 1, cin), "subm1"))
    out += _bn(p + "conv_branch.0.", cin, EPS_BACKBONE)
    out.append(Entry(p + "conv_branch.2.weight", _krsc(cout, 3, cin), "subm3"))
    out += _bn(p + "conv_branch.3.", cout, EPS_BACKBONE)
    out.append(Entry(p + "conv_branch.5.weight", _krsc(cout, 3, cout), "subm3"))
    return out


def _ublock(p: str, planes: tuple[int, ...]) -> list[Entry]:
    """backbone/unet.py UBlock: blocks, then (if another level) conv [BN, ReLU, k2s2],
    u (recursive), deconv [BN, ReLU, inverse k2], blocks_tail (first block 2w -> w)."""
    w = planes[0]
    out = []
    for i in range(BLOCK_REPS):
        out += _residual_block(f"{p}blocks.block{i}.", w, w)
    if len(planes) > 1:
        w2 = planes[1]
        out += _bn(p + "conv.0.", w, EPS_BACKBONE)
        out.append(Entry(p + "conv.2.weight", _krsc(w2, 2, w), "down2"))
        out += _ublock(p + "u.", planes[1:])
        out += _bn(p + "deconv.0.", w2, EPS_BACKBONE)
        out.append(Entry(p + "deconv.2.weight", _krsc(w, 2, w2), "up2"))
        for i in range(BLOCK_REPS):
            out += _residual_block(f"{p}blocks_tail.block{i}.", w * (2 - i), w)
    return out


def _linear(p: str, cin: int, cout: int) -> list[Entry]:
    return [Entry(p + "weight", (cout, cin), "linear_w"), Entry(p + "bias", (cout,), "linear_b")]


def _tower(p: str, cin: int, cout: int) -> list[Entry]:
    """model/DKNet.py towers: 3 x conv_block(cin, cin) = [Conv1d 1x1 no bias, BN (eps 1e-5),
    ReLU], then Conv1d(cin, cout, 1) with bias."""
    out = []
    for i in range(TOWER_CONVS):
        out.append(Entry(f"{p}{i}.0.weight", (cin, cin, 1), "conv1d_w"))
        out += _bn(f"{p}{i}.1.", cin, EPS_TOWER)
    out.append(Entry(f"{p}{TOWER_CONVS}.weight", (cout, cin, 1), "conv1d_w"))
    out.append(Entry(f"{p}{TOWER_CONVS}.bias", (cout,), "conv1d_b"))
    return out


def released_spec() -> list[Entry]:
    """Every entry of the released ScanNet DKNet state dict, in registration order."""
    d, c, e = D, CLASSES, EPS_BACKBONE
    s: list[Entry] = [Entry("input_conv.0.weight", _krsc(d, 3, IN_CHANNELS), "subm3")]
    s += _ublock("unet.", WIDTHS)
    s += _bn("output_layer.0.", d, e)
    s += _linear("linear.0.", d, d) + _bn("linear.1.", d, e)
    s += _linear("linear.3.", d, d) + _bn("linear.4.", d, e)
    s += _linear("linear.6.", d, c)
    s += _linear("offset.0.", d, d) + _bn("offset.1.", d, e)
    s += _linear("offset_linear.", d, 3)
    s += _linear("candidate_linear.0.", d + 3, d) + _bn("candidate_linear.1.", d, e)
    s += _linear("candidate_linear.3.", d, d) + _bn("candidate_linear.4.", d, e)
    s += _linear("precision_linear.", d, 1)
    s += _linear("recall_linear.", d, 1)
    s += _tower("mask_branch.", d, TOWER_DIM)
    s += _tower("kernel_branch.", d, TOWER_DIM)
    m = 2 * TOWER_DIM + 3
    s += _tower("merge_branch.", m, 1)
    s += _tower("semantic_branch.", TOWER_DIM, c)
    p = "weight_generator."
    s.append(Entry(p + "before_embedding_tower.0.0.weight", (TOWER_DIM, TOWER_DIM, 1), "conv1d_w"))
    s += _bn(p + "before_embedding_tower.0.1.", TOWER_DIM, EPS_TOWER)
    s.append(Entry(p + "controller.weight", (KERNEL_LEN, TOWER_DIM, 1), "conv1d_w"))
    s.append(Entry(p + "controller.bias", (KERNEL_LEN,), "conv1d_b"))
    return s


def spec_by_name() -> collections.OrderedDict:
    return collections.OrderedDict((e.name, e) for e in released_spec())


def is_unused(name: str) -> bool:
    """True for entries of modules the released forward never calls."""
    return name.startswith(UNUSED_PREFIXES)


# --------------------------------------------------------------------------- checks


def check_against_spec(state_dict) -> dict[str, list]:
    """Compare a state dict with the spec: ``{'missing': [...], 'unexpected': [...],
    'shape_mismatch': [(name, expected, got), ...]}`` (empty lists when it matches)."""
    spec = spec_by_name()
    missing = [n for n in spec if n not in state_dict]
    unexpected = [n for n in state_dict if n not in spec]
    bad = [
        (n, spec[n].shape, tuple(np.shape(v)))
        for n, v in state_dict.items()
        if n in spec and tuple(np.shape(v)) != spec[n].shape
    ]
    return {"missing": missing, "unexpected": unexpected, "shape_mismatch": bad}


SPCONV_LAYOUTS = ("KRSC", "RSKC", "RSCK")


def detect_conv_layout(state_dict) -> str:
    """The spconv weight layout of a released state dict, from ``input_conv.0.weight``
    (6 -> 32, so the three layouts have distinct shapes): 'KRSC' ``[Cout, k, k, k, Cin]``
    (spconv >= 2.2, and 2.1 on GPU), 'RSKC' ``[k, k, k, Cout, Cin]`` (2.1 native algo),
    'RSCK' ``[k, k, k, Cin, Cout]`` (spconv 1.x)."""
    shape = tuple(np.shape(state_dict["input_conv.0.weight"]))
    k, cin, cout = 3, IN_CHANNELS, D
    by_shape = {
        (cout, k, k, k, cin): "KRSC",
        (k, k, k, cout, cin): "RSKC",
        (k, k, k, cin, cout): "RSCK",
    }
    if shape not in by_shape:
        raise ValueError(
            f"input_conv.0.weight has shape {shape}; expected one of {list(by_shape)} "
            "(a 3x3x3 spconv weight 6 -> 32 in KRSC / RSKC / RSCK layout)"
        )
    return by_shape[shape]


def to_krsc(weight: np.ndarray, layout: str) -> np.ndarray:
    """A 5-d spconv weight stored in ``layout`` -> KRSC ``[Cout, kx, ky, kz, Cin]``.

    For k > 1 weights only. A 1x1 (``subm1``) weight goes through :func:`subm1_matrix`
    on the tensor *as saved*: its meaning depends on the memory order, not the shape."""
    w = np.asarray(weight)
    if layout == "KRSC":
        return w
    if layout == "RSKC":
        return np.transpose(w, (3, 0, 1, 2, 4))
    if layout == "RSCK":
        return np.transpose(w, (4, 0, 1, 2, 3))
    raise ValueError(f"unknown spconv layout {layout!r}; one of {SPCONV_LAYOUTS}")


def subm1_matrix(weight: np.ndarray, cin: int, cout: int) -> np.ndarray:
    """The ``[Cin, Cout]`` matrix a 1x1 spconv ``SubMConv3d`` applies (``out = x @ M``).

    spconv's 1x1 shortcut (``spconv/pytorch/conv.py``, every 2.x release; spconv issue
    #450) computes ``torch.mm(features, weight.view(in_channels, out_channels))``: the
    weight's memory read as ``[Cin, Cout]`` row-major, whatever its declared layout. For
    the KRSC ``[Cout, 1, 1, 1, Cin]`` weights of the released model this is a
    reinterpretation, *not* ``weight[:, 0, 0, 0, :].T``; the trained model relies on it.
    """
    w = np.asarray(weight)
    if w.size != cin * cout:
        raise ValueError(f"1x1 weight of shape {w.shape} does not hold {cin} x {cout} values")
    return np.ascontiguousarray(w).reshape(cin, cout)


# --------------------------------------------------------------------------- random


def random_state_dict(seed: int = 0, *, controller_std: float = 0.05) -> collections.OrderedDict:
    """A state dict with exactly the released names, shapes and dtypes; random values.

    Convolution / linear weights are He-scaled normals (so activations stay O(1) through
    the 7-level UNet); BatchNorm weights U(0.5, 1.5), biases N(0, 0.1), running means
    N(0, 0.2), running variances U(0.5, 2) (non-trivial, so that a mapping that drops or
    swaps the statistics is caught); ``num_batches_tracked`` a large int64. The
    controller uses ``controller_std`` (the released init is 0.01, which makes the
    dynamic masks nearly constant; larger values test the kernel layout better).
    """
    rng = np.random.default_rng(seed)
    out = collections.OrderedDict()
    for e in released_spec():
        shape = e.shape
        if e.role == "bn_weight":
            v = rng.uniform(0.5, 1.5, shape)
        elif e.role == "bn_bias":
            v = rng.normal(0, 0.1, shape)
        elif e.role == "bn_mean":
            v = rng.normal(0, 0.2, shape)
        elif e.role == "bn_var":
            v = rng.uniform(0.5, 2.0, shape)
        elif e.role == "bn_count":
            out[e.name] = np.array(rng.integers(10**5, 10**6), np.int64)
            continue
        elif e.role in ("linear_b", "conv1d_b"):
            v = rng.normal(0, 0.1, shape)
        elif e.name.startswith("weight_generator.controller."):
            v = rng.normal(0, controller_std, shape)
        else:  # weights: fan_in = everything but the output dim
            fan_in = int(np.prod(shape)) // shape[0]
            v = rng.normal(0, np.sqrt(2.0 / fan_in), shape)
        out[e.name] = v.astype(np.float32)
    return out

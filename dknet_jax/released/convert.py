"""Released DKNet state dict -> this project's parameters (issue 14).

The mapping is data: :data:`RULES` lists, for every released entry name (a regular
expression over the names of :mod:`dknet_jax.released.spec`), our parameter path and the
layout transform, or why the entry is not used. :func:`convert_state_dict` applies it to a
state dict and fills the trees of a model built from :func:`released_config`
(``nnx.split(model, nnx.Param, ...)`` as ``(params, rest)``); every released entry is
accounted for and every one of our leaves is filled, or it raises
:class:`ConversionError` naming the key. Evidence for each rule: docs/released_model.md
sections 3 and 6.

Path templates use the named groups of the pattern: ``{L}`` = the UNet level (the number
of ``u.`` in the name), ``{B}`` the block, ``{i}`` / ``{j}`` an index, ``{f}`` a
BatchNorm field (``weight`` -> ``scale``, ``bias`` -> ``bias``, ``running_mean`` ->
``mean``, ``running_var`` -> ``var``).

Transforms (``w`` = the released tensor, KRSC ``[Cout, kx, ky, kz, Cin]`` for spconv
weights after :func:`spec.to_krsc`):

- ``k3``: ``w.reshape(Co, 27, Ci).transpose(1, 2, 0)`` -> ``[27, Ci, Co]`` (our offset
  ``9a + 3b + c`` is displacement ``(a-1, b-1, c-1)``, spconv's flattened kernel index).
- ``k2``: ``w.reshape(Co, 8, Ci).transpose(1, 2, 0)`` -> ``[8, Ci, Co]`` (child offset
  ``4(x&1) + 2(y&1) + (z&1)`` in both).
- ``subm1``: ``spec.subm1_matrix`` = the saved memory read as ``[Ci, Co]`` (spconv's 1x1
  shortcut; not a transpose).
- ``bn``: copied (``[C]``).
- ``lin_w``: ``w.T``; ``c1_w``: ``w[:, :, 0].T``; ``bias``: copied.
- ``ctrl_w`` / ``ctrl_b``: the controller, ``c1_w`` / copied, then the first 304 outputs
  permuted from the released output-major ``W1[o, c] = w[19 o + c]`` to our input-major
  ``W1[c, o]`` at ``16 c + o`` (``mask_decoder`` layout) and the 3 position inputs
  ``c = 16, 17, 18`` negated (released input ``x - C``, ours ``C - x``).

Leaves of ours with no released counterpart: the biases of the hidden ``Linear`` layers
in front of a BatchNorm (``reduce`` / ``mask_feat`` / ``merge`` / ``kernel`` hidden
layers; the released 1x1 convs there have no bias) are set to 0, which is exact.
"""

from __future__ import annotations

import collections
import dataclasses
import re

import jax
import numpy as np

from dknet_jax.config import base_config, released_settings
from dknet_jax.released import spec as S


class ConversionError(ValueError):
    """A state dict that cannot be converted; the message names the entry and what to do."""


_BN = r"(?P<f>weight|bias|running_mean|running_var)"
_U = r"(?P<u>(?:u\.)*)"
_TOWERS = {"mask_branch": "mask_feat", "kernel_branch": "reduce", "merge_branch": "merge"}

# (released name pattern, our path template or None, transform or the reason it is unused)
RULES: tuple[tuple[str, str | None, str], ...] = (
    (r"input_conv\.0\.weight", "backbone/input_conv/weight", "k3"),
    (
        rf"unet\.{_U}blocks\.block(?P<B>\d)\.conv_branch\.0\.{_BN}",
        "backbone/encoders/{L}/{B}/bn1/{f}",
        "bn",
    ),
    (
        rf"unet\.{_U}blocks\.block(?P<B>\d)\.conv_branch\.2\.weight",
        "backbone/encoders/{L}/{B}/conv1/weight",
        "k3",
    ),
    (
        rf"unet\.{_U}blocks\.block(?P<B>\d)\.conv_branch\.3\.{_BN}",
        "backbone/encoders/{L}/{B}/bn2/{f}",
        "bn",
    ),
    (
        rf"unet\.{_U}blocks\.block(?P<B>\d)\.conv_branch\.5\.weight",
        "backbone/encoders/{L}/{B}/conv2/weight",
        "k3",
    ),
    (
        rf"unet\.{_U}blocks\.block(?P<B>\d)\.i_branch\.0\.weight",
        "backbone/encoders/{L}/{B}/proj",
        "subm1",
    ),
    (rf"unet\.{_U}conv\.0\.{_BN}", "backbone/down_bns/{L}/{f}", "bn"),
    (rf"unet\.{_U}conv\.2\.weight", "backbone/downs/{L}/weight", "k2"),
    (rf"unet\.{_U}deconv\.0\.{_BN}", "backbone/up_bns/{L}/{f}", "bn"),
    (rf"unet\.{_U}deconv\.2\.weight", "backbone/ups/{L}/weight", "k2"),
    (
        rf"unet\.{_U}blocks_tail\.block(?P<B>\d)\.conv_branch\.0\.{_BN}",
        "backbone/decoders/{L}/{B}/bn1/{f}",
        "bn",
    ),
    (
        rf"unet\.{_U}blocks_tail\.block(?P<B>\d)\.conv_branch\.2\.weight",
        "backbone/decoders/{L}/{B}/conv1/weight",
        "k3",
    ),
    (
        rf"unet\.{_U}blocks_tail\.block(?P<B>\d)\.conv_branch\.3\.{_BN}",
        "backbone/decoders/{L}/{B}/bn2/{f}",
        "bn",
    ),
    (
        rf"unet\.{_U}blocks_tail\.block(?P<B>\d)\.conv_branch\.5\.weight",
        "backbone/decoders/{L}/{B}/conv2/weight",
        "k3",
    ),
    (
        rf"unet\.{_U}blocks_tail\.block(?P<B>\d)\.i_branch\.0\.weight",
        "backbone/decoders/{L}/{B}/proj",
        "subm1",
    ),
    (rf"output_layer\.0\.{_BN}", "backbone/output_bn/{f}", "bn"),
    # semantic head: linear.{0,3,6} Linear, linear.{1,4} BN
    (r"linear\.(?P<i>[03])\.weight", "heads/semantic/linears/{i3}/kernel", "lin_w"),
    (r"linear\.(?P<i>[03])\.bias", "heads/semantic/linears/{i3}/bias", "bias"),
    (rf"linear\.(?P<i>[14])\.{_BN}", "heads/semantic/norms/{i3}/{f}", "bn"),
    (r"linear\.6\.weight", "heads/semantic/out/kernel", "lin_w"),
    (r"linear\.6\.bias", "heads/semantic/out/bias", "bias"),
    (r"offset\.0\.weight", "heads/offset/linears/0/kernel", "lin_w"),
    (r"offset\.0\.bias", "heads/offset/linears/0/bias", "bias"),
    (rf"offset\.1\.{_BN}", "heads/offset/norms/0/{f}", "bn"),
    (r"offset_linear\.weight", "heads/offset/out/kernel", "lin_w"),
    (r"offset_linear\.bias", "heads/offset/out/bias", "bias"),
    (r"candidate_linear\.(?P<i>[03])\.weight", "heads/heatmap/linears/{i3}/kernel", "lin_w"),
    (r"candidate_linear\.(?P<i>[03])\.bias", "heads/heatmap/linears/{i3}/bias", "bias"),
    (rf"candidate_linear\.(?P<i>[14])\.{_BN}", "heads/heatmap/norms/{i3}/{f}", "bn"),
    (r"precision_linear\.weight", "heads/heatmap/out/kernel", "lin_w"),
    (r"precision_linear\.bias", "heads/heatmap/out/bias", "bias"),
    # towers: {i}.0 Conv1d (no bias), {i}.1 BN, 3 Conv1d with bias
    *(
        rule
        for rel, ours in _TOWERS.items()
        for rule in (
            (rf"{rel}\.(?P<i>[012])\.0\.weight", f"heads/{ours}/linears/{{i}}/kernel", "c1_w"),
            (rf"{rel}\.(?P<i>[012])\.1\.{_BN}", f"heads/{ours}/norms/{{i}}/{{f}}", "bn"),
            (rf"{rel}\.3\.weight", f"heads/{ours}/out/kernel", "c1_w"),
            (rf"{rel}\.3\.bias", f"heads/{ours}/out/bias", "bias"),
        )
    ),
    (
        r"weight_generator\.before_embedding_tower\.0\.0\.weight",
        "heads/kernel/linears/0/kernel",
        "c1_w",
    ),
    (rf"weight_generator\.before_embedding_tower\.0\.1\.{_BN}", "heads/kernel/norms/0/{f}", "bn"),
    (r"weight_generator\.controller\.weight", "heads/kernel/out/kernel", "ctrl_w"),
    (r"weight_generator\.controller\.bias", "heads/kernel/out/bias", "ctrl_b"),
    # not used
    (r".*\.num_batches_tracked", None, "BatchNorm update counter (not used at inference)"),
    (r"semantic_branch\..*", None, "built but never called by the released forward"),
    (r"recall_linear\..*", None, "built but never called by the released forward"),
)

_COMPILED = tuple((re.compile(p), t, x) for p, t, x in RULES)
_BN_FIELD = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}

# our leaves with no released counterpart (set to zero; see the module docstring)
ZERO_FILLED = re.compile(r"heads/(reduce|mask_feat|merge|kernel)/linears/\d+/bias")


def released_config():
    """The full config of the converted model: ScanNet v2, every switch at its released
    value (:func:`dknet_jax.config.released_settings`)."""
    c = base_config()
    c.data.dataset = "scannet"
    released_settings(c)
    return c


def match(name: str) -> tuple[str | None, str]:
    """(our path or None, transform or reason) for a released entry name; raises
    ConversionError when no rule matches."""
    for pattern, template, what in _COMPILED:
        m = pattern.fullmatch(name)
        if m is None:
            continue
        if template is None:
            return None, what
        g = m.groupdict()
        fields = {
            "L": len(g.get("u") or "") // 2,
            "B": g.get("B"),
            "i": g.get("i"),
            "i3": int(g["i"]) // 3 if g.get("i") is not None else None,
            "f": _BN_FIELD.get(g.get("f") or ""),
        }
        return template.format(**fields), what
    raise ConversionError(
        f"released entry {name!r} matches no rule of dknet_jax.released.convert.RULES: not a "
        f"DKNet ScanNet checkpoint this converter knows (a transformer or another variant?)"
    )


def _controller_columns(cin: int = S.TOWER_DIM + 3, hidden: int = 16):
    """(source column of each of our columns, sign) for the 337 controller outputs."""
    n1 = cin * hidden
    src = np.arange(S.KERNEL_LEN)
    sign = np.ones(S.KERNEL_LEN)
    for c in range(cin):
        for o in range(hidden):
            src[c * hidden + o] = o * cin + c  # ours W1[c, o] <- released W1[o, c]
            if c >= cin - 3:
                sign[c * hidden + o] = -1.0  # position input: released x - C, ours C - x
    assert sorted(src[:n1]) == list(range(n1))
    return src, sign


def transform(name: str, what: str, w: np.ndarray, layout: str) -> np.ndarray:
    """Apply the rule's layout transform to released tensor ``w`` (named ``name``)."""
    w = np.asarray(w)
    if what in ("k3", "k2", "subm1"):
        if w.ndim != 5:
            raise ConversionError(f"{name}: expected a 5-d spconv weight, got shape {w.shape}")
        krsc = S.to_krsc(w, layout)
        co, ci = krsc.shape[0], krsc.shape[-1]
        if what == "subm1":  # the saved memory, not the KRSC view (spconv's 1x1 shortcut)
            return S.subm1_matrix(w, ci, co)
        size = 3 if what == "k3" else 2
        if krsc.shape[1:4] != (size,) * 3:
            raise ConversionError(f"{name}: expected a {size}x{size}x{size} kernel, got {w.shape}")
        return krsc.reshape(co, size**3, ci).transpose(1, 2, 0)
    if what in ("bn", "bias"):
        return w
    if what == "lin_w":
        return w.T
    if what in ("c1_w", "ctrl_w"):
        if w.ndim != 3 or w.shape[2] != 1:
            raise ConversionError(f"{name}: expected a Conv1d weight [out, in, 1], got {w.shape}")
        w = w[:, :, 0].T
        if what == "ctrl_w":
            if w.shape[1] != S.KERNEL_LEN:
                raise ConversionError(f"{name}: expected {S.KERNEL_LEN} outputs, got {w.shape}")
            src, sign = _controller_columns()
            w = w[:, src] * sign[None, :]
        return w
    if what == "ctrl_b":
        if w.shape != (S.KERNEL_LEN,):
            raise ConversionError(f"{name}: expected shape ({S.KERNEL_LEN},), got {w.shape}")
        src, sign = _controller_columns()
        return w[src] * sign
    raise AssertionError(what)


@dataclasses.dataclass
class Report:
    """What :func:`convert_state_dict` did: ``used`` released name -> (our path,
    transform); ``unused`` released name -> reason; ``zero_filled`` our paths set to 0;
    ``layout`` the spconv weight layout found."""

    used: dict
    unused: dict
    zero_filled: list
    layout: str

    def summary(self) -> str:
        reasons = collections.Counter(self.unused.values())
        lines = [
            f"{len(self.used)} released entries loaded (spconv layout {self.layout})",
            *(f"{n} unused: {why}" for why, n in reasons.items()),
            f"{len(self.zero_filled)} of our leaves set to 0 (hidden Linear biases before a "
            f"BatchNorm; the released convs have none): {', '.join(self.zero_filled)}",
        ]
        mods = sorted({k.split(".")[0] for k, why in self.unused.items() if "never" in why})
        if mods:
            lines.append(f"unused modules (reported, not loaded): {', '.join(mods)}")
        return "\n".join(lines)


def path_name(path) -> str:
    """'a/b/0/c' for a jax key path of an ``nnx.State`` leaf (the trailing ``.value``
    attribute dropped)."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            if k.name != "value":
                parts.append(k.name)
        else:
            parts.append(str(k))
    return "/".join(parts)


def convert_state_dict(state_dict, params, rest):
    """Fill ``params`` / ``rest`` (our trees, arrays or ShapeDtypeStruct leaves, from a
    model built with :func:`released_config`) from a released state dict.

    Returns ``(params, rest, Report)`` with float32 numpy leaves. Raises ConversionError
    when an entry matches no rule, a needed entry is missing, a shape differs (naming the
    released key, our path and both shapes), or a leaf of ours stays unfilled.
    """
    if not state_dict:
        raise ConversionError("the state dict is empty")
    known = sum(1 for n in state_dict if n in S.spec_by_name())
    if known == 0 or 2 * known < len(state_dict):
        sample = ", ".join(list(state_dict)[:5])
        raise ConversionError(
            f"not a DKNet checkpoint: {known} of {len(state_dict)} entries have released "
            f"DKNet names (first entries: {sample})"
        )
    layout = S.detect_conv_layout(state_dict)
    targets = {}
    for tree in (params, rest):
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            targets[path_name(path)] = tuple(leaf.shape)

    values: dict[str, np.ndarray] = {}
    used, unused = {}, {}
    for name, tensor in state_dict.items():
        ours, what = match(name)
        if ours is None:
            unused[name] = what
            continue
        if ours not in targets:
            raise ConversionError(
                f"released entry {name!r} maps to {ours!r}, which the model built from "
                f"the released config does not have"
            )
        if ours in values:
            raise ConversionError(f"released entry {name!r}: {ours!r} was already filled")
        value = transform(name, what, tensor, layout).astype(np.float32)
        if tuple(value.shape) != targets[ours]:
            raise ConversionError(
                f"shape mismatch: released {name!r} {tuple(np.shape(tensor))} -> {what} "
                f"{tuple(value.shape)}, but our {ours!r} is {targets[ours]}"
            )
        values[ours] = value
        used[name] = (ours, what)

    needed = [
        e.name
        for e in S.released_spec()
        if e.name not in state_dict and match(e.name)[0] is not None
    ]
    if needed:
        more = f" (and {len(needed) - 5} more)" if len(needed) > 5 else ""
        raise ConversionError(
            f"the checkpoint lacks {len(needed)} entries the released model has: "
            f"{', '.join(needed[:5])}{more}"
        )
    zero = []
    for ours, shape in targets.items():
        if ours not in values and ZERO_FILLED.fullmatch(ours):
            values[ours] = np.zeros(shape, np.float32)
            zero.append(ours)
    unfilled = [p for p in targets if p not in values]
    if unfilled:
        raise ConversionError(
            f"{len(unfilled)} of our parameters have no released counterpart: "
            f"{', '.join(unfilled[:5])}; build the model with released_config()"
        )

    def fill(path, leaf):
        return values[path_name(path)]

    params = jax.tree_util.tree_map_with_path(fill, params)
    rest = jax.tree_util.tree_map_with_path(fill, rest)
    return params, rest, Report(used, unused, sorted(zero), layout)

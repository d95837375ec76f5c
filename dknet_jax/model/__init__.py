"""Network modules (Flax NNX): the sparse UNet backbone, point heads, the dynamic mask
decoder and the DKNet model that composes them.

Data flow: ``Voxels`` -> ``backbone.SparseUNet`` -> per-point features -> ``heads`` ->
``dknet.DKNet`` (candidates, aggregation, kernels) -> ``mask_decoder`` (masks).
"""

from dknet_jax.model.backbone import MaskedBatchNorm, SparseUNet, count_params
from dknet_jax.model.dknet import DKNet, DKNetOutputs, abstract_model, build_model

__all__ = [
    "DKNet",
    "DKNetOutputs",
    "MaskedBatchNorm",
    "SparseUNet",
    "abstract_model",
    "build_model",
    "count_params",
]

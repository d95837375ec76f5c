"""Network modules (Flax NNX): the sparse UNet backbone, point heads and the DKNet model.

Data flow: ``Voxels`` -> ``backbone.SparseUNet`` -> per-point features -> ``heads`` ->
``dknet.DKNet`` (candidates, aggregation, kernels, masks).
"""

from dknet_jax.model.backbone import MaskedBatchNorm, SparseUNet, count_params

__all__ = ["MaskedBatchNorm", "SparseUNet", "count_params"]

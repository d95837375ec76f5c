"""Sparse voxel engine: voxelisation, coordinate hashing / kernel maps, sparse convs.

Data flow: points -> ``voxelize`` -> ``hashing`` (kernel maps, inside jit) -> ``conv``
(gather-GEMM-scatter, custom VJPs) -> backbone. ``functional`` holds the public
plain-array ops of ``docs/contracts.md`` section 1.
"""

from dknet_jax.sparse.functional import inverse_conv3d, strided_conv3d, subm_conv3d

__all__ = ["subm_conv3d", "strided_conv3d", "inverse_conv3d"]

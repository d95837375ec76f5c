"""dknet-jax: DKNet ("3D Instances as 1D Kernels", ECCV 2022) in JAX/Flax.

Data flow: voxelize -> sparse UNet -> point heads -> candidates (LN-NMS) -> aggregation ->
instance kernels -> dynamic-conv masks -> post-processing -> evaluation; and
data -> losses -> optimiser -> checkpoints.
"""

__version__ = "0.1.0"

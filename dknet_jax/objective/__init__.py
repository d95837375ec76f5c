"""The training objective (paper Eq. 8): GT targets, Hungarian matching and the loss terms.

Data flow: ``DKNet(batch) -> DKNetOutputs`` + the GT ``PointBatch`` -> ``targets``
(centroids, offsets, heatmap) -> ``matching`` (instances <-> GT) -> ``terms`` (each loss
term, stage gates) and ``mask_loss`` (Eq. 6 chunk by chunk) -> ``loss.compute_losses``
(the scalar for ``jax.grad``).
"""

from dknet_jax.objective.loss import compute_losses, loss_weights

__all__ = ["compute_losses", "loss_weights"]

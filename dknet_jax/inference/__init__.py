"""Inference: a restored model on new data.

``predictor`` (load a work dir, the jitted forward + ``postprocess``, per-scene results),
``evaluate`` (a prepared split -> ``dknet_jax.eval`` metrics, with ``diagnostics``), ``scan``
(a user's scan file -> PLYs, JSON, submission files and a ``render``ed picture).
"""

"""Pallas GPU kernels, each beside a plain-JAX reference (``<op>_reference``) and a test.

This package imports only jax; ``dknet_jax`` may import it, never the reverse.
"""

"""The released DKNet checkpoint (github.com/W1zheng/DKNet), without torch.

- :mod:`dknet_jax.released.pth`: a restricted reader / writer of PyTorch ``.pth`` zip
  checkpoints (tensors as numpy arrays; no code from a checkpoint is ever run).
- :mod:`dknet_jax.released.spec`: every parameter and buffer of the released ScanNet model
  (name, shape, role), layout detection and a random state-dict builder.
- :mod:`dknet_jax.released.reference`: an independent float64 numpy implementation of the
  released per-point forward that works directly on a released state dict.

See docs/released_model.md for the facts these rely on.
"""

"""Scenes in: raw ScanNet v2 / S3DIS readers, preparation, superpoints, augmentation,
bucketed batching and the input pipeline. (The synthetic rooms live in
`dknet_jax.synthetic`, which imports this package, never the reverse.)"""

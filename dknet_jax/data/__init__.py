"""Scenes in: synthetic rooms, raw ScanNet v2 / S3DIS readers, preparation, superpoints,
augmentation, bucketed batching and the input pipeline."""

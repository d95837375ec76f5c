"""The overfit check: can the model memorise two rooms? The first thing to run after any
change to the model, the losses or a config.

Two synthetic rooms are generated, prepared like real ScanNet scans and used as both the
training and the evaluation split; augmentation and cropping are off, so a working model
must find (nearly) every instance: AP50 >= 0.9 is the bar (`scripts/overfit.py`, and the
`slow` test in ``tests/test_overfit.py``). A model that cannot memorise two rooms will not
learn a thousand; the per-stage diagnostics in the result say which stage loses instances.
"""

from __future__ import annotations

import os

import ml_collections

SPLIT = "overfit"


def prepare_rooms(
    root: str, *, scenes: int = 2, seed: int = 0, size: str = "small", progress: bool = False
) -> str:
    """Generate and prepare ``scenes`` synthetic rooms under ``root`` (idempotent).

    Returns the prepared folder, which holds ``overfit.txt`` listing every room."""
    from dknet_jax.data.scannet import prepare_scannet
    from dknet_jax.synthetic import make_dataset

    raw, prepared = os.path.join(root, "raw"), os.path.join(root, "prepared")
    split = make_dataset(raw, scenes, seed, "scannet", size, val_fraction=0.0, progress=progress)
    prepare_scannet(raw, prepared, progress=progress)
    names = sorted(split["train"] + split["val"])
    with open(os.path.join(prepared, f"{SPLIT}.txt"), "w") as f:
        f.write("\n".join(names) + "\n")
    return prepared


def overfit_config(
    config: ml_collections.ConfigDict, prepared: str, steps: int
) -> ml_collections.ConfigDict:
    """``config`` turned into the overfit run: the rooms in ``prepared`` as train and val
    split, no augmentation, no crop, one room pair per step, ``steps`` steps with the
    heatmap/merge stage from 5% and the masks from 10% of the run, constant lr for the
    first half, then cosine; one evaluation at the end."""
    c = ml_collections.ConfigDict(config.to_dict())
    d, t = c.data, c.train
    d.root = prepared
    d.train_split = d.val_split = SPLIT
    d.augment = False
    d.max_points = max(d.point_buckets)  # no crop: the rooms as they are
    d.batch_size = d.eval_batch_size = 2
    t.epochs = steps
    t.steps_per_epoch = 1
    t.stage_heatmap_epoch = max(1, steps // 20)
    t.stage_mask_epoch = max(t.stage_heatmap_epoch, steps // 10)
    t.cosine_start_epoch = steps // 2
    t.eval_every_epochs = steps
    t.ckpt_every_steps = steps
    t.log_every = max(1, steps // 20)
    return c


def run_overfit(
    config: ml_collections.ConfigDict, workdir: str, *, steps: int = 200, progress: bool = True
) -> dict:
    """Prepare the rooms in ``workdir``, train ``steps`` steps, evaluate on the same rooms.

    Returns the evaluation results (``instance`` AP table as JSON, ``semantic``,
    ``diagnostics`` when available)."""
    from dknet_jax.training.train import train_and_evaluate

    prepared = prepare_rooms(os.path.join(workdir, "rooms"), progress=progress)
    cfg = overfit_config(config, prepared, steps)
    return train_and_evaluate(cfg, os.path.join(workdir, "train"))

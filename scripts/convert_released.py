"""Convert the released DKNet ScanNet checkpoint (PyTorch ``.pth``) into a work dir.

  python scripts/convert_released.py --checkpoint DKNet.pth --out work_dirs/dknet_released

The ``.pth`` is read by ``dknet_jax.released.pth`` without torch and without running
anything from the file (a restricted unpickler: tensors and plain containers only). Every
entry is mapped by ``dknet_jax.released.convert.RULES`` (the unused ones are listed); the
work dir then holds an orbax checkpoint at step 0 with the released config
(``configs/scannet.py:released``) in its meta and a freshly initialised optimiser state,
so that

  python scripts/evaluate.py --config=configs/scannet.py:released --checkpoint W
  python scripts/predict.py --checkpoint W --input scan.ply --out out/
  python scripts/train.py --config=configs/scannet.py:released --workdir W  # fine-tune

load it like any work dir of scripts/train.py. Evidence for the mapping and the list of
architectural switches: docs/released_model.md.
"""

import os

import jax
from absl import app, flags, logging

from dknet_jax.checkpoint import Checkpoints, list_steps, train_state
from dknet_jax.cli import UserError, run_absl
from dknet_jax.model.dknet import abstract_model
from dknet_jax.released import convert as C
from dknet_jax.released import pth
from dknet_jax.training.optim import make_optimizer

RELEASED_URL = "https://github.com/W1zheng/DKNet (README: the ScanNet v2 checkpoint link)"

_CKPT = flags.DEFINE_string("checkpoint", None, "the released DKNet .pth file")
_OUT = flags.DEFINE_string("out", None, "work dir to write (must not hold checkpoints yet)")


def convert(checkpoint: str, out: str, log=print) -> C.Report:
    """Read ``checkpoint`` (a released-format .pth), convert it, and write the work dir
    ``out`` (step 0, released config in the meta, fresh optimiser state). Returns the
    conversion report. Raises UserError for a missing file, a file that is not a DKNet
    checkpoint, a shape mismatch, or an ``out`` that already holds checkpoints."""
    if not os.path.isfile(checkpoint):
        raise UserError(
            f"--checkpoint {checkpoint!r} is not a file; download the released DKNet "
            f"ScanNet checkpoint by hand from {RELEASED_URL}"
        )
    for sub in ("checkpoints", "best"):
        if list_steps(os.path.join(out, sub)):
            raise UserError(
                f"--out {out!r} already holds checkpoints in {sub}/; choose a new folder "
                f"(a converted model starts a work dir)"
            )
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out!r} exists and is not a folder")
    try:
        state_dict, info = pth.read_state_dict(checkpoint)
        config = C.released_config()
        graphdef, params, rest = abstract_model(config)
        params, rest, report = C.convert_state_dict(state_dict, params, rest)
    except (pth.CheckpointError, C.ConversionError) as e:
        raise UserError(f"{checkpoint}: {e}") from e
    if info.get("source"):
        log(f"state dict under {info['source']!r} (also in the file: {info['other_keys']})")
    log(report.summary())
    tx, _ = make_optimizer(config.train, 1, 1)  # the state's shapes do not depend on steps
    state = train_state(params, rest, tx.init(params), jax.random.PRNGKey(config.seed))
    meta = {
        "step": 0,
        "data": None,
        "best": None,
        "config": config.to_json_best_effort(),
        "converted_from": {
            "file": os.path.abspath(checkpoint),
            "spconv_layout": report.layout,
            "unused": sorted(report.unused),
        },
    }
    os.makedirs(out, exist_ok=True)
    ckpt = Checkpoints(out)
    try:
        ckpt.save(0, state, meta)
    finally:
        ckpt.close()
    log(f"wrote {os.path.join(out, 'checkpoints', '0')} (config: configs/scannet.py:released)")
    return report


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint op at INFO
    convert(_CKPT.value, _OUT.value)
    return 0


if __name__ == "__main__":
    flags.mark_flags_as_required(["checkpoint", "out"])
    run_absl(main)

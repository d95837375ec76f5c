"""Instance segmentation of your own scan with a trained DKNet.

  python scripts/predict.py --checkpoint work_dirs/scannet --input room.ply --out out/ \
      [--config=configs/scannet.py --config.test.score_threshold=0.2] \
      [--superpoints=auto|none] [--subsample] [--viewer] [--scene_id=scene0000_00]

Input: PLY (mesh or points, colour optional), .npz (xyz [+ rgb]) or .txt ``x y z [r g b]``
in metres, z up. Writes ScanNet submission files, instance/semantic PLYs, a JSON summary
and a PNG (see dknet_jax/predict.py). --subsample: infer a too-large scan on a subset.
The submission list and masks are named by the scene id (--scene_id, else the input's
``scene<4 digits>_<2 digits>`` prefix, else its stem with whitespace as ``_``); the other
outputs by the input's stem. An output that would overwrite the input is an error (choose
another --out).
"""

import sys
import warnings

from absl import app, flags, logging
from ml_collections import config_flags

from dknet_jax.cli import prepare_output_dir, run_absl

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "config file; default: the config saved with the checkpoint"
)
_CKPT = flags.DEFINE_string(
    "checkpoint", None, "training work dir (or its best/ or checkpoints/ folder)"
)
_INPUT = flags.DEFINE_string("input", None, "scan file: .ply, .npz or .txt")
_OUT = flags.DEFINE_string("out", None, "output folder")
_SP = flags.DEFINE_enum(
    "superpoints",
    "auto",
    ["auto", "none"],
    "auto: compute superpoints for the vote; none: skip the vote",
)
_SUB = flags.DEFINE_bool(
    "subsample", False, "infer on a random subset when the scan exceeds the largest point bucket"
)
_SCENE = flags.DEFINE_string(
    "scene_id",
    None,
    "names the ScanNet submission files "
    "(default: the input's scene<4 digits>_<2 digits> prefix, "
    "else its stem)",
)
_VIEWER = flags.DEFINE_bool("viewer", False, "open an interactive browser viewer (needs viser)")
_PORT = flags.DEFINE_integer("port", 8080, "viewer port")
flags.mark_flags_as_required(["checkpoint", "input", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every restore step at INFO
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # library internals
    prepare_output_dir(_OUT.value)  # a bad --out fails before the model loads
    from dknet_jax.inference.scan import predict_file, show_viewer

    try:
        out = predict_file(
            _CKPT.value,
            _INPUT.value,
            _OUT.value,
            config=_CONFIG.value,
            superpoints=_SP.value,
            subsample=_SUB.value,
            scene_id=_SCENE.value,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for kind, path in out.paths.items():
        print(f"  {kind:14s} {path}")
    if _VIEWER.value:
        try:
            show_viewer(out.prediction, out.config, port=_PORT.value)
        except ImportError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    run_absl(main)

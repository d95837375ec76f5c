"""Write synthetic rooms in the raw ScanNet v2 (or S3DIS) layout.

  python scripts/make_synthetic.py --out data/synthetic --scenes 50 --seed 0 \
      [--format scannet|s3dis] [--size tiny|small|scannet] [--val_fraction 0.2]

then prepare them exactly like real scans:
  python scripts/prepare_scannet.py --scannet_root data/synthetic --out data/prepared
Same seed -> byte-identical files; scene i does not depend on --scenes.
"""

import argparse
import sys
import time

from dknet_jax.cli import prepare_output_dir, run_cli
from dknet_jax.synthetic import SIZES, make_dataset


def _main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="dataset root to write")
    ap.add_argument("--scenes", type=int, required=True, help="number of rooms")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--format", choices=("scannet", "s3dis"), default="scannet")
    ap.add_argument(
        "--size",
        choices=sorted(SIZES),
        default="small",
        help="tiny: a few thousand vertices; small: 20-40k; scannet: 100-200k",
    )
    ap.add_argument("--val_fraction", type=float, default=0.2)
    args = ap.parse_args(argv)
    if args.scenes < 1:
        ap.error("--scenes must be >= 1")
    if not 0.0 <= args.val_fraction <= 1.0:
        ap.error("--val_fraction must be in [0, 1]")
    prepare_output_dir(args.out)
    t0 = time.time()
    split = make_dataset(
        args.out, args.scenes, args.seed, args.format, args.size, args.val_fraction
    )
    print(
        f"wrote {args.scenes} {args.format} scenes ({len(split['train'])} train, "
        f"{len(split['val'])} val) to {args.out} in {time.time() - t0:.1f}s"
    )


def main(argv=None) -> int:
    """Exit status; a user error prints one ``error:`` line and gives 2."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())

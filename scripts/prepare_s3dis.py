"""Prepare S3DIS rooms (or `make_synthetic.py --format s3dis` rooms) into O/Area_N_<room>.npz.

    python scripts/prepare_s3dis.py --s3dis_root R --out O [--areas 1 2 ...]
        [--test_area 5] [--workers N] [--overwrite] [--voxel_size 0.02] [--k 10]

Reads R/Area_N/<room>/Annotations/*.txt (rules in `dknet_jax/data/s3dis.py`), computes
superpoints on a kNN graph, and writes split lists O/Area_N.txt, O/train.txt and O/val.txt
(val = --test_area). Existing outputs are kept unless --overwrite; the superpoint settings
(--k, --voxel_size, --k_thresh, --seg_min_verts) are recorded in O/prepare_settings.json
and a rerun with other values stops (exit status 2) unless --overwrite. Failed rooms are
named per split in O/prepare_report.json; a split with no room gets no list. Exit status 1 when a
room failed.
"""

import argparse
import os
import sys

from dknet_jax.cli import check_input_dir, prepare_output_dir, run_cli
from dknet_jax.data.s3dis import prepare_s3dis


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--s3dis_root", required=True, help="folder holding Area_1 ... Area_6")
    ap.add_argument("--out", required=True, help="output folder for Area_N_<room>.npz")
    ap.add_argument("--areas", type=int, nargs="+", default=None, help="only these areas")
    ap.add_argument("--test_area", type=int, default=5, help="area listed in O/val.txt")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--overwrite", action="store_true", help="redo rooms already prepared")
    ap.add_argument("--voxel_size", type=float, default=0.02, help="superpoint graph voxel (m)")
    ap.add_argument("--k", type=int, default=10, help="superpoint graph neighbours")
    ap.add_argument("--k_thresh", type=float, default=0.01, help="Felzenszwalb k")
    ap.add_argument("--seg_min_verts", type=int, default=20, help="minimum superpoint size")
    args = ap.parse_args(argv)
    # checked here, not per room (each room would fail on its own, exit status 1)
    if not args.voxel_size > 0:
        ap.error(f"--voxel_size must be > 0 (metres), got {args.voxel_size}")
    for flag, value in (("--k", args.k), ("--seg_min_verts", args.seg_min_verts)):
        if value < 1:
            ap.error(f"{flag} must be >= 1, got {value}")
    if not args.k_thresh >= 0:
        ap.error(f"--k_thresh must be >= 0, got {args.k_thresh}")
    check_input_dir(args.s3dis_root, "--s3dis_root")
    prepare_output_dir(args.out)
    s = prepare_s3dis(
        args.s3dis_root,
        args.out,
        areas=args.areas,
        test_area=args.test_area,
        workers=args.workers,
        overwrite=args.overwrite,
        voxel_size=args.voxel_size,
        k=args.k,
        k_thresh=args.k_thresh,
        seg_min_verts=args.seg_min_verts,
    )
    return s.report(args.out)


def main(argv=None) -> int:
    """Exit status; a user error prints one ``error:`` line and gives 2."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())

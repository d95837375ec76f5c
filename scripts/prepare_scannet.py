"""Prepare ScanNet v2 scans (or `make_synthetic.py` rooms) into O/<scene>.npz.

    python scripts/prepare_scannet.py --scannet_root R --out O [--split_dir D]
        [--workers N] [--overwrite] [--scenes scene0000_00 ...]

Reads R/scans/<scene>/ (and R/scans_test/) plus R/scannetv2-labels.combined.tsv; label
rules and the files read are documented in `dknet_jax/data/scannet.py`. Existing outputs
are kept unless --overwrite. Split lists scannetv2_{train,val,test}.txt (from --split_dir,
default R) are honoured and copied as O/{train,val,test}.txt with the prepared scenes.
The label table's digest is recorded in O/prepare_settings.json; a rerun with another
table stops (exit status 2) unless --overwrite. Failed scenes are named per split in
O/prepare_report.json and a split with no prepared scene gets no list. Exit status 1 when a
scene failed.
"""

import argparse
import os
import sys

from dknet_jax.cli import check_input_dir, prepare_output_dir, run_cli
from dknet_jax.data.scannet import prepare_scannet


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scannet_root", required=True, help="folder holding scans/ and the tsv")
    ap.add_argument("--out", required=True, help="output folder for <scene>.npz")
    ap.add_argument("--split_dir", default=None, help="folder of scannetv2_*.txt (default: root)")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--overwrite", action="store_true", help="redo scenes already prepared")
    ap.add_argument("--scenes", nargs="+", default=None, help="only these scene ids")
    args = ap.parse_args(argv)
    check_input_dir(args.scannet_root, "--scannet_root")
    prepare_output_dir(args.out)
    s = prepare_scannet(
        args.scannet_root,
        args.out,
        split_dir=args.split_dir,
        scenes=args.scenes,
        workers=args.workers,
        overwrite=args.overwrite,
    )
    return s.report(args.out)


def main(argv=None) -> int:
    """Exit status; a user error prints one ``error:`` line and gives 2."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())

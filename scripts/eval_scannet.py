"""Score ScanNet v2 instance predictions in the benchmark's file formats.

    python scripts/eval_scannet.py --gt_dir G --pred_dir P --out results.json

G holds ``<scene>.txt`` GT files (``nyu40_id * 1000 + instance`` per vertex); P holds
``<scene>.txt`` prediction lists (``<relative mask path> <nyu40 label id> <confidence>``)
with the mask files in a subfolder. Results equal the official
``evaluate_semantic_instance.py``: JSON with ``all_ap``, ``all_ap_50%``, ``all_ap_25%`` and
``classes`` (null where undefined), and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from dknet_jax.cli import UserError, prepare_output_file, run_cli
from dknet_jax.eval import evaluate_dirs, format_table, results_to_json


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gt_dir", required=True, help="folder of GT <scene>.txt files")
    p.add_argument("--pred_dir", required=True, help="folder of prediction <scene>.txt files")
    p.add_argument("--out", default="", help="JSON file to write the results to")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)
    if args.out:
        prepare_output_file(args.out)  # before scoring, not after
        _check_not_an_input(args.out, args.gt_dir, args.pred_dir)
    results, skipped = evaluate_dirs(args.gt_dir, args.pred_dir, progress=not args.no_progress)
    print(format_table(results))
    if skipped:
        print(f"({len(skipped)} GT scene(s) without a prediction file were skipped)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results_to_json(results), f, indent=2)
        print(f"wrote {args.out}")
    return 0


def _check_not_an_input(out: str, *input_dirs: str) -> None:
    """--out must not replace a file the evaluation reads (a GT, prediction or mask .txt
    under the input folders)."""
    real = os.path.realpath(out)
    for d in input_dirs:
        top = os.path.realpath(d)
        if (
            os.path.isfile(real)
            and real.endswith(".txt")
            and os.path.commonpath([real, top]) == top
        ):
            raise UserError(
                f"--out {out} is an input file under {d}; pass another file name, e.g. results.json"
            )


def main(argv=None) -> int:
    """Exit status; a user error prints one ``error:`` line and gives 2."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())

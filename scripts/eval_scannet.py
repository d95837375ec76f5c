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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root
from dknet_jax.eval import (  # noqa: E402
    BenchmarkFormatError,
    evaluate_dirs,
    format_table,
    results_to_json,
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gt_dir", required=True, help="folder of GT <scene>.txt files")
    p.add_argument("--pred_dir", required=True, help="folder of prediction <scene>.txt files")
    p.add_argument("--out", default="", help="JSON file to write the results to")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)
    try:
        results, skipped = evaluate_dirs(args.gt_dir, args.pred_dir,
                                         progress=not args.no_progress)
    except BenchmarkFormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(results))
    if skipped:
        print(f"({len(skipped)} GT scene(s) without a prediction file were skipped)")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results_to_json(results), f, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

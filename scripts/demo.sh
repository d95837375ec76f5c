#!/usr/bin/env bash
# The full pipeline on the embedded synthetic rooms, no download:
#   generate -> prepare -> train (configs/synthetic.py) -> evaluate -> predict.
# Usage: bash scripts/demo.sh [OUT=demo] ; extra train flags via TRAIN_FLAGS, e.g.
#   TRAIN_FLAGS="--config.train.epochs=5" bash scripts/demo.sh
# Rerunning resumes training from demo/work and skips scenes already generated/prepared.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-demo}
SCENES=${SCENES:-48}
SIZE=${SIZE:-small}
export DKNET_PROGRESS=${DKNET_PROGRESS:-1}

echo "== 1/5 generate $SCENES synthetic rooms ($SIZE) in $OUT/raw"
if [ ! -f "$OUT/raw/scannetv2_val.txt" ]; then
  python scripts/make_synthetic.py --out "$OUT/raw" --scenes "$SCENES" --seed 0 --size "$SIZE"
fi
echo "== 2/5 prepare -> $OUT/prepared"
python scripts/prepare_scannet.py --scannet_root "$OUT/raw" --out "$OUT/prepared"
echo "== 3/5 train -> $OUT/work"
python scripts/train.py --config=configs/synthetic.py --workdir "$OUT/work" \
  --config.data.root="$OUT/prepared" ${TRAIN_FLAGS:-}
echo "== 4/5 evaluate on the held-out rooms"
python scripts/evaluate.py --config=configs/synthetic.py --checkpoint "$OUT/work" --split val \
  --config.data.root="$OUT/prepared" ${TRAIN_FLAGS:-}
echo "== 5/5 predict on one held-out scan"
SCENE=$(head -n 1 "$OUT/raw/scannetv2_val.txt")
python scripts/predict.py --checkpoint "$OUT/work" \
  --input "$OUT/raw/scans/$SCENE/${SCENE}_vh_clean_2.ply" --out "$OUT/predict"
echo "done: metrics in $OUT/work/eval_val/results.json, pictures in $OUT/predict/"

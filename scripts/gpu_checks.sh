#!/usr/bin/env bash
# One-shot GPU check for a lent card (the `device` tool): Pallas kernel vs reference,
# the full UNet forward+backward on the Pallas vs XLA path, sparse-engine benchmark on
# the Pallas and XLA paths, inference and train-step benchmarks. Logs go to $OUT (or
# ./gpu_logs). Each step has its own time limit so the whole run stays inside one short
# device call.
set -u
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ls .whl/*.whl >/dev/null 2>&1; then   # pure-Python deps missing on the image
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi -L | tee "$OUT/device.txt"
python3 -c "import jax; print(jax.__version__, jax.devices())" | tee -a "$OUT/device.txt"
step() { local t=$1 name=$2; shift 2; echo "== $name (limit ${t}s)";
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1; echo "rc=$?" >> "$OUT/$name.log"; tail -n 40 "$OUT/$name.log"; }
step ${T_PALLAS:-100} pallas python3 scripts/gpu_check_pallas.py --quick --no_unet
# Full UNet fwd+bwd, impl=pallas vs xla (errors vs XLA-highest, times): the evidence for
# AUTO_PALLAS_ON_GPU in dknet_jax/sparse/conv.py.
step ${T_UNET:-240} pallas_unet python3 scripts/gpu_check_pallas.py --unet_only --repeats 3
step ${T_SPARSE:-140} sparse_pallas python3 scripts/bench_sparse.py --impl pallas --repeats 3
step ${T_SPARSE_XLA:-60} sparse_xla python3 scripts/bench_sparse.py --impl xla --repeats 3 --no_backbone
step ${T_INFER:-100} infer python3 scripts/bench_infer.py --gpu_budget --json "$OUT/infer.json"
step ${T_TRAIN:-100} train python3 scripts/bench_train.py --gpu_budget --json "$OUT/train.json"

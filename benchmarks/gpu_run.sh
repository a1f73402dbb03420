#!/usr/bin/env bash
# The GPU checks in one script: tests with CUDA visible (device auto -> cuda), the quick start, the benchmarks
# on the GPU. One log ($OUT/log.txt) plus the result JSON files. (Hinton MNIST: benchmarks/gpu_hinton.sh.)
# Usage: OUT=gpu-out bash benchmarks/gpu_run.sh
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"; LOG="$OUT/log.txt"
source "$(dirname "$0")/_gpu_env.sh" "$LOG"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0))" | tee -a "$LOG"
step() { local name=$1 limit=$2; shift 2; echo "=== $name" | tee -a "$LOG"; local t=$SECONDS
  timeout "$limit" "$@" > "/tmp/$name.txt" 2>&1; local rc=$?
  tail -40 "/tmp/$name.txt" | tee -a "$LOG"; echo "=== $name: rc=$rc $((SECONDS - t)) s" | tee -a "$LOG"; }
step pytest 120 python3 -m pytest -q -p no:cacheprovider -o addopts="" -m "not slow" tests/test_train.py \
  tests/test_grouped.py tests/test_data.py tests/test_losses.py tests/test_e2e_cli.py tests/test_ensemble.py tests/test_label.py
step quickstart 40 kdstore quickstart --out /tmp/qs --device cuda
step bench_label 90 python3 -m benchmarks.bench_label --device cuda --json "$OUT/bench_label.json"
step bench_train 150 python3 -m benchmarks.bench_train --device cuda --stream-gb 1 --json "$OUT/bench_train.json"
step bench_sweeps16 150 python3 -m benchmarks.bench_sweeps --device cuda --points 16 --rows 60000 --epochs 1

#!/usr/bin/env bash
# The GPU checks in one script: tests with CUDA visible (device auto -> cuda), the quick start, and the
# benchmarks on the GPU. Results go to $OUT (default ./gpu-out). Usage: bash benchmarks/gpu_run.sh [hinton]
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then  # packages the GPU image lacks, carried as wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0))" | tee -a "$OUT/gpu.txt"
step() { local name=$1 limit=$2; shift 2; echo "=== $name"; local t=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt" | tail -25; echo "=== $name: rc=${PIPESTATUS[0]} $((SECONDS - t)) s"; }
step pytest 200 python3 -m pytest -q -p no:cacheprovider -o addopts="" -m "not slow" \
  --deselect tests/test_store.py::test_read_parquet_with_plain_pyarrow_and_polars
step quickstart 60 kdstore quickstart --out /tmp/qs --device cuda
step bench_label 120 python3 -m benchmarks.bench_label --device cuda --json "$OUT/bench_label.json"
step bench_train 180 python3 -m benchmarks.bench_train --device cuda --stream-gb 2 --json "$OUT/bench_train.json"
if [ "${1:-}" = hinton ] && [ -f benchmarks/data/mnist_train.parquet ]; then
  step hinton 400 python3 benchmarks/hinton_mnist.py --device cuda --out "$OUT/hinton"
fi

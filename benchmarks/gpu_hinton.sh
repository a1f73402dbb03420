#!/usr/bin/env bash
# Hinton MNIST on one GPU in one command (the device lease is short): two teacher recipes side by side, then
# every student run of the SGD teacher at once (`--jobs`). Needs benchmarks/data/mnist_*.parquet
# (benchmarks/prepare_mnist.py). Results, logs and the teachers' weights land in $OUT.
# Usage: OUT=gpu-out bash benchmarks/gpu_hinton.sh [TEACHER_EPOCHS] [STUDENT_EPOCHS]
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
TE=${1:-220}; SE=${2:-40}; LIMIT=${HINTON_LIMIT:-540}
: > "$OUT/log.txt"
source "$(dirname "$0")/_gpu_env.sh" "$OUT/log.txt"
nproc | tee -a "$OUT/log.txt"
t=$SECONDS
timeout "$LIMIT" python3 benchmarks/hinton_mnist.py --device cuda --teacher-optimizer sgd --teacher-epochs "$TE" \
  --student-epochs "$SE" --jobs 16 --out /tmp/h-sgd > "$OUT/hinton_sgd.txt" 2>&1 &
timeout "$LIMIT" python3 benchmarks/hinton_mnist.py --device cuda --teacher-optimizer adam --teacher-epochs "$TE" \
  --student-epochs "$SE" --jobs 2 --experiments "" --out /tmp/h-adam > "$OUT/hinton_adam.txt" 2>&1 &
wait
echo "both done in $((SECONDS - t)) s" | tee -a "$OUT/log.txt"
# the device tool brings back only a few files: one archive per recipe (results, plot, teacher, student logs)
for r in sgd adam; do
  tar -czf "$OUT/hinton_$r.tar.gz" --exclude='*.pt' --exclude='student*.safetensors' -C /tmp/h-$r \
    hinton_results.json hinton_errors_vs_T.png teacher/teacher.json teacher/teacher.safetensors students 2>/dev/null
done
tail -45 "$OUT/hinton_sgd.txt"; tail -12 "$OUT/hinton_adam.txt"

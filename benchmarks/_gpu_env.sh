# Sourced by benchmarks/gpu_*.sh on a GPU machine: install what its image lacks (wheels carried in .whl/) and
# kdstore itself (editable, offline), then record the GPU in $1.
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$1"

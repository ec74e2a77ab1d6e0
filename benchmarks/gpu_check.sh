#!/usr/bin/env bash
# The GPU tables of the README's Performance section in one call, for a GPU machine with JAX (and optionally
# PyTorch for the peers; TensorFlow is not needed): the training step with and without head in bfloat16 and float32
# next to PyTorch eager / torch.compile, the affinity head's full-resolution part, and propagation against the
# device's copy bandwidth at batch 1 and 16. Each part has its own time limit, so one slow part cannot take the
# others with it; the tables go to $OUT (or ./gpu_check_out), the progress to *.log beside them.
#
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_check_out}
py=${PYTHON:-python}
mkdir -p "$out"
part() {  # part NAME SECONDS ARGS...: runs one benchmark, its table to NAME.md, its log to NAME.log
  local name=$1 seconds=$2
  shift 2
  echo "== $name (limit ${seconds}s)"
  timeout "$seconds" "$py" "$@" > "$out/$name.md" 2> "$out/$name.log"
  echo "   exit $? after ${SECONDS}s in all"
  cat "$out/$name.md"
}
"$py" -c "import jax; print(jax.__version__, jax.devices())" | tee "$out/devices.txt"
part affinity_head "${HEAD_S:-90}" benchmarks/affinity_head.py --batches 1,16 --repeats 10
part propagation_b1 "${PROP_S:-60}" benchmarks/propagation.py --batch 1 --repeats 10
part propagation_b16 "${PROP_S:-60}" benchmarks/propagation.py --batch 16 --repeats 10
part train_step "${STEP_S:-420}" benchmarks/train_step.py --crops 513 --batches 16 --dtypes bfloat16,float32 --repeats 10

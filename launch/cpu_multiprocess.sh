#!/usr/bin/env bash
# Two JAX processes on this machine talking through jax.distributed on localhost: the way to try the multi-host
# code path (per-process data shards, cross-process BatchNorm and gradients, process-0 summaries, shared
# checkpoints) without a cluster. Each process gets DEVICES_PER_PROCESS virtual CPU devices.
#   bash launch/cpu_multiprocess.sh                                   # configs/synthetic.py:tiny, 2 x 2 devices
#   CONFIG=configs/synthetic.py NUM_PROCESSES=2 bash launch/cpu_multiprocess.sh --config.train.num_steps=50
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
CONFIG=${CONFIG:-configs/synthetic.py:tiny}
WORKDIR=${WORKDIR:-runs/multiprocess}
NUM_PROCESSES=${NUM_PROCESSES:-2}
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-2}
PORT=${PORT:-$((20000 + RANDOM % 20000))}
mkdir -p "$WORKDIR"
pids=()
for ((i = 0; i < NUM_PROCESSES; i++)); do
  JAX_NUM_CPU_DEVICES=$DEVICES_PER_PROCESS .venv/bin/python -m dilaff_jax.main --config="$CONFIG" \
    --workdir="$WORKDIR" --config.distributed.coordinator_address="127.0.0.1:$PORT" \
    --config.distributed.num_processes="$NUM_PROCESSES" --config.distributed.process_id="$i" "$@" \
    > "$WORKDIR/process_$i.log" 2>&1 &
  pids+=($!)
  echo "[launch] process $i: pid ${pids[-1]}, log $WORKDIR/process_$i.log"
done
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "[launch] process $i failed; last lines of its log:" >&2
    tail -n 20 "$WORKDIR/process_$i.log" >&2
    status=1
  fi
done
[ "$status" = 0 ] && echo "[launch] all $NUM_PROCESSES processes finished; process 0's log:" && grep -v "^[WI]0000" "$WORKDIR/process_0.log" | tail -n 30
exit $status

#!/usr/bin/env bash
# One machine, all its devices (CPU, or every local GPU). Sets up .venv on first use, then trains and evaluates.
#   bash launch/local.sh                                   # the embedded default: configs/synthetic.py
#   CONFIG=configs/voc.py WORKDIR=runs/voc bash launch/local.sh --config.dataset.data_dir=/data/tfds \
#       --config.model.pretrained=/data/resnet101.safetensors      # after the README's Recipe 2, steps 1 and 2
# Extra arguments go to `python -m dilaff_jax.main` (config overrides, --mode=evaluate, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
CONFIG=${CONFIG:-configs/synthetic.py}
WORKDIR=${WORKDIR:-runs/$(basename "${CONFIG%%:*}" .py)}
echo "[launch] python -m dilaff_jax.main --config=$CONFIG --workdir=$WORKDIR $*"
exec .venv/bin/python -m dilaff_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"

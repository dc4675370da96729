#!/usr/bin/env bash
# Runs ketchup_jax on every host of a Cloud TPU VM pod slice (v4-16, v5e-16, ...).
#
#   TPU_NAME=my-v4-16 ZONE=us-central2-b bash launch/tpu_pod.sh \
#       --config=configs/xsum_k4.py --workdir=/mnt/shared/runs/xsum
#
# 1. copies this repository to ~/ketchup_jax on every worker (gcloud ... scp --worker=all);
# 2. on every worker: builds ~/ketchup_jax/.venv from the pinned requirements once, then
#    swaps the CPU jaxlib for the TPU one (jax[tpu] at the pinned jax version);
# 3. starts the same command on every worker at once (ssh --worker=all --command=...).
#    --config.distributed.initialize=cluster lets jax.distributed find the other hosts
#    through the TPU metadata; process 0 writes logs and results, all take part in the
#    Orbax checkpoints, so --workdir must be a POSIX path on storage every host
#    mounts (NFS, Filestore, a gcsfuse mount); gs:// URLs are not supported.
#
# The arguments are passed to `python -m ketchup_jax.main` (--config first). Mesh: the
# default is data parallel over all chips; for FSDP within the slice add e.g.
# --config.mesh.data=1 --config.mesh.fsdp=16; for several slices (multislice) add
# --config.mesh.dcn_data=<slices> (the ICI sizes are then per slice).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
REPO_DIR=$(cd "$(dirname "$0")/.." && pwd)
JAX_VERSION=$(sed -n 's/^jax==//p' "$REPO_DIR/requirements.txt")

gcloud compute tpus tpu-vm scp --recurse "$REPO_DIR" "$TPU_NAME:~/ketchup_jax" \
  --zone="$ZONE" $PROJECT_FLAG --worker=all

BOOTSTRAP='cd ~/ketchup_jax && rm -rf ketchup_jax.egg-info
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet -c constraints.txt -r requirements.txt
  .venv/bin/pip install --quiet --no-deps -e .
  .venv/bin/pip install --quiet "jax[tpu]=='"$JAX_VERSION"'"
fi'
ARGS=$(printf " %q" "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all \
  --command="$BOOTSTRAP
cd ~/ketchup_jax && .venv/bin/python -m ketchup_jax.main$ARGS --config.distributed.initialize=cluster"

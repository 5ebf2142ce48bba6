#!/usr/bin/env bash
# Run queued `dvc exp` experiments one per GPU: start one DVC queue worker per GPU, each pinned to its GPU
# with CUDA_VISIBLE_DEVICES, so N GPUs run N experiments at once. DVC's own queue does the scheduling.
#
#   dvc exp run --queue -S train.lora_r=8
#   dvc exp run --queue -S train.lora_r=16
#   tools/queue_per_gpu.sh            # all GPUs nvidia-smi lists; or: tools/queue_per_gpu.sh 0 1
#   tools/queue_per_gpu.sh 0 1 0 1    # two workers per GPU (small models leave a GPU partly idle)
#   dvc queue status; dvc exp show --only-changed
#
# Each worker inherits the environment it was started with; `dvc queue stop` stops them all.
set -euo pipefail
if [ $# -gt 0 ]; then
  gpus=("$@")
else
  mapfile -t gpus < <(nvidia-smi --query-gpu=index --format=csv,noheader)
fi
[ ${#gpus[@]} -gt 0 ] || { echo "no GPUs found; pass GPU indices" >&2; exit 1; }
# `dvc queue start -j K` starts the missing workers among 1..K, so start them one at a time, each with its
# own CUDA_VISIBLE_DEVICES, and wait until DVC lists it before starting the next.
n=0
for g in "${gpus[@]}"; do
  n=$((n + 1))
  # setsid: the worker gets its own session, so it keeps running when the shell that started it ends
  CUDA_VISIBLE_DEVICES="$g" setsid dvc queue start -j "$n" < /dev/null
  for _ in $(seq 60); do
    active=$(dvc queue status 2>/dev/null | sed -n 's/^Worker status: \([0-9]*\) active, \([0-9]*\) idle.*/\1 \2/p' | awk '{print $1+$2}')
    [ "${active:-0}" -ge "$n" ] && break
    sleep 1
  done
  echo "queue worker $n pinned to GPU $g" >&2
done
dvc queue status

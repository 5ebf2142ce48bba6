#!/usr/bin/env bash
# The GPU measurements of benchmarks/results/h200/ on a GPU machine without network, in phases, one per remote call
# (a call runs at most 10 minutes and the machine is kept only while calls follow each other). Run from the carried
# checkout after `source .carry/gpu-tools/bootstrap.sh` (the wheels medtune needs, in /tmp/site) and, for the
# experiments, the gemma model chain (/tmp/models/gemma-3-270m, ../shared/tools/gpu/model-assemble.sh).
#   setup          DVC's wheels (.carry/dvcwhl) into /tmp/dvcsite; a clone of .carry/repo.bundle in /tmp/work
#   experiment     benchmarks/experiment_time.py in the background: the README's GPU command end to end, the plain
#                  trl script with and without gradient checkpointing, a second experiment
#   holdout        the GPU recipe on the held-out-source protocol (recipes/holdout_protocol.yaml), in the background
#   folds N        the holdout experiment, then leave-one-collection-out: the configurations of
#                  benchmarks/sweeps/folds.sh queued with `medtune folds queue`; N DVC queue workers on the one GPU
#   wait SECS      until the background work is done or SECS pass; copies what is finished to $OUT
#   collect        `dvc exp show --json`, the experiments as a git bundle, logs, into $OUT
set -euo pipefail
export PYTHONPATH=/tmp/site:/tmp/dvcsite PATH=/tmp/bin:/tmp/dvcsite/bin:$PATH DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1 \
       HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=true PYTHONUNBUFFERED=1
W=/tmp/work B=/tmp/bench MODEL=/tmp/models/gemma-3-270m OUT=${OUT:-/tmp/out}
CHECKOUT=$(pwd)
mkdir -p "$B" "$OUT"

running() { pgrep -f "experiment_time.py|dvc exp run|dvc queue|medtune.stages" > /dev/null; }

case "${1:-}" in
setup)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/dvcsite .carry/dvcwhl/*.whl
  mkdir -p /tmp/bin && { command -v python >/dev/null || ln -sf "$(command -v python3)" /tmp/bin/python; }
  rm -rf "$W" && git clone -q -b main .carry/repo.bundle "$W"
  git -C "$W" config user.email gpu@medtune.invalid && git -C "$W" config user.name "medtune GPU run"
  (cd "$W" && dvc version | head -2 && python -c "import medtune.cli, pydantic, datasketch; print('medtune imports ok')")
  ;;
experiment)
  [ -d "$MODEL" ] || { echo "no $MODEL: run the model chain first" >&2; exit 1; }
  cd "$W" && setsid nohup python benchmarks/experiment_time.py --repo "$W" --model "$MODEL" --out "$B/exp" \
      > "$B/experiment.log" 2>&1 < /dev/null &
  echo "experiment started"
  ;;
holdout)
  cd "$W" && setsid nohup bash "$CHECKOUT/benchmarks/gpu_session.sh" holdout-fg > "$B/holdout.log" 2>&1 < /dev/null &
  echo "holdout started"
  ;;
holdout-fg)
  cd "$W"
  REV=$(python -c "from medtune.models import local_revision; print(local_revision('$MODEL'))")
  # eval: the recipe's flags quote values that hold brackets or spaces
  eval "dvc exp run -n gpu-holdout $(python -m medtune recipe recipes/gpu.yaml) \
        $(python -m medtune recipe recipes/holdout_protocol.yaml) -S model.base=$MODEL -S model.revision=$REV"
  ;;
folds)
  cd "$W"
  git reset -q --hard  # the last experiment's params and lock leave the workspace: queued runs start from main
  REV=$(python -c "from medtune.models import local_revision; print(local_revision('$MODEL'))")
  # first in the queue: the GPU recipe on the held-out-source protocol (the quality guard of the speed work)
  eval "dvc exp run --queue -n gpu-holdout $(python -m medtune recipe recipes/gpu.yaml) \
        $(python -m medtune recipe recipes/holdout_protocol.yaml) -S model.base=$MODEL -S model.revision=$REV"
  # shellcheck source=/dev/null
  MODEL=$MODEL source "$CHECKOUT/benchmarks/sweeps/folds.sh"
  setsid nohup dvc queue start -j "${2:-4}" > "$B/queue.log" 2>&1 < /dev/null &
  dvc queue status | tail -3
  ;;
wait)
  end=$(( $(date +%s) + ${2:-60} ))
  while running && [ "$(date +%s)" -lt "$end" ]; do sleep 5; done
  running && echo "still running" || echo "nothing running"
  tail -3 "$B"/*.log 2>/dev/null || true
  [ -d "$W" ] && (cd "$W" && dvc queue status 2>/dev/null | tail -12) || true
  nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader || true
  cp "$B"/exp/*.json "$B"/exp/*.md "$OUT"/ 2>/dev/null || true
  ;;
collect)
  cd "$W"
  dvc exp show --json > "$OUT/exp_show.json" 2>/dev/null || true
  git bundle create "$OUT/exps.bundle" main $(git for-each-ref --format='%(refname)' refs/exps) 2>&1 | tail -1
  tar czf "$OUT/logs.tgz" -C "$B" . 2>/dev/null || true
  ;;
*) echo "usage: $0 setup | experiment | holdout | folds [WORKERS] | wait SECS | collect" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Multi-GPU runs on a lent 2-GPU machine without network, in phases, one per device call (a call runs at most
# 10 minutes; the machine stays warm about 30 s between calls). Run from the carried checkout, after
# `source .carry/gpu-tools/bootstrap.sh` (wheels in /tmp/site) and, for `sweep`, the gemma model chain
# (/tmp/models/gemma-3-270m). Results go to $OUT.
#   setup        DVC's wheels (.carry/dvcwhl, with datasketch for clean/split) into /tmp/dvcsite; a clone of
#                .carry/repo.bundle in /tmp/work; the protocol's data stages (recipes/holdout_baseline.yaml) started
#                in the background; MedQuAD as JSON lines in /tmp/medquad.jsonl (from the bundled pool) for the
#                benchmarks and make_llama_shape.py
#   scaling      a Llama-3.2-1B-shaped model (random weights): the `train` stage alone on 1 GPU, then under
#                `accelerate launch` with configs/accelerate/ddp.yaml and fsdp.yaml on 2 GPUs; tokens/s each
#   sweep NAME   queue the experiments of benchmarks/sweeps/NAME.sh and start DVC queue workers pinned to
#                GPUs (tools/queue_per_gpu.sh; the workers are daemons, so they outlive the call)
#   wait SECS    until the queue is empty or SECS pass: progress, GPU use, finished experiments' metrics (keep
#                SECS well below the call's limit: a call cut at its limit returns no output)
#   collect      `dvc exp show` exports, the experiments as a git bundle, logs, into $OUT
#
# The call chain used (device tool, kind nvidia-h100-x2; .whl and .carry/ are git-excluded, made by
# ../shared/tools/gpu/{wheels,model-chunks}.sh, a pip download of dvc==3.67.1 into .carry/dvcwhl, and
# `git bundle create .carry/repo.bundle HEAD main` after the last commit):
#   1  carry .whl .carry/gpu-tools             source .carry/gpu-tools/bootstrap.sh
#   2  carry .carry/{gpu-tools,dvcwhl,data,repo.bundle}   bash benchmarks/multi_gpu.sh setup
#   3-6 carry .carry/gpu-tools .carry/gemma/0N  bash .carry/gpu-tools/model-assemble.sh
#   7  carry .carry/gpu-tools .carry/gemma/04   assemble in the background (setsid) + multi_gpu.sh scaling
#   8  multi_gpu.sh sweep round1; 9.. multi_gpu.sh wait 480; last: multi_gpu.sh collect
set -euo pipefail
# NVLink multicast stays off on these machines (it can take the host's GPUs out of service)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=/tmp/site:/tmp/dvcsite PATH=/tmp/bin:/tmp/dvcsite/bin:$PATH DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1 \
       HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
CHECKOUT=$(pwd)
W=/tmp/work                      # the DVC repository the experiments run in
L=/tmp/llama                     # the scaling runs' folder
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/logs

protocol_params() {  # params.yaml of the protocol, with the local model folder
  python - "$@" <<'EOF'
import sys, yaml
from pathlib import Path
p = yaml.safe_load(Path("params.yaml").read_text())
for section, keys in yaml.safe_load(Path("recipes/holdout_baseline.yaml").read_text()).items():
    p[section].update(keys)
for item in sys.argv[1:]:
    key, value = item.split("=", 1)
    section, name = key.split(".", 1)
    p[section][name] = yaml.safe_load(value)
Path("params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
EOF
}

case "${1:-}" in
setup)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/dvcsite .carry/dvcwhl/*.whl
  mkdir -p /tmp/bin && { command -v python >/dev/null || ln -sf "$(command -v python3)" /tmp/bin/python; }
  # MedQuAD as JSON lines for the benchmarks, from the pool bundled in the checkout
  python3 -c "import pandas as pd; pd.read_parquet('data/source/medquad_pool.parquet').to_json('/tmp/medquad.jsonl', orient='records', lines=True, force_ascii=False)"
  rm -rf "$W" && git clone -q -b main .carry/repo.bundle "$W" && cd "$W"
  git config user.email gpu@medtune.invalid && git config user.name "medtune GPU run"
  protocol_params model.base=/tmp/models/gemma-3-270m model.revision=null
  # fetch, clean and split do not need the model: start them now (CPU), commit once they are done
  setsid nohup bash -c 'dvc repro split > /tmp/logs/data_stages.log 2>&1; echo $? > /tmp/logs/data_stages.rc' >/dev/null 2>&1 &
  dvc version | head -3
  python -c "import torch; print('gpus', torch.cuda.device_count())"
  ;;
scaling)
  python benchmarks/make_llama_shape.py --data /tmp/medquad.jsonl --out /tmp/models/llama-1b-shape
  for _ in $(seq 120); do [ -f /tmp/logs/data_stages.rc ] && break; sleep 2; done
  tail -3 /tmp/logs/data_stages.log; [ "$(cat /tmp/logs/data_stages.rc)" = 0 ]
  rm -rf "$L" && mkdir -p "$L" && git -C "$W" archive HEAD | tar -x -C "$L" && cd "$L"
  mkdir -p data && cp -r "$W/data/split" data/split && cp "$W/params.yaml" params.yaml
  # the recipe's speed settings (recipes/gpu.yaml), a fixed number of steps, no checkpoints
  protocol_params model.base=/tmp/models/llama-1b-shape model.revision=null train.lora_dropout=0.0 \
    train.pad_to_multiple_of=64 train.max_steps=150 train.save_steps=0 train.eval_steps=0 train.logging_steps=10
  python -m medtune.stages.format --in data/split --out data/formatted --metrics format.json 2>&1 | tail -1
  t() { local name=$1; shift; "$@" -m medtune.stages.train --data data/formatted --out "adapter-$name" --metrics "$OUT/train_$name.json" \
          --curves "curves-$name" --checkpoints "ckpt-$name" --lineage "lineage-$name.json" > "/tmp/logs/train_$name.log" 2>&1 \
          && cp "curves-$name/log_history.json" "$OUT/history_$name.json"; echo "$name rc=$?"; tail -2 "/tmp/logs/train_$name.log"; }
  t gpu1 env CUDA_VISIBLE_DEVICES=0 python
  t ddp2 accelerate launch --config_file configs/accelerate/ddp.yaml
  t fsdp2 timeout 300 accelerate launch --config_file configs/accelerate/fsdp.yaml || true
  python - <<'EOF'
import json, os
from pathlib import Path
out = Path(os.environ["OUT"])
rows = {}
for name in ("gpu1", "ddp2", "fsdp2"):
    f = out / f"train_{name}.json"
    if not f.exists():
        rows[name] = None
        continue
    m, h = json.loads(f.read_text()), json.loads((out / f"history_{name}.json").read_text())
    logs = [x for x in h if "num_input_tokens_seen" in x and "train_runtime" in x and "loss" in x]
    a, b = logs[1], logs[-1]  # steady state: from the second logging step (after warm-up) to the last
    rows[name] = {"processes": m["processes"], "steps": m["steps"], "tokens_per_s_whole_run": m["tokens_per_s"],
                  "tokens_per_s_steady": round((b["num_input_tokens_seen"] - a["num_input_tokens_seen"]) / (float(b["train_runtime"]) - float(a["train_runtime"])), 1),
                  "peak_memory_mb": m["peak_memory_mb"], "final_loss": m["final_loss"]}
(out / "scaling.json").write_text(json.dumps(rows, indent=2))
print(json.dumps(rows, indent=2))
EOF
  ;;
sweep)
  cd "$W"
  [ "$(cat /tmp/logs/data_stages.rc 2>/dev/null)" = 0 ] || { cat /tmp/logs/data_stages.log; exit 1; }
  git add -A && git commit -qm "GPU run: the held-out-source protocol (recipes/holdout_baseline.yaml), local model" || true
  q() { local name=$1; shift; dvc exp run --queue -n "$name" "$@" 2>&1 | tail -1; }
  # shellcheck source=/dev/null
  source "$CHECKOUT/benchmarks/sweeps/$2.sh"
  bash tools/queue_per_gpu.sh ${GPU_SLOTS:-0 1 0 1}  # two per GPU: three made each run > 9 min
  ;;
wait)
  cd "$W"
  end=$(( $(date +%s) + ${2:-500} ))
  while [ "$(date +%s)" -lt "$end" ]; do
    status=$(dvc queue status 2>/dev/null || true)
    nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader | tr '\n' ' ' | sed "s/^/$(date +%T) /" >> "$OUT/gpu_use.log"
    echo >> "$OUT/gpu_use.log"
    echo "$status" | grep -q -E "Running|Queued" || break
    sleep 20
  done
  dvc queue status
  tail -4 "$OUT/gpu_use.log"
  dvc exp show --csv --drop '.*' --keep 'Experiment|rougeL$|delta_rougeL$|runaway_rate|choice_accuracy$|train_loss$|wall_s' 2>/dev/null | tee "$OUT/progress.csv" | head -30
  ;;
queue-smoke)  # two queued experiments on a tiny model (.carry/qs, made from the test fixtures), one worker per GPU
  [ -d /tmp/dvcsite ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/dvcsite .carry/dvcwhl/*.whl
  mkdir -p /tmp/bin && { command -v python >/dev/null || ln -sf "$(command -v python3)" /tmp/bin/python; }
  rm -rf /tmp/qs /tmp/qs-model && cp -r .carry/qs/repo /tmp/qs && cp -r .carry/qs/tiny-model /tmp/qs-model && cd /tmp/qs
  git init -q && git config user.email gpu@medtune.invalid && git config user.name "medtune GPU run"
  dvc init -q && git add -A && git commit -qm "tiny queue check"
  dvc exp run --queue -n gpu-a -S train.lora_r=4 train 2>&1 | tail -1
  dvc exp run --queue -n gpu-b -S train.lora_r=8 train 2>&1 | tail -1
  bash "$CHECKOUT/tools/queue_per_gpu.sh" 0 1 2>&1 | tail -4
  for _ in $(seq 60); do  # which GPU each running process is on, every 2 s
    nvidia-smi --query-compute-apps=gpu_uuid,pid,used_memory --format=csv,noheader | sed "s/^/$(date +%T) /" >> "$OUT/gpu_apps.log"
    dvc queue status 2>/dev/null | grep -q -E "Running|Queued" || break
    sleep 2
  done
  nvidia-smi --query-gpu=index,uuid --format=csv,noheader > "$OUT/gpus.txt"
  dvc queue status | tee "$OUT/queue_status.txt"
  dvc exp show --csv --drop '.*' --keep 'Experiment|State|lora_r$|steps$|tokens_per_s$|train_loss$|device$' 2>&1 | tee "$OUT/exp_show.csv"
  for n in gpu-a gpu-b; do dvc queue logs "$n" 2>&1 | grep -E "world size|cuda|saved adapter|Error|error" | head -5 | sed "s/^/$n: /"; done
  ;;
collect)
  cd "$W"
  dvc exp show --json > "$OUT/exp_show.json" 2>/dev/null || true
  dvc exp show --csv > "$OUT/exp_show.csv" 2>/dev/null || true
  git bundle create "$OUT/exps.bundle" main $(git for-each-ref --format='%(refname)' refs/exps) 2>&1 | tail -1
  mkdir -p /tmp/logs/queue
  for name in $(dvc queue status 2>/dev/null | awk '$4=="Failed" || $5=="Failed" {print $2}'); do dvc queue logs "$name" > "/tmp/logs/queue/$name.log" 2>&1 || true; done
  tar -czf "$OUT/logs.tar.gz" -C /tmp logs
  ls -la "$OUT"
  ;;
*)
  sed -n 2,16p "$0"; exit 2 ;;
esac

#!/usr/bin/env bash
# Training-step benchmarks (bench_train.py) on a lent GPU machine without network, one phase per device call, run
# from the carried checkout after `source .carry/gpu-tools/bootstrap.sh`. A bench runs in the background (setsid:
# it outlives the call, the machine stays warm ~30 s between calls) from a copy of the checkout in /tmp/repo, so
# the next call's fresh working tree cannot change it mid-run; `wait` polls it. Results: /tmp/bench, copied to $OUT.
#   start       gemma-3-270m's tokenizer from .carry/tok (5 MB, so the Llama shape can run before the 240 MB model
#               chain is done: it needs only the tokenizer), MedQuAD as JSON lines; then `bg` with the phases named after it
#   bg PHASE..  the checkout copied to /tmp/repo, then the phases one after another in the background:
#     llama     the Llama-3.2-1B shape at 512 tokens: baseline, the recipe, torch.compile, Liger (last: it patches
#               the model classes of the whole process)
#     gemma     gemma-3-270m (needs /tmp/models/gemma-3-270m from model-assemble.sh): speed variants
#     memory    gemma-3-270m: 4-bit memory variants; memory-liger: the same with Liger (last in its process)
#     llama-compile, gemma-compile   baseline, recipe, recipe + torch.compile, padded x64 + torch.compile
#     tests     tests/test_attention.py (its CUDA cases) and the compiled-vs-eager training test, on the GPU
#   wait SECS   until no bench runs or SECS pass; prints the finished runs; copies JSON and logs to $OUT
#
# The chain used (device tool, kind nvidia-h200; .whl, .carry/ are git-excluded, made by
# ../shared/tools/gpu/{wheels,model-chunks}.sh; .carry/tok: the tokenizer files of the converted model, tokenizer.json
# gzipped; .carry/extra: datasketch's wheel, for the tests' data stages):
#   1    carry .whl .carry/gpu-tools .carry/tok .carry/extra   source .carry/gpu-tools/bootstrap.sh &&
#                                                               bash benchmarks/gpu_bench.sh start llama-compile
#   2-5  carry .carry/gpu-tools .carry/gemma/0N                 model-assemble.sh; gpu_bench.sh wait 1
#   6    carry .carry/gpu-tools .carry/gemma/04                 bootstrap; model-assemble.sh (converts, ~80 s);
#                                                               gpu_bench.sh wait 400; gpu_bench.sh bg gemma memory tests
#   7..  gpu_bench.sh wait 270 (at most 8 files come back per call: move fetched ones out of /tmp/bench)
# Keep the calls less than 30 s apart: an idle machine is given back with its background runs.
set -euo pipefail
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}  # the carried wheels (bootstrap.sh)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
B=/tmp/bench R=/tmp/repo OUT=${OUT:-/tmp/out}
mkdir -p "$B" "$OUT"
COMMON=(--data /tmp/medquad.jsonl --steps 12 --warmup 3)

launch() {  # NAME ARGS...: bench_train.py, its log in $B/NAME.log, its JSON in $B/NAME.json
  local name=$1; shift
  (cd "$R" && python3 benchmarks/bench_train.py --out "$B/$name.json" "$@" > "$B/$name.log" 2>&1) || echo "$name failed"
}

running() { pgrep -f "benchmarks/bench_train.py|gpu_bench.sh fg" > /dev/null; }

case "${1:-}" in
start)
  mkdir -p /tmp/tok && cp .carry/tok/*.json /tmp/tok/ && gunzip -c .carry/tok/tokenizer.json.gz > /tmp/tok/tokenizer.json
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/extra/*.whl
  python3 -c "import pandas as pd; pd.read_parquet('data/source/medquad_pool.parquet').to_json('/tmp/medquad.jsonl', orient='records', lines=True, force_ascii=False)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  [ $# -gt 1 ] && exec bash "$0" bg "${@:2}"
  ;;
bg)
  running && { echo "a bench is still running" >&2; exit 1; }
  rm -rf "$R" && mkdir -p "$R" && cp -r benchmarks stages recipes tests params.yaml pyproject.toml "$R"/
  shift; setsid nohup bash "$R/benchmarks/gpu_bench.sh" fg "$@" > "$B/fg.log" 2>&1 &
  echo "started: $*"
  ;;
fg)
  shift; for phase in "$@"; do bash "$0" "$phase"; done
  ;;
llama)
  launch llama512 --model /tmp/tok --suite llama512 "${COMMON[@]}" \
    --variant 'llama:compile={"torch_compile": true}' \
    --variant 'llama:liger+compile={"liger_kernels": true, "torch_compile": true}' \
    --variant 'llama:liger={"liger_kernels": true}'
  ;;
gemma)
  launch gemma --model /tmp/models/gemma-3-270m --suite gemma "${COMMON[@]}" \
    --variant 'gemma:compile={"torch_compile": true}' \
    --variant 'gemma:padded64+compile={"padding_free": false, "pad_to_multiple_of": 64, "torch_compile": true}' \
    --variant 'gemma:liger+compile={"liger_kernels": true, "torch_compile": true}'
  ;;
memory)
  launch memory --model /tmp/models/gemma-3-270m --suite gemma "${COMMON[@]}" \
    --variant 'gemma:4bit+gc={"quantization": "4bit", "gradient_checkpointing": true}' \
    --variant 'gemma:4bit+gc+tile8192={"quantization": "4bit", "gradient_checkpointing": true, "lm_head_tile": 8192}' \
    --variant 'gemma:4bit+gc+tile8192+compile={"quantization": "4bit", "gradient_checkpointing": true, "lm_head_tile": 8192, "torch_compile": true}'
  ;;
memory-liger)  # Liger's kernels under 4-bit + checkpointing (last in its process: Liger patches the model classes)
  launch memory-liger --model /tmp/models/gemma-3-270m --suite gemma "${COMMON[@]}" \
    --variant 'gemma:4bit+gc+liger={"quantization": "4bit", "gradient_checkpointing": true, "liger_kernels": true}' \
    --variant 'gemma:4bit+gc+liger+tile8192={"quantization": "4bit", "gradient_checkpointing": true, "liger_kernels": true, "lm_head_tile": 8192}'
  ;;
llama-compile)
  launch llama512-compile --model /tmp/tok --suite llama512 "${COMMON[@]}" --variant 'llama:compile={"torch_compile": true}' \
    --variant 'llama:padded64+compile={"padding_free": false, "pad_to_multiple_of": 64, "torch_compile": true}'
  ;;
tests)  # the CUDA cases of the attention tests, and compiled vs eager training on the tiny model
  (cd "$R" && python3 -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_model_stages.py -k "attention or compiled" \
     > "$B/tests.log" 2>&1; echo "tests rc=$?" >> "$B/tests.log")
  ;;
gemma-compile)
  launch gemma-compile --model /tmp/models/gemma-3-270m --suite gemma "${COMMON[@]}" --variant 'gemma:compile={"torch_compile": true}' \
    --variant 'gemma:padded64+compile={"padding_free": false, "pad_to_multiple_of": 64, "torch_compile": true}'
  ;;
wait)
  end=$(( $(date +%s) + ${2:-60} ))
  while running && [ "$(date +%s)" -lt "$end" ]; do sleep 5; done
  running && echo "still running" || echo "no bench running"
  python3 - "$B" <<'PYEOF'
import glob, json, sys
for f in sorted(glob.glob(f"{sys.argv[1]}/*.json")):
    for r in json.load(open(f))["runs"]:
        keys = ("real_tokens_per_s_steady", "seconds_per_step", "slow_steps_s", "peak_memory_gib",
                "memory_at_train_start_gib", "loss_first_last", "failed")
        print(f.rsplit("/", 1)[-1], "|", r["config"][:70], "|", {k: r[k] for k in keys if k in r})
PYEOF
  for f in "$B"/*.log; do [ -f "$f" ] && grep -E "Traceback|Error:" "$f" | tail -2 || true; done
  [ -f "$B/tests.log" ] && tail -3 "$B/tests.log"
  cp "$B"/* "$OUT"/ 2>/dev/null || true
  nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader || true
  ;;
*) echo "usage: $0 start PHASE.. | bg PHASE.. | wait SECS; phases: llama gemma memory memory-liger llama-compile gemma-compile tests" >&2
   exit 2 ;;
esac

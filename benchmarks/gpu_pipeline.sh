#!/usr/bin/env bash
# The pipeline on a GPU machine without DVC (none can be installed there): every stage of dvc.yaml in order,
# with the GPU recipe: STEP=lora runs them all with bf16 LoRA; STEP=qlora then reruns train, evaluate_base,
# evaluate_tuned and merge with 4-bit QLoRA on the same data (STEP=both does both in one call).
#   STEP=both MODEL=/tmp/models/gemma-3-270m DATA=.carry/data/medquad.jsonl ROWS=4000 OUT=/tmp/out bash benchmarks/gpu_pipeline.sh
# Results: $OUT/lora.json, $OUT/qlora.json (every metrics file + stage times), $OUT/{lora,qlora}_loss.png
set -euo pipefail
: "${MODEL:?}" "${DATA:?}" "${OUT:?}"
ROWS=${ROWS:-4000}
STEP=${STEP:-both}
EXTRA=${EXTRA:-}
mkdir -p data/source "$OUT"
cp "$DATA" data/source/gpu_pool.jsonl
common=(--recipe recipes/gpu.yaml --set "model.base=$MODEL" --set model.revision=null
        --set fetch.source=data/source/gpu_pool.jsonl --set "fetch.max_rows=$ROWS" --set merge.atol=0.01)
bundle() {  # $1 = name: every metrics file and the stage times in one JSON, plus the loss curve
  python3 - "$1" <<'PY'
import json, pathlib, sys
name = sys.argv[1]
out = pathlib.Path(__import__("os").environ["OUT"])
res = {p.stem: json.loads(p.read_text()) for p in sorted(pathlib.Path("metrics").glob("*.json"))}
res["stage_seconds"] = json.loads(pathlib.Path(f"/tmp/times_{name}.json").read_text())
res["run_config"] = json.loads(pathlib.Path("models/adapter/run_config.json").read_text())
(out / f"{name}.json").write_text(json.dumps(res, indent=2) + "\n")
png = pathlib.Path("metrics/train_curves/loss.png")
if png.exists():
    (out / f"{name}_loss.png").write_bytes(png.read_bytes())
print(name, {k: res["eval_tuned"].get(k) for k in ("rougeL", "rougeL_ci", "delta_rougeL", "delta_rougeL_ci", "runaway_rate")},
      "base rougeL", res["eval_base"]["rougeL"], "train", res["train"], "merge", res["merge"])
PY
}
if [ "$STEP" != qlora ]; then
  python3 benchmarks/run_stages.py "${common[@]}" $EXTRA --times /tmp/times_lora.json
  bundle lora
fi
if [ "$STEP" != lora ]; then
  python3 benchmarks/run_stages.py "${common[@]}" $EXTRA --set train.quantization=4bit \
      --only train,evaluate_base,evaluate_tuned,merge --times /tmp/times_qlora.json
  bundle qlora
fi

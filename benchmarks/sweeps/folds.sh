# Leave-one-collection-out comparison (issue 22), sourced by benchmarks/gpu_session.sh folds from the GPU clone:
# the plain trl fine-tune and three candidates, each queued once per held-out MedQuAD collection with
# `medtune folds queue`. Every fold tests
# on the first $N questions of its collection by id, greedy answers of up to 256 new tokens.
#   baseline   recipes/holdout_baseline.yaml's training (plain trl + peft settings); it runs padding-free and
#              without mid-run evaluation or checkpoints to save GPU time: the same loss and updates
#   recipe     recipes/gpu.yaml (answers cut at 192 tokens, LoRA dropout 0, batch 64, lr 5e-4)
#   cut128     the recipe with answers cut at 128 tokens
#   cut256     the recipe with answers cut at 256 tokens
# Then: dvc queue start -j WORKERS; medtune folds compare --out reports/folds --reference baseline
set -euo pipefail
N=${N:-100}
SOURCES=${SOURCES:-$(python -c "
import pandas as pd; print(' '.join(sorted(pd.read_parquet('data/source/medquad_pool.parquet', columns=['source'])['source'].unique())))")}
REV=$(python -c "from medtune.models import local_revision; print(local_revision('$MODEL'))")
COMMON=(--set "model.base=$MODEL" --set "model.revision=$REV" --set evaluate.max_new_tokens=256
        --set evaluate.batch_size=320 --set evaluate.choice_max_examples=64 --test-questions "$N")
# first the baseline and today's recipe on every fold, then the other candidates: DVC's queue runs in order, so a
# run cut short still compares the recipe with the baseline on whole folds
for source in $SOURCES; do
  python -m medtune folds queue baseline --recipe recipes/holdout_baseline.yaml --sources "$source" "${COMMON[@]}" \
    --set train.padding_free=true --set train.eval_steps=0 --set train.save_steps=0
  python -m medtune folds queue recipe --recipe recipes/gpu.yaml --sources "$source" "${COMMON[@]}"
done
for source in $SOURCES; do
  python -m medtune folds queue cut128 --recipe recipes/gpu.yaml --sources "$source" "${COMMON[@]}" \
    --set format.max_answer_tokens=128
  python -m medtune folds queue cut256 --recipe recipes/gpu.yaml --sources "$source" "${COMMON[@]}" \
    --set format.max_answer_tokens=256
done

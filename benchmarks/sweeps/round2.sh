# Issue 11, round 2 (planned, not run yet): round 1 (benchmarks/results/h100x2) found answer length the lever
# (cut256-d0: +0.0185 ROUGE-L over the baseline, 16% runaway). Shorter cuts, more training of the best, seeds.
# Run with two workers per GPU (GPU_SLOTS="0 1 0 1"): about two waves of ~8 min on two H100s.
q cut192-d0 -S format.max_answer_tokens=192 -S format.overflow=truncate -S train.lora_dropout=0.0 evaluate_tuned
q cut128-d0 -S format.max_answer_tokens=128 -S format.overflow=truncate -S train.lora_dropout=0.0 evaluate_tuned
q cut256-d0-e2 -S format.max_answer_tokens=256 -S format.overflow=truncate -S train.lora_dropout=0.0 -S train.epochs=2.0 evaluate_tuned
q cut256-d0-e2-lr4e-4 -S format.max_answer_tokens=256 -S format.overflow=truncate -S train.lora_dropout=0.0 -S train.epochs=2.0 -S train.learning_rate=4.0e-4 evaluate_tuned
q cut256-d0-seed7 -S format.max_answer_tokens=256 -S format.overflow=truncate -S train.lora_dropout=0.0 -S base.seed=7 evaluate_tuned
q baseline-seed7 -S base.seed=7 evaluate_tuned

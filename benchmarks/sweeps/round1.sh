# Issue 11, round 1 (sourced by benchmarks/multi_gpu.sh sweep): the workspace holds the protocol with the
# plain baseline's training (recipes/holdout_baseline.yaml); each line changes only what it names.
# Trainings first, so all start at once on the six GPU slots; then the base model in four prompt formats.
q baseline evaluate_tuned
q cut448-d0 -S format.max_answer_tokens=448 -S format.overflow=truncate -S train.lora_dropout=0.0 evaluate_tuned
q cut448-d0-e2 -S format.max_answer_tokens=448 -S format.overflow=truncate -S train.lora_dropout=0.0 -S train.epochs=2.0 evaluate_tuned
q cut256-d0 -S format.max_answer_tokens=256 -S format.overflow=truncate -S train.lora_dropout=0.0 evaluate_tuned
q cut448-d0-lr5e-4 -S format.max_answer_tokens=448 -S format.overflow=truncate -S train.lora_dropout=0.0 -S train.learning_rate=5.0e-4 evaluate_tuned
q cut448-d0-neft5 -S format.max_answer_tokens=448 -S format.overflow=truncate -S train.lora_dropout=0.0 -S train.neftune_noise_alpha=5 evaluate_tuned
q base-gemma3-eos -S model.chat_template=gemma3_base evaluate_base
q base-qa -S format.template=qa evaluate_base
q base-alpaca -S format.template=alpaca evaluate_base

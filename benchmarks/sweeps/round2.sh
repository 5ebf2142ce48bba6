# Issue 11, round 2 (sourced by benchmarks/multi_gpu.sh sweep; one H200, GPU_SLOTS="0 0 0 0 0 0": all six at
# once). Round 1 (benchmarks/results/h100x2) found answer length the lever: cut256-d0 gained +0.0185 ROUGE-L over
# the baseline with 16% runaway answers. Here: the baseline and cut256-d0 again (paired comparisons need their
# answers on this machine), shorter answers (192 tokens), and a higher learning rate, which in round 1 taught the
# model to stop (runaway 76% -> 32% at cut448). Candidates train padding-free (FREE=false turns it off): the same
# loss as padded batches (tests/test_model_stages.py), faster with the varlen attention kernel. Each line changes
# only what it names; the workspace holds the protocol (recipes/holdout_baseline.yaml).
CUT256="-S format.max_answer_tokens=256 -S format.overflow=truncate -S train.lora_dropout=0.0 -S train.padding_free=${FREE:-true}"
CUT192="-S format.max_answer_tokens=192 -S format.overflow=truncate -S train.lora_dropout=0.0 -S train.padding_free=${FREE:-true}"
q baseline evaluate_tuned
# shellcheck disable=SC2086
q cut256-d0 $CUT256 evaluate_tuned
# shellcheck disable=SC2086
q cut192-d0 $CUT192 evaluate_tuned
# shellcheck disable=SC2086
q cut256-d0-lr5e-4 $CUT256 -S train.learning_rate=5.0e-4 evaluate_tuned
# shellcheck disable=SC2086
q cut192-d0-lr5e-4 $CUT192 -S train.learning_rate=5.0e-4 evaluate_tuned
q base-qa -S format.template=qa evaluate_base

"""Where does a training step's time go? torch.profiler over a few steps of the train stage's SFTTrainer
(recipes/gpu.yaml, batch 16, MedQuAD rows) and, for comparison, a plain PyTorch loop on the same batches.

Run as (GPU):  python benchmarks/profile_step.py --model /tmp/models/gemma-3-270m --data medquad.jsonl --out prof.txt
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@click.command()
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--padding-free/--padded", default=True)
@click.option("--logging-steps", default=1, show_default=True)
def main(model_dir: Path, data: Path, out: Path, padding_free: bool, logging_steps: int) -> None:
    import datasets
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTTrainer

    from benchmarks.bench_train import tokenized_pool
    from medtune import params
    from medtune import training as train
    from medtune.attention import use_varlen_attention
    from medtune.models import end_of_turn, load_tokenizer, local_revision
    from medtune.params import ModelParams, TrainParams

    repo = Path(__file__).resolve().parent.parent
    m = ModelParams(base=str(model_dir), revision=local_revision(model_dir), chat_template="gemma3_base", trust_remote_code=False)
    tok = load_tokenizer(model_dir, m)
    rows = tokenized_pool(data, tok, 16 * 14, max_answer_tokens=448)
    section = params.read(repo / "params.yaml")[0]["train"] | params.read(repo / "recipes" / "gpu.yaml")[0]["train"]
    recipe = TrainParams(**section).model_copy(update=dict(max_steps=12, save_steps=0, eval_steps=0,
                                                            padding_free=padding_free, logging_steps=logging_steps))
    args = train.sft_config(recipe, 0, Path("/tmp/prof-ckpt"), end_of_turn(tok), cuda=True)
    args.completion_only_loss = True
    lines = []
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], schedule=schedule(wait=6, warmup=2, active=3))
    times = []

    class Step(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            torch.cuda.synchronize()
            times.append(round(time.perf_counter() - self.t, 4))
            prof.step()

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda()
    if padding_free:  # as the train stage does: attention within each sequence of the flattened row
        use_varlen_attention(model)
    trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok,
                         peft_config=train.lora_config(recipe), callbacks=[Step()])
    with prof:
        trainer.train()
    lines.append(f"SFTTrainer step seconds (padding_free={padding_free}, logging_steps={logging_steps}): {times}")
    for key, n in (("cpu_time_total", 30), ("self_cpu_time_total", 25), ("self_device_time_total", 20)):
        try:
            lines.append(f"sorted by {key}\n" + prof.key_averages().table(sort_by=key, row_limit=n))
        except Exception as e:  # column names differ across torch versions
            lines.append(f"sorted by {key}: {e}")

    # the same model and batches in a plain loop: padded batch, HF loss over all positions
    from peft import get_peft_model

    del trainer
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda(), train.lora_config(recipe))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, fused=True)
    plain = []
    for i in range(12):
        batch = rows[16 * i : 16 * i + 16]
        L = max(len(r["input_ids"]) for r in batch)
        ids = torch.tensor([r["input_ids"] + [0] * (L - len(r["input_ids"])) for r in batch], device="cuda")
        att = (torch.arange(L, device="cuda")[None] < torch.tensor([len(r["input_ids"]) for r in batch], device="cuda")[:, None]).long()
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=att, labels=ids.masked_fill(att == 0, -100)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        plain.append(round(time.perf_counter() - t, 4))
    lines.append(f"plain PyTorch loop step seconds (padded, full logits): {plain}")
    out.write_text("\n\n".join(lines) + "\n")
    click.echo(lines[0] + "\n" + lines[-1], err=True)


if __name__ == "__main__":
    main()

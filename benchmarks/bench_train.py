"""Training-step benchmark: medtune's `train` configuration against a plain trl SFTTrainer + peft LoRA
baseline, on the same model, data and sequence lengths, in one process (one device call).

Run as (GPU):
    python benchmarks/bench_train.py --model /tmp/models/gemma-3-270m --data medquad.jsonl --out results.json
Add --llama1b to also measure a Llama-3.2-1B-shaped model with random weights (speed does not depend on the
weights). Both configurations train LoRA r16 on all linear layers, batch 16, max length 512, bf16:
- baseline: trl's defaults (padded batches, gradient checkpointing on, as trl sets it);
- medtune:  the `train` stage's own SFTConfig (stages.train.sft_config) with the GPU recipe's params:
            padding-free batches and no gradient checkpointing.
Reported per run: non-padding tokens/s, padding share, MFU, peak GPU memory, seconds per step, loss.
MFU = tokens/s x (4 N_frozen + 6 N_lora + 6 L s d_attn) / 989e12, where N counts matmul parameters
(the tied LM head once), s is the mean real sequence length and d_attn = heads x head_dim: a forward pass is
2N FLOPs per token, the backward pass 2N for activation gradients plus 2N_lora for LoRA weight gradients;
attention is 2 matmuls of s x d_attn per token forward (x3 with backward, /2 for the causal half).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere: import the project's stages

H100_BF16_FLOPS = 989e12  # dense bf16 peak, H100 SXM (vendor datasheet)
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001)


def tokenized_pool(data: Path, tok, n: int, max_answer_tokens: int, vocab_cap: int | None = None) -> list[dict]:
    """MedQuAD rows rendered exactly as the format stage does (same template, same answer cut), tokenized as trl
    tokenizes prompt/completion pairs. `vocab_cap` folds ids into a smaller vocabulary for a model of another shape
    (speed depends on shapes and lengths, not on which ids they are)."""
    from stages.common import read_jsonl
    from stages.format import cut_answer, render

    rows = []
    for r in read_jsonl(data)[:n]:
        answer, _ = cut_answer(tok, r["answer"], max_answer_tokens)
        prompt, completion = render(tok, "", r["question"], answer)
        n_prompt = len(tok(prompt)["input_ids"])
        ids = tok(prompt + completion)["input_ids"]
        if vocab_cap:
            ids = [i % vocab_cap for i in ids]
        mask = [0] * n_prompt + [1] * (len(ids) - n_prompt)
        rows.append({"input_ids": ids[:512], "completion_mask": mask[:512]})  # max length 512 for both configurations
    return rows


class StepTimer:
    """Times optimizer steps after a warm-up, with CUDA synchronised, and counts real tokens."""

    def __init__(self, warmup: int):
        from transformers import TrainerCallback

        timer = self

        class CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if state.global_step == warmup:
                    sync()
                    timer.t0, timer.tok0 = time.perf_counter(), state.num_input_tokens_seen

            def on_step_end(self, args, state, control, **kw):
                sync()
                timer.t1, timer.tok1, timer.steps = time.perf_counter(), state.num_input_tokens_seen, state.global_step - warmup

        self.callback = CB()


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_params(model) -> int:
    seen, n = set(), 0
    for name, p in model.named_parameters():
        if id(p) in seen or "lora_" in name:
            continue
        seen.add(id(p))
        n += p.numel()
    return n


def run_one(name: str, model_fn, tok, rows, args, peft_config, steps: int, warmup: int) -> dict:
    import datasets
    import torch
    from trl import SFTTrainer

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = model_fn()
    timer = StepTimer(warmup)
    trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tok, peft_config=peft_config, callbacks=[timer.callback])
    out = trainer.train()
    n_lora = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    n_frozen = matmul_params(trainer.model)
    cfg = model.config.get_text_config()
    d_attn = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    bs = args.per_device_train_batch_size
    lengths = [len(r["input_ids"]) for r in rows[: bs * (steps + warmup)]]
    s = sum(lengths) / len(lengths)
    seconds = trainer_seconds = timer.t1 - timer.t0
    real_tps = (timer.tok1 - timer.tok0) / seconds
    flops_per_token = 4 * n_frozen + 6 * n_lora + 6 * cfg.num_hidden_layers * s * d_attn
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result = {
        "config": name,
        "real_tokens_per_s": round(real_tps),
        "seconds_per_step": round(trainer_seconds / timer.steps, 4),
        "mfu": round(real_tps * flops_per_token / H100_BF16_FLOPS, 4),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "mean_real_seq_len": round(s, 1),
        "padding_share_if_padded": round(1 - s / (sum(max(lengths[i:i + bs]) for i in range(0, len(lengths), bs)) / len(range(0, len(lengths), bs))), 3),
        "batch_size": bs,
        "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)] if losses else None,
        "train_loss": round(out.training_loss, 4),
        "n_frozen_matmul_params": n_frozen,
        "n_lora_params": n_lora,
        "timed_steps": timer.steps,
    }
    del trainer, model
    if cuda:
        torch.cuda.empty_cache()
    return result


@click.command()
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--steps", default=30, show_default=True, help="timed steps after the warm-up")
@click.option("--warmup", default=5, show_default=True)
@click.option("--llama1b/--no-llama1b", default=True, help="also a Llama-3.2-1B-shaped model with random weights")
@click.option("--template", default="gemma3_base", show_default=True, help="chat template in stages/templates/")
@click.option("--variant", "variants", multiple=True,
              help='extra medtune runs: NAME=JSON of train-param and SFTConfig overrides, e.g. bs64={"batch_size": 64}')
def main(model_dir: Path, data: Path, out: Path, steps: int, warmup: int, llama1b: bool, template: str,
         variants: tuple[str, ...]) -> None:
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig

    from stages import train
    from stages.common import read_params_file, parse_section
    from stages.modeling import ModelParams, end_of_turn, load_tokenizer, versions

    m = ModelParams(base=str(model_dir), revision=None, chat_template=template, trust_remote_code=False)
    tok = load_tokenizer(model_dir, m)
    n_rows = 16 * (steps + warmup + 2)
    rows = tokenized_pool(data, tok, n_rows, max_answer_tokens=448)
    repo = Path(__file__).resolve().parent.parent
    section = read_params_file(repo / "params.yaml")["train"] | read_params_file(repo / "recipes" / "gpu.yaml")["train"]
    recipe, errs = parse_section(section, "train", train.TrainParams)
    assert not errs, errs
    recipe = dataclasses.replace(recipe, max_steps=steps + warmup, batch_size=16, grad_accum=1, save_steps=0, eval_steps=0)
    cuda = torch.cuda.is_available()
    common = dict(max_steps=steps + warmup, per_device_train_batch_size=16, learning_rate=2e-4, bf16=cuda, use_cpu=not cuda,
                  report_to="none", logging_steps=1, save_strategy="no", include_num_input_tokens_seen="non_padding",
                  max_length=512, seed=0, data_seed=0, completion_only_loss=True)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")

    def configs(tag: str, eot: str):
        baseline = SFTConfig(output_dir=f"/tmp/bench-{tag}-baseline", **common)  # trl defaults otherwise
        ours = train.sft_config(recipe, seed=0, ckpt_dir=Path(f"/tmp/bench-{tag}-medtune"), eot=eot, cuda=cuda)
        ours.logging_steps = 1
        ours.completion_only_loss = True  # pre-tokenized rows carry a completion_mask, as in the baseline
        runs = [("baseline: trl defaults", baseline, lora), ("medtune", ours, train.lora_config(recipe))]
        for spec in variants:  # what-if runs: the recipe with some params or SFTConfig fields changed
            name, changes = spec.split("=", 1)
            changes = json.loads(changes)
            fields = {f.name for f in dataclasses.fields(train.TrainParams)}
            p = dataclasses.replace(recipe, **{k: v for k, v in changes.items() if k in fields})
            cfg = train.sft_config(p, seed=0, ckpt_dir=Path(f"/tmp/bench-{tag}-{name}"), eot=eot, cuda=cuda)
            cfg.logging_steps, cfg.completion_only_loss = 1, True
            for k, v in changes.items():
                if k not in fields:
                    setattr(cfg, k, v)
            if p.batch_size != 16:
                cfg.max_steps = steps + warmup
            runs.append((f"medtune {name}: {json.dumps(changes)}", cfg, train.lora_config(p)))
        return runs

    from stages.modeling import device_name

    results = {"device": device_name(), "versions": versions(), "command": " ".join(sys.argv),
               "recipe": dataclasses.asdict(recipe), "runs": []}
    dev = "cuda" if cuda else "cpu"
    gemma = lambda: AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if cuda else torch.float32).to(dev)  # noqa: E731
    rows = rows * 4  # enough rows for variants with larger batches
    for name, cfg, peft_cfg in configs("gemma", end_of_turn(tok)):
        r = run_one(name, gemma, tok, rows, cfg, peft_cfg, steps, warmup)
        results["runs"].append({"model": "gemma-3-270m (real weights)"} | r)
        click.echo(json.dumps(results["runs"][-1]), err=True)
    if llama1b:
        # Llama-3.2-1B shape (its 128k vocabulary), random weights; the same rows with ids folded into 128k
        llama_rows = tokenized_pool(data, tok, n_rows, max_answer_tokens=448, vocab_cap=LLAMA_1B["vocab_size"])

        def llama():
            torch.manual_seed(0)
            return LlamaForCausalLM(LlamaConfig(**LLAMA_1B)).to(torch.bfloat16 if cuda else torch.float32).to(dev)

        for name, cfg, peft_cfg in configs("llama", end_of_turn(tok)):
            r = run_one(name, llama, tok, llama_rows * 4, cfg, peft_cfg, steps, warmup)
            results["runs"].append({"model": "Llama-3.2-1B shape (random weights)"} | r)
            click.echo(json.dumps(results["runs"][-1]), err=True)
    out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

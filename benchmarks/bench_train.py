"""Training-step benchmark: medtune's `train` configuration against a plain trl SFTTrainer + peft LoRA
baseline, on the same model, data and sequence lengths, in one process (one device call).

Run as (GPU):
    python benchmarks/bench_train.py --model /tmp/models/gemma-3-270m --data medquad.jsonl --out results.json
Suites (all by default, or --suite NAME): `gemma` (gemma-3-270m, batch 16, max length 512), `llama512` (a
Llama-3.2-1B-shaped model with random weights: speed does not depend on the weights; batch 16, max length
512) and `llama2048` (the same shape, batch 8, rows packed to 2048 tokens). In each suite, LoRA r16 on all
linear layers, bf16:
- baseline: trl's defaults (padded batches, or packed rows in llama2048; gradient checkpointing on and LoRA
            dropout 0.05, as trl and peft set them);
- medtune:  the `train` stage's own SFTConfig (medtune.training.sft_config) with `recipes/gpu.yaml`'s params;
- variants: the recipe with some params changed (--variant NAME=JSON).
Reported per run: non-padding tokens/s (over all timed steps, and steady: without the steps that compiled a
kernel for a new shape, see StepTimer), padding share, MFU (steady), peak GPU memory during training (reset when
train() starts, as the train stage measures it; the peak including the model's load is recorded too), median
seconds per step, loss.
MFU = tokens/s x (4 N_frozen + 6 N_lora + 6 L s d_attn) / 989e12, where N counts matmul parameters
(the tied LM head once), s is the mean real sequence length and d_attn = heads x head_dim: a forward pass is
2N FLOPs per token, the backward pass 2N for activation gradients plus 2N_lora for LoRA weight gradients;
attention is 2 matmuls of s x d_attn per token forward (x3 with backward, /2 for the causal half).
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

import click

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from anywhere: import the project's stages

H100_BF16_FLOPS = 989e12  # dense bf16 peak, H100 SXM and H200 alike (vendor datasheets)
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001)


def tokenized_pool(data: Path, tok, n: int, max_answer_tokens: int, vocab_cap: int | None = None) -> list[dict]:
    """MedQuAD rows rendered exactly as the format stage does (params.yaml's format section: same template, same
    answer cut), tokenized as trl tokenizes prompt/completion pairs. `vocab_cap` folds ids into a smaller
    vocabulary for a model of another shape (speed depends on shapes and lengths, not on which ids they are)."""
    from medtune import params
    from medtune.io import read_jsonl
    from medtune.prompts import format_row

    (fmt,) = params.load("format", path=REPO / "params.yaml")
    rows = []
    for i, r in enumerate(read_jsonl(data)[:n]):
        out = format_row(tok, fmt, {"id": str(i), "question": r["question"], "answer": r["answer"]}, max_answer_tokens)
        prompt, completion = out["prompt"], out["completion"]
        n_prompt = len(tok(prompt)["input_ids"])
        ids = tok(prompt + completion)["input_ids"]
        if vocab_cap:
            ids = [i % vocab_cap for i in ids]
        mask = [0] * n_prompt + [1] * (len(ids) - n_prompt)
        rows.append({"input_ids": ids[:512], "completion_mask": mask[:512]})  # max length 512 for both configurations
    return rows


class StepTimer:
    """Times every optimizer step after a warm-up, with CUDA synchronised, with the real tokens it trained on.

    `steady` leaves out steps over 3x the median step: one-time Triton/cuDNN compiles for a batch shape not seen
    before (seconds each, also after the warm-up, and only where the kernel caches on disk are still cold: the
    first run in a fresh machine paid them, the same run on the same machine later did not). A long training
    run pays them once; a 12-step benchmark would count them as its speed."""

    def __init__(self, warmup: int):
        from transformers import TrainerCallback

        timer = self
        self.ends: list[tuple[float, int]] = []  # (time, tokens seen) at the end of each step from the warm-up's last

        class CB(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step >= warmup:
                    sync()
                    timer.ends.append((time.perf_counter(), state.num_input_tokens_seen))

        self.callback = CB()

    def steps(self) -> list[tuple[float, int]]:
        """(seconds, real tokens) of each timed step."""
        return [(t1 - t0, k1 - k0) for (t0, k0), (t1, k1) in zip(self.ends, self.ends[1:])]

    def summary(self) -> dict:
        return step_summary(self.steps())


def step_summary(steps: list[tuple[float, int]]) -> dict:
    """Real tokens/s over all (seconds, tokens) steps, and steady: without the steps over 3x the median step."""
    import statistics

    median = statistics.median(s for s, _ in steps)
    steady = [(s, k) for s, k in steps if s <= 3 * median]
    return {
        "all": sum(k for _, k in steps) / sum(s for s, _ in steps),
        "steady": sum(k for _, k in steady) / sum(s for s, _ in steady),
        "median_step_s": median,
        "slow_steps_s": [round(s, 3) for s, _ in steps if s > 3 * median],
        "timed_steps": len(steps),
    }


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


def run_one(name: str, model_fn, tok, rows, args, peft_config, steps: int, warmup: int, quantization: str = "none",
            cudnn_sdp: bool = True, attn: str | None = None, lm_head_tile: int | None = None,
            torch_compile: bool = False) -> dict:
    import datasets
    import torch
    from trl import SFTTrainer

    from medtune.attention import compile_decoder_layers, use_varlen_attention
    from medtune.training import lm_head_tile as set_lm_head_tile

    cuda = torch.cuda.is_available()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        # cuDNN's SDPA kernel builds a plan per new shape (seconds each); off, SDPA uses the other fused kernels
        torch.backends.cuda.enable_cudnn_sdp(cudnn_sdp)
    model = model_fn(quantization)
    if attn == "varlen":  # what the train stage sets for padding-free rows (medtune.attention.use_varlen_attention)
        use_varlen_attention(model)
    elif attn:  # another attention kernel, e.g. sdpa over the flattened row, or flex_attention (ships with torch)
        model.set_attn_implementation(attn)
    if torch_compile:  # what the train stage does for train.torch_compile
        compile_decoder_layers(model)
    timer = StepTimer(warmup)
    trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tok, peft_config=peft_config, callbacks=[timer.callback])
    gib = 2**30
    load_peak = torch.cuda.max_memory_allocated() / gib if cuda else None
    if cuda:  # the peak of training itself, as the train stage reports it (its load peak is recorded apart)
        static = torch.cuda.memory_allocated() / gib  # weights, adapter: what training starts from
        torch.cuda.reset_peak_memory_stats()
    with set_lm_head_tile(lm_head_tile):  # train.lm_head_tile, as the train stage applies it
        out = trainer.train()
    n_lora = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    n_frozen = matmul_params(trainer.model)
    cfg = model.config.get_text_config()
    d_attn = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    bs = args.per_device_train_batch_size
    lengths = [len(r["input_ids"]) for r in rows[: bs * (steps + warmup)]]
    s = sum(lengths) / len(lengths)
    timing = timer.summary()
    flops_per_token = 4 * n_frozen + 6 * n_lora + 6 * cfg.num_hidden_layers * s * d_attn
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result = {
        "config": name,
        "real_tokens_per_s": round(timing["all"]),  # every timed step, one-time kernel compiles included
        "real_tokens_per_s_steady": round(timing["steady"]),  # without them (StepTimer): the ratios to compare
        "slow_steps_s": timing["slow_steps_s"],
        "seconds_per_step": round(timing["median_step_s"], 4),  # median
        "mfu": round(timing["steady"] * flops_per_token / H100_BF16_FLOPS, 4),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / gib, 3) if cuda else None,  # during train()
        "peak_memory_gib_incl_load": round(max(load_peak, torch.cuda.max_memory_allocated() / gib), 3) if cuda else None,
        "memory_at_train_start_gib": round(static, 3) if cuda else None,
        "mean_real_seq_len": round(s, 1),
        "padding_share_if_padded": round(1 - s / (sum(max(lengths[i:i + bs]) for i in range(0, len(lengths), bs)) / len(range(0, len(lengths), bs))), 3),
        "batch_size": bs,
        "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)] if losses else None,
        "train_loss": round(out.training_loss, 4),
        "n_frozen_matmul_params": n_frozen,
        "n_lora_params": n_lora,
        "timed_steps": timing["timed_steps"],
        "quantization": quantization,
        "cudnn_sdp": cudnn_sdp,
        "attn_implementation": model.config._attn_implementation,
        "use_liger_kernel": args.use_liger_kernel,
        "torch_compile": torch_compile,
        "lm_head_tile": lm_head_tile,  # null: trl's own (32768)
        "gradient_checkpointing": args.gradient_checkpointing,
        "packing": args.packing,
        "max_length": args.max_length,
    }
    del trainer, model
    # trl's fused LM head binds the model's forward to the model (a reference cycle): only the garbage collector
    # frees it, and a run that left it would count the previous model in the next run's memory
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.backends.cuda.enable_cudnn_sdp(True)
    return result


RUN_KEYS = ("cudnn_sdp", "attn")  # variant keys that are neither train params nor SFTConfig fields

SUITES = {  # name -> (model, batch size, max length, packing)
    "gemma": ("gemma-3-270m (real weights)", 16, 512, False),
    "llama512": ("Llama-3.2-1B shape (random weights)", 16, 512, False),
    "llama2048": ("Llama-3.2-1B shape (random weights), packed 2048-token rows", 8, 2048, True),
}


@click.command()
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--steps", default=30, show_default=True, help="timed steps after the warm-up")
@click.option("--warmup", default=5, show_default=True)
@click.option("--suite", "suites", multiple=True, type=click.Choice(list(SUITES)), help="default: all of them")
@click.option("--template", default="gemma3_base", show_default=True, help="chat template in medtune/templates/")
@click.option("--variant", "variants", multiple=True,
              help='extra medtune runs: NAME=JSON of train-param and SFTConfig overrides, plus "cudnn_sdp": false, "attn" '
                   '(varlen, sdpa, flex_attention; default: varlen for padding-free rows); '
                   'e.g. bs64={"batch_size": 64}; a NAME starting with "llama:" or "gemma:" runs only in that suite')
def main(model_dir: Path, data: Path, out: Path, steps: int, warmup: int, suites: tuple[str, ...], template: str,
         variants: tuple[str, ...]) -> None:
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig

    from medtune import params
    from medtune import training as train
    from medtune.models import (
        device_name,
        end_of_turn,
        load_tokenizer,
        local_revision,
        versions,
    )
    from medtune.params import ModelParams, TrainParams
    from medtune.strict import section_problems

    m = ModelParams(base=str(model_dir), revision=local_revision(model_dir), chat_template=template, trust_remote_code=False)
    tok = load_tokenizer(model_dir, m)
    eot = end_of_turn(tok)
    section = params.read(REPO / "params.yaml")[0]["train"] | params.read(REPO / "recipes" / "gpu.yaml")[0]["train"]
    recipe, errs = section_problems(section, "train", TrainParams, {}, "params.yaml + recipes/gpu.yaml")
    assert not errs, errs
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    fields = set(TrainParams.model_fields)

    def runs_for(suite: str, bs: int, max_length: int, packing: bool):
        """(name, SFTConfig, LoraConfig, run_one's keyword arguments) for the baseline, the recipe and the variants."""
        base_kw = dict(max_steps=steps + warmup, per_device_train_batch_size=bs, learning_rate=2e-4, bf16=cuda,
                       use_cpu=not cuda, report_to="none", logging_steps=1, save_strategy="no", seed=0, data_seed=0,
                       include_num_input_tokens_seen="non_padding", max_length=max_length, packing=packing,
                       completion_only_loss=True)
        baseline = SFTConfig(output_dir=f"/tmp/bench-{suite}-baseline", **base_kw)  # trl's defaults otherwise
        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
        ours_p = recipe.model_copy(update=dict(max_steps=steps + warmup, batch_size=bs, grad_accum=1, save_steps=0, eval_steps=0,
                                               max_length=max_length, packing=packing))
        out = [("baseline: trl defaults", baseline, lora, {})]  # run_one's defaults: trl's own choices
        specs = [("medtune", {})] + [tuple(v.split("=", 1)) for v in variants]
        for name, changes in specs:
            changes = json.loads(changes) if isinstance(changes, str) else changes
            if ":" in name and not suite.startswith(name.split(":")[0]):
                continue
            p = ours_p.model_copy(update={k: v for k, v in changes.items() if k in fields})
            cfg = train.sft_config(p, seed=0, ckpt_dir=Path(f"/tmp/bench-{suite}-{name}"), eot=eot, cuda=cuda)
            cfg.logging_steps, cfg.completion_only_loss = 1, True  # pre-tokenized rows carry a completion_mask
            for k, v in changes.items():
                if k not in fields and k not in RUN_KEYS:
                    setattr(cfg, k, v)
            label = name if not changes else f"medtune {name}: {json.dumps(changes)}"
            # the train stage's attention choice: the varlen kernel for padding-free rows (train.run does the same)
            attn = changes.get("attn", "varlen" if p.padding_free or p.packing else None)
            out.append((label, cfg, train.lora_config(p), dict(quantization=p.quantization, cudnn_sdp=changes.get("cudnn_sdp", True),
                        attn=attn, lm_head_tile=p.lm_head_tile, torch_compile=p.torch_compile)))
        return out

    def gemma(quantization: str):
        if quantization == "none":
            return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if cuda else torch.float32).to(dev)
        q = train.quantization_config(recipe.model_copy(update={"quantization": quantization}))
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, quantization_config=q, device_map={"": 0})

    def llama(quantization: str):
        assert quantization == "none", "the random-weight Llama shape is measured unquantized"
        torch.manual_seed(0)
        dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16 if cuda else torch.float32)
        with torch.device(dev):  # initialised on the GPU in bf16: seconds, not a minute on the CPU
            model = LlamaForCausalLM(LlamaConfig(**LLAMA_1B))
        torch.set_default_dtype(dtype)
        return model

    results = {"device": device_name(), "versions": versions(), "command": " ".join(sys.argv),
               "recipe": recipe.model_dump(), "runs": []}
    for suite in suites or list(SUITES):
        label, bs, max_length, packing = SUITES[suite]
        need = 4 * bs * (steps + warmup + 2) * (max_length // 512 if packing else 1)  # packed rows hold ~4-6 examples
        cap = None if suite == "gemma" else LLAMA_1B["vocab_size"]
        rows = tokenized_pool(data, tok, need, max_answer_tokens=448, vocab_cap=cap)
        for name, cfg, peft_cfg, kw in runs_for(suite, bs, max_length, packing):
            try:
                r = run_one(name, gemma if suite == "gemma" else llama, tok, rows, cfg, peft_cfg, steps, warmup, **kw)
            except Exception as e:  # one configuration that cannot run here does not cost the others
                r = {"config": name, "failed": f"{type(e).__name__}: {str(e)[:300]}"}
                torch.backends.cuda.enable_cudnn_sdp(True)
            results["runs"].append({"suite": suite, "model": label} | r)
            click.echo(json.dumps(results["runs"][-1]), err=True)
            out.write_text(json.dumps(results, indent=2) + "\n")  # after every run: a cut-off call keeps what it measured


if __name__ == "__main__":
    main()

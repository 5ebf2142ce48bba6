"""GPU memory and speed of each reference recipe's training (recipes/*.yaml) without its base model (gated,
hub-only): a model of the same shape with random weights (memory and speed do not depend on the values), a
word-level tokenizer over the data's words (a word is about 1.3 Llama tokens), and the recipe's own params for everything that costs
memory or time (quantization, LoRA rank and targets, batch, accumulation, max length, gradient checkpointing,
optimizer, prompt template). The project's fetch -> clean -> split -> format -> train stages run as dvc.yaml
runs them, for a few optimizer steps on MedQuAD rows; `metrics/train.json` gives tokens/s and peak memory.

Run as (GPU, repository root):
    python benchmarks/bench_recipes.py --data medquad.jsonl --out results.json [--steps 12] [--recipe NAME]
"""

from __future__ import annotations

import gc
import importlib
import json
import shlex
import sys
import time
from pathlib import Path

import click
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from anywhere: import the project's stages

# config.json shapes of the recipes' base models (Llama-3-8B-Instruct has Llama-3.1-8B's shape)
SHAPES = {
    "llama-8b": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                               rope_theta=500000.0, tie_word_embeddings=False)),
    "llama-3.2-1b": ("llama", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=8192,
                                   rope_theta=500000.0, tie_word_embeddings=True)),
    "gemma-3-1b": ("gemma3_text", dict(vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
                                       num_attention_heads=4, num_key_value_heads=1, head_dim=256, max_position_embeddings=32768,
                                       sliding_window=512, rope_theta=1000000.0, query_pre_attn_scalar=256)),
}
RECIPES = {"alpaca_llama31_8b": "llama-8b", "medmcqa_llama31_8b": "llama-8b", "chatdoctor_llama3_8b_qlora": "llama-8b",
           "medquad_llama32_1b": "llama-3.2-1b", "mixed_gemma3_1b": "gemma-3-1b"}
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]


def build_model(shape: str, out: Path, words: list[str]) -> Path:
    """Random bf16 weights of `shape`, built on the GPU, saved as safetensors with a word-level tokenizer."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    if (out / "config.json").exists():
        return out
    vocab = {t: i for i, t in enumerate(SPECIALS + words)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>", additional_special_tokens=["<start_of_turn>", "<end_of_turn>"])
    kind, kw = SHAPES[shape]
    cfg = AutoConfig.for_model(kind, **kw, bos_token_id=vocab["<bos>"], eos_token_id=vocab["<eos>"], pad_token_id=vocab["<pad>"])
    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # cpu: a dry run of this script
        model = AutoModelForCausalLM.from_config(cfg)
    torch.set_default_dtype(torch.float32)
    model.generation_config.eos_token_id = [vocab["<eos>"], vocab["<end_of_turn>"]]
    model.save_pretrained(out, safe_serialization=True, max_shard_size="5GB")
    tok.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"built {shape}: {n / 1e9:.2f}B params in {time.perf_counter() - t0:.0f} s -> {out}", flush=True)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def recipe_params(name: str, model_dir: Path, data: Path, steps: int) -> dict:
    """params.yaml + the recipe, with the base model and the data swapped for the random model and the sample."""
    from medtune.models import local_revision

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    defaults = json.loads(json.dumps(params))
    for section, values in yaml.safe_load((REPO / "recipes" / f"{name}.yaml").read_text()).items():
        params[section].update(values)
    params["model"].update(base=str(model_dir), revision=local_revision(model_dir), chat_template="gemma3")
    params["fetch"] = defaults["fetch"] | {"source": f"data/source/{data.name}"}  # run_recipe copies it there
    params["clean"] = defaults["clean"] | {"near_dup_threshold": None}  # no MinHash: datasketch needs scipy
    params["split"]["near_dup_threshold"] = None
    params["train"].update(max_steps=steps, save_steps=0, eval_steps=0, load_best_model=False, logging_steps=1)
    return params


def run_recipe(name: str, model_dir: Path, data: Path, work: Path, steps: int) -> dict:
    import os
    import shutil

    import torch
    from click.testing import CliRunner

    (work / "data" / "source").mkdir(parents=True, exist_ok=True)
    shutil.copy(data, work / "data" / "source" / data.name)  # where fetch reads its sources
    params = recipe_params(name, model_dir, data, steps)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    cwd = Path.cwd()
    os.chdir(work)
    try:
        for stage in ("fetch", "clean", "split", "format", "train"):
            _python, _m, module, *args = shlex.split(stages[stage]["cmd"])
            t0 = time.perf_counter()
            result = CliRunner().invoke(importlib.import_module(module).main, args, catch_exceptions=True)
            if result.exit_code != 0:
                return {"recipe": name, "failed": stage, "output": result.output[-2000:], "error": repr(result.exception)}
            print(f"{name}: {stage} {time.perf_counter() - t0:.0f} s", flush=True)
        train = json.loads(Path("metrics/train.json").read_text())
        fmt = json.loads(Path("metrics/format.json").read_text())
    finally:
        os.chdir(cwd)
        gc.collect()
        torch.cuda.empty_cache()
    t = params["train"]
    return {"recipe": name, "shape": RECIPES[name], "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "settings": {k: t[k] for k in ("quantization", "lora_r", "target_modules", "batch_size", "grad_accum",
                                           "max_length", "gradient_checkpointing", "optim", "auto_find_batch_size")}
            | {"template": params["format"]["template"]},
            "train_rows": fmt.get("train", {}).get("rows"), "train_mean_tokens": fmt.get("train", {}).get("mean_tokens"),
            **{k: train.get(k) for k in ("steps", "tokens_trained", "tokens_per_s", "wall_s", "peak_memory_mb", "trainable_params")},
            "s_per_step": round(train["wall_s"] / train["steps"], 3)}


@click.command()
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data", default=str(REPO / "data/source/medquad_sample.jsonl"), show_default=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path), help="MedQuAD-format jsonl")
@click.option("--steps", default=12, show_default=True, help="optimizer steps per recipe (the first ones include warm-up)")
@click.option("--recipe", "names", multiple=True, type=click.Choice(list(RECIPES)), help="default: all five")
@click.option("--models", default="/tmp/bench-models", show_default=True, type=click.Path(file_okay=False, path_type=Path))
def main(out: Path, data: Path, steps: int, names: tuple[str, ...], models: Path) -> None:
    from medtune.io import read_jsonl

    rows = read_jsonl(data)
    words = sorted({w for r in rows for t in (r["question"], r["answer"]) for w in t.lower().split()} | {"user", "model"})
    results = []
    for name in names or list(RECIPES):
        model_dir = build_model(RECIPES[name], models / RECIPES[name], words)
        results.append(run_recipe(name, model_dir, data, Path("/tmp/bench-work") / name, steps))
        print(json.dumps(results[-1]), flush=True)
        out.write_text(json.dumps(results, indent=2) + "\n")  # after each recipe: a cut-off call keeps what finished


if __name__ == "__main__":
    main()

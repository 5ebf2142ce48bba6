"""Fixtures: a tiny causal LM + tokenizer built locally (no network), small real MedQuAD rows, and a temp
copy of the repository for `dvc repro` tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
ASSETS = Path(__file__).parent / "assets"
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]


@pytest.fixture(autouse=True)
def offline_env(tmp_path_factory, monkeypatch):
    """No network, HF caches in a temp folder; the medtune model cache is shared by the session's tests."""
    hf = tmp_path_factory.getbasetemp() / "hf-home"
    monkeypatch.setenv("HF_HOME", str(hf))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_rows() -> list[dict]:
    return [json.loads(line) for line in (ASSETS / "medquad_tiny.jsonl").read_text().splitlines() if line.strip()]


def build_tiny_model(out: Path, rows: list[dict]) -> Path:
    """A 2-layer Llama with a word-level tokenizer over the fixture's words, saved as safetensors."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = sorted({w for r in rows for t in (r["question"], r["answer"]) for w in t.lower().replace("\n", " ").split()}
                   | {"user", "model", "system"})
    vocab = {t: i for i, t in enumerate(SPECIALS + words)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.normalizer = None
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>", additional_special_tokens=["<start_of_turn>", "<end_of_turn>"])
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=vocab["<bos>"], eos_token_id=vocab["<eos>"], pad_token_id=vocab["<pad>"])
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = [vocab["<eos>"], vocab["<end_of_turn>"]]
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tiny_rows) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), tiny_rows)


def build_tiny_gguf_model(out: Path, rows: list[dict], arch: str) -> Path:
    """A 2-layer Gemma 3 or Llama whose tokenizer a GGUF can hold: SentencePiece-style BPE with byte fallback,
    trained here on the fixture's text (Gemma 3's merges rebuilt from token order, as transformers' GGUF reader
    builds them for the default model; Llama's as trained). Gemma's norms are random, so their +1 shows."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        GemmaTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
        LlamaTokenizer,
    )
    from transformers.tokenization_utils_base import generate_merges

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    bpe.train_from_iterator([f"{r['question']} {r['answer']}" for r in rows] + ["user model system"],
                            trainers.BpeTrainer(vocab_size=400, show_progress=False))
    trained = json.loads(bpe.to_str())["model"]
    specials = SPECIALS[:4] + ["<mask>"] + SPECIALS[4:]
    tokens = specials + [f"<0x{b:02X}>" for b in range(256)] + sorted(trained["vocab"], key=trained["vocab"].get)
    tokens += ["\u2581" * 2, "\u2581" * 3] if arch == "gemma3" else []  # Gemma's whitespace runs (GGUF: real spaces)
    vocab = {t: i for i, t in enumerate(tokens)}
    kw = {"extra_special_tokens": ["<start_of_turn>", "<end_of_turn>"], "add_bos_token": True}
    ids = {"bos_token_id": vocab["<bos>"], "eos_token_id": vocab["<eos>"], "pad_token_id": vocab["<pad>"]}
    torch.manual_seed(0)
    if arch == "gemma3":
        tok = GemmaTokenizer(vocab=vocab, merges=generate_merges(vocab, {t: -i for t, i in vocab.items()}), **kw)
        model = Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128,
                                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                                   head_dim=256, sliding_window=16, max_position_embeddings=512, **ids))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.normal_(0, 0.5)
    else:
        tok = LlamaTokenizer(vocab=vocab, merges=[tuple(m) for m in trained["merges"]], bos_token="<bos>",
                             eos_token="<eos>", pad_token="<pad>", unk_token="<unk>", **kw)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=512, tie_word_embeddings=False, **ids))
    model.generation_config.eos_token_id = [vocab["<eos>"], vocab["<end_of_turn>"]]
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_gguf_models(tmp_path_factory, tiny_rows) -> dict[str, Path]:
    """{"gemma3": folder, "llama": folder}: tiny models the GGUF export can write (tests/test_export.py)."""
    return {arch: build_tiny_gguf_model(tmp_path_factory.mktemp(f"tiny-{arch}"), tiny_rows, arch) for arch in ("gemma3", "llama")}


def tiny_params(tiny_model: Path) -> dict:
    """The repository's params.yaml, shrunk to the tiny model and a few steps."""
    from medtune.models import local_revision

    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["model"].update(base=str(tiny_model), revision=local_revision(tiny_model))
    p["fetch"]["source"] = "data/source/medquad_tiny.jsonl"
    p["split"].update(val_frac=0.2, test_frac=0.2)
    p["format"].update(max_answer_tokens=48, max_length=96)
    p["train"].update(max_steps=4, batch_size=2, save_steps=2, logging_steps=1, learning_rate=1e-3)
    p["evaluate"].update(max_examples=4, max_new_tokens=8, batch_size=4, bootstrap_samples=200, choice_max_examples=3)
    p["merge"].update(check_prompts=2, check_new_tokens=4)
    return p


@pytest.fixture
def repo_copy(tmp_path, tiny_model) -> Path:
    """A fresh git + DVC repository holding the project's code and the tiny fixture data."""
    dst = tmp_path / "repo"
    dst.mkdir()
    for name in ("medtune", "dvc.yaml", ".gitignore"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dst / name)
    (dst / "data" / "source").mkdir(parents=True)
    shutil.copy(ASSETS / "medquad_tiny.jsonl", dst / "data" / "source" / "medquad_tiny.jsonl")
    shutil.copy(REPO / "data" / "source" / "DATA_CARD.md", dst / "data" / "source" / "DATA_CARD.md")  # merge's model card cites it
    shutil.copytree(REPO / "data" / "benchmarks", dst / "data" / "benchmarks", ignore=shutil.ignore_patterns("__pycache__"))  # evaluate's choice test
    (dst / "params.yaml").write_text(yaml.safe_dump(tiny_params(tiny_model), sort_keys=False))
    env = os.environ.copy()
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.com"], ["git", "config", "user.name", "t"],
                ["dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=dst, check=True, env=env)
    return dst


@pytest.fixture(scope="session")
def formatted(tmp_path_factory, tiny_model) -> Path:
    """The tiny fixture rows through fetch, clean, split and format: data/formatted of the tiny model."""
    from medtune import params as P
    from medtune.stages import clean, fetch, split
    from medtune.stages import format as format_stage
    from tests.helpers import BASE, model_params, section

    d = tmp_path_factory.mktemp("data")
    fetch.run(section(P.FetchParams, tiny_model, "fetch", source=str(ASSETS / "medquad_tiny.jsonl")), BASE, d / "raw")
    clean.run(section(P.CleanParams, tiny_model, "clean"), d / "raw", d / "clean")
    split.run(section(P.SplitParams, tiny_model, "split"), BASE, d / "clean", d / "split")
    format_stage.run(section(P.FormatParams, tiny_model, "format"), model_params(tiny_model), d / "split", d / "fmt")
    return d / "fmt"


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory, tiny_model) -> Path:
    """A LoRA adapter with random (non-zero) B matrices, so tuned and base answers differ; saved like train's."""
    import torch
    from peft import LoraConfig, get_peft_model

    from medtune.io import write_json
    from medtune.models import load_model, load_tokenizer, local_revision
    from tests.helpers import model_params

    out = tmp_path_factory.mktemp("adapter")
    m = model_params(tiny_model)
    torch.manual_seed(1)
    model = get_peft_model(load_model(tiny_model, m), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                  init_lora_weights=False))
    model.save_pretrained(out)
    load_tokenizer(tiny_model, m).save_pretrained(out)
    (out / "README.md").write_text("peft's placeholder card\n")
    write_json(out / "run_config.json", {
        "params": {"base": {"seed": 3}, "model": {"base": str(tiny_model), "revision": local_revision(tiny_model), "chat_template": "gemma3_base",
                                                  "trust_remote_code": False},
                   "train": {"lora_r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "max_steps": 4,
                             "quantization": "none"}},
        "base_model": {"base": str(tiny_model), "kind": "local"}, "versions": {"peft": "test"}, "device": "cpu"})
    return out


@pytest.fixture(scope="session")
def workdir(tmp_path_factory, tiny_model) -> Path:
    """A folder to run the commands in: params.yaml (the repository's, shrunk), eval metrics and a data card."""
    from medtune.io import write_json

    d = tmp_path_factory.mktemp("use")
    p = tiny_params(tiny_model)
    p["card"].update(hub_ids={str(tiny_model): "medtune/tiny-llama"}, licenses={"medtune/tiny-llama": "apache-2.0"})
    (d / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    ci = [0.1, 0.3]
    for name, extra in (("eval_base", {}), ("eval_tuned", {f"delta_{k}": 0.05 for k in ("rougeL", "rouge1", "rouge2", "token_f1")}
                                          | {f"delta_{k}_ci": [0.01, 0.09] for k in ("rougeL", "rouge1", "rouge2", "token_f1")})):
        write_json(d / "metrics" / f"{name}.json", {"n": 7, "runaway_rate": 0.25, "repetition_rate": 0.5, "referral_rate": 0.125} | extra
                   | {k: 0.2 for k in ("rougeL", "rouge1", "rouge2", "token_f1")}
                   | {f"{k}_ci": ci for k in ("rougeL", "rouge1", "rouge2", "token_f1")})
    (d / "DATA_CARD.md").write_text((REPO / "data" / "source" / "DATA_CARD.md").read_text())
    return d

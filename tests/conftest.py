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


def tiny_params(tiny_model: Path) -> dict:
    """The repository's params.yaml, shrunk to the tiny model and a few steps."""
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["model"].update(base=str(tiny_model), revision=None)
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

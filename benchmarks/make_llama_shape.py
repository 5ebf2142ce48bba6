"""Build a model folder with Llama-3.2-1B's shape and random weights, for speed benchmarks of the real
`train` stage (speed depends on shapes and lengths, not on the weights) where the real model cannot be
downloaded. Its tokenizer is word-level over the most frequent words of a JSON-lines QA file (vocabulary
128,256 like Llama 3's) with the special tokens of the Gemma 3 chat format, so `model.chat_template: gemma3`
renders it; a word is one token, so a MedQuAD answer is ~25% fewer tokens than with a BPE tokenizer.

Run as:  python benchmarks/make_llama_shape.py --data medquad.jsonl --out /tmp/models/llama-1b-shape
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_train import LLAMA_1B

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]


@click.command()
@click.option("--data", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
def main(data: Path, out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    counts: Counter = Counter()
    for line in data.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            counts.update(f"{row['question']} {row['answer']}".lower().split())
    words = [w for w, _ in counts.most_common(LLAMA_1B["vocab_size"] - len(SPECIALS) - 3)]
    vocab = {t: i for i, t in enumerate(SPECIALS + ["user", "model", "system"] + [w for w in words if w not in ("user", "model", "system")])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>", additional_special_tokens=["<start_of_turn>", "<end_of_turn>"])
    torch.manual_seed(0)
    cfg = LlamaConfig(**(LLAMA_1B | {"bos_token_id": vocab["<bos>"], "eos_token_id": vocab["<eos>"],
                                     "pad_token_id": vocab["<pad>"]}))
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.generation_config.eos_token_id = [vocab["<eos>"], vocab["<end_of_turn>"]]
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    click.echo(f"{out}: Llama-3.2-1B shape, {n / 1e9:.2f}B parameters, vocabulary {len(vocab)} ({len(counts)} distinct words)", err=True)


if __name__ == "__main__":
    main()

"""Build a model folder with Llama-3.2-1B's shape and random weights, for speed benchmarks of the real
`train` stage (speed depends on shapes and lengths, not on the weights) where the real model cannot be
downloaded: bench_recipes.build_model's "llama-3.2-1b" shape (vocabulary 128,256) with its word-level tokenizer
over the words of a JSON-lines QA file, carrying the Gemma 3 chat format's special tokens, so
`model.chat_template: gemma3` renders it; a word is one token, so a MedQuAD answer is ~25% fewer tokens than
with a BPE tokenizer.

Run as:  python benchmarks/make_llama_shape.py --data medquad.jsonl --out /tmp/models/llama-1b-shape
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_recipes import build_model


@click.command()
@click.option("--data", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
def main(data: Path, out: Path) -> None:
    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
    words = sorted({w for r in rows for t in (r["question"], r["answer"]) for w in t.lower().split()} | {"user", "model"})
    build_model("llama-3.2-1b", out, words)


if __name__ == "__main__":
    main()

"""Evaluation-generation benchmark: the `evaluate` stage's batched generation (medtune.generation.greedy:
prompts sorted by length, left padding, batch of `--batch`) against a one-question-at-a-time loop and a
plain unsorted batch-64 loop (and, on a GPU, with cuDNN attention off and with a static KV cache), on the same model and test questions, greedy, in one process.

Run as (GPU):  python benchmarks/bench_generate.py --model /tmp/models/gemma-3-270m --data medquad.jsonl --out gen.json
The one-at-a-time loop runs on the first --loop-n questions only (it is slow) and its time is scaled to n;
answers are compared on those questions.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def timed(fn):
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, round(time.perf_counter() - t0, 2)


@click.command()
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--n", default=300, show_default=True)
@click.option("--max-new-tokens", default=256, show_default=True)
@click.option("--batch", default=320, show_default=True, help="evaluate.batch_size (the GPU recipe's: all in one batch)")
@click.option("--loop-n", default=20, show_default=True)
def main(model_dir: Path, data: Path, out: Path, n: int, max_new_tokens: int, batch: int, loop_n: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from medtune import params
    from medtune.generation import greedy
    from medtune.io import read_jsonl
    from medtune.models import (
        device_name,
        load_tokenizer,
        local_revision,
        stop_token_ids,
        versions,
    )
    from medtune.params import ModelParams
    from medtune.prompts import render

    repo = Path(__file__).resolve().parent.parent
    (fmt,) = params.load("format", path=repo / "params.yaml")
    m = ModelParams(base=str(model_dir), revision=local_revision(model_dir), chat_template="gemma3_base", trust_remote_code=False)
    tok = load_tokenizer(model_dir, m)
    rows = read_jsonl(data)[-n:]  # the end of the pool: other questions than bench_train's
    prompts = [render(tok, fmt, {"id": str(i), "question": r["question"]})[0] for i, r in enumerate(rows)]
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if cuda else torch.float32).to(dev).eval()
    stops = stop_token_ids(tok, model)

    def plain(batch_prompts, **kw):
        tok.padding_side = "left"
        enc = tok(batch_prompts, return_tensors="pt", padding=True).to(dev)
        with torch.no_grad():
            g = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                               pad_token_id=tok.pad_token_id, **kw)
        return [tok.decode([t for t in row if t not in stops and t != tok.pad_token_id], skip_special_tokens=True).strip()
                for row in g[:, enc["input_ids"].shape[1]:].tolist()]

    greedy(model, tok, prompts[:64], max_new_tokens, batch)  # warm-up (CUDA kernels, allocator)
    result = {"device": device_name(), "versions": versions(), "command": " ".join(sys.argv),
              "n": n, "max_new_tokens": max_new_tokens, "batch": batch}
    ours, result["medtune_generate_s"] = timed(lambda: greedy(model, tok, prompts, max_new_tokens, batch))
    out.write_text(json.dumps(result, indent=2) + "\n")  # each figure as soon as it is measured
    if cuda:  # cuDNN's attention builds a plan for every new sequence length: off for everything below
        torch.backends.cuda.enable_cudnn_sdp(False)
        greedy(model, tok, prompts[:64], max_new_tokens, batch)
        ours_nocudnn, result["medtune_generate_no_cudnn_sdp_s"] = timed(lambda: greedy(model, tok, prompts, max_new_tokens, batch))
        result["no_cudnn_same_answers_as_cudnn"] = f"{sum(a['answer'] == b['answer'] for a, b in zip(ours, ours_nocudnn))}/{n}"
        out.write_text(json.dumps(result, indent=2) + "\n")
    _, result["plain_batch64_loop_s"] = timed(lambda: [plain(prompts[i : i + 64]) for i in range(0, n, 64)])
    out.write_text(json.dumps(result, indent=2) + "\n")
    loop, loop_s = timed(lambda: [plain([q])[0] for q in prompts[:loop_n]])
    result["one_at_a_time_s_scaled"] = round(loop_s * n / loop_n, 1)
    result["one_at_a_time_measured_on"] = loop_n
    result["speedup_vs_one_at_a_time"] = round(result["one_at_a_time_s_scaled"] / result["medtune_generate_s"], 2)
    result["identical_answers_vs_one_at_a_time"] = f"{sum(a == b['answer'] for a, b in zip(loop, ours[:loop_n]))}/{loop_n}"
    result["new_tokens_generated"] = sum(o["new_tokens"] for o in ours)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if cuda:
        try:
            plain(prompts[:8], cache_implementation="static")
            _, result["static_cache_one_batch_s"] = timed(lambda: plain(prompts, cache_implementation="static"))
        except Exception as e:  # record why, keep the other numbers
            result["static_cache_one_batch_s"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
    result["runaway_rate"] = round(sum(not o["stopped"] for o in ours) / n, 3)
    out.write_text(json.dumps(result, indent=2) + "\n")
    click.echo(json.dumps(result), err=True)


if __name__ == "__main__":
    main()

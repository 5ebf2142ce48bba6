"""Evaluation-generation benchmark: the `evaluate` stage's batched generation (stages.evaluate.generate:
prompts sorted by length, left padding, batch of `--batch`) against a one-question-at-a-time loop and a
plain unsorted batch loop, on the same model and test questions, greedy, in one process.

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


@click.command()
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--n", default=300, show_default=True)
@click.option("--max-new-tokens", default=256, show_default=True)
@click.option("--batch", default=64, show_default=True)
@click.option("--loop-n", default=30, show_default=True)
def main(model_dir: Path, data: Path, out: Path, n: int, max_new_tokens: int, batch: int, loop_n: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from stages.common import read_jsonl
    from stages.evaluate import EvaluateParams, generate
    from stages.format import render
    from stages.modeling import ModelParams, device_name, load_tokenizer, stop_token_ids, versions

    m = ModelParams(base=str(model_dir), revision=None, chat_template="gemma3_base", trust_remote_code=False)
    tok = load_tokenizer(model_dir, m)
    rows = read_jsonl(data)[-n:]  # the end of the pool: other questions than bench_train's
    prompts = [render(tok, "", r["question"], "x")[0] for r in rows]
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if cuda else torch.float32).to(dev).eval()
    stops = stop_token_ids(tok, model)
    p = EvaluateParams(max_examples=0, max_new_tokens=max_new_tokens, batch_size=batch, bootstrap_samples=100, confidence=0.95)

    generate(model, tok, prompts[:batch], p)  # warm-up (CUDA kernels, allocator)
    sync()
    t0 = time.perf_counter()
    ours = generate(model, tok, prompts, p)
    sync()
    ours_s = time.perf_counter() - t0

    def plain(batch_prompts):
        tok.padding_side = "left"
        enc = tok(batch_prompts, return_tensors="pt", padding=True).to(dev)
        with torch.no_grad():
            g = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=tok.pad_token_id)
        return [tok.decode([t for t in row if t not in stops and t != tok.pad_token_id], skip_special_tokens=True).strip()
                for row in g[:, enc["input_ids"].shape[1]:].tolist()]

    t0 = time.perf_counter()
    for i in range(0, n, batch):
        plain(prompts[i : i + batch])
    sync()
    plain_batch_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    loop = [plain([q])[0] for q in prompts[:loop_n]]
    sync()
    loop_s = (time.perf_counter() - t0) * n / loop_n
    same = sum(a == b["answer"] for a, b in zip(loop, ours[:loop_n]))
    result = {
        "device": device_name(), "versions": versions(), "command": " ".join(sys.argv),
        "n": n, "max_new_tokens": max_new_tokens, "batch": batch,
        "medtune_generate_s": round(ours_s, 1),
        "plain_batch_loop_s": round(plain_batch_s, 1),
        "one_at_a_time_s_scaled": round(loop_s, 1), "one_at_a_time_measured_on": loop_n,
        "speedup_vs_one_at_a_time": round(loop_s / ours_s, 2),
        "speedup_vs_plain_batch": round(plain_batch_s / ours_s, 2),
        "identical_answers_vs_one_at_a_time": f"{same}/{loop_n}",
        "new_tokens_generated": sum(o["new_tokens"] for o in ours),
        "runaway_rate": round(sum(not o["stopped"] for o in ours) / n, 3),
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    click.echo(json.dumps(result), err=True)


if __name__ == "__main__":
    main()

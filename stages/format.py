"""Render each split into the exact text the model sees: `prompt` (chat template up to the answer) and
`completion` (the answer and the end-of-turn token). Training and evaluation both read these fields, so
there is one renderer.

DVC stage `format`.  Run by hand:  python -m stages.format --in data/split --out data/formatted --metrics metrics/format.json
Reads params `model`, `format`. Writes data/formatted/{train,val,test}.jsonl.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import click

from stages.common import (
    MedtuneError,
    atomic_dir,
    cli_errors,
    jsonl_text,
    load_params,
    log_params,
    read_jsonl,
    setup_logging,
    write_json,
    write_text_atomic,
)
from stages.modeling import ModelParams, end_of_turn, load_tokenizer, resolve_base

log = logging.getLogger("medtune.format")
SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class FormatParams:
    system_prompt: str  # "" for none; rendered as the chat template's system turn
    max_answer_tokens: int  # longer answers are cut at the last sentence end before this many tokens
    max_length: int  # prompt + completion tokens; longer examples are dropped from train/val

    def problems(self) -> list[str]:
        out = []
        if self.max_length < 64:
            out.append("max_length: must be >= 64")
        if not 8 <= self.max_answer_tokens < self.max_length:
            out.append("max_answer_tokens: must be >= 8 and below max_length")
        return out


def cut_answer(tok, answer: str, max_tokens: int) -> tuple[str, bool]:
    """Cut at a sentence end so the model learns complete answers that stop, not mid-sentence ones."""
    ids = tok(answer, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return answer, False
    head = tok.decode(ids[:max_tokens])
    end = max(head.rfind(". "), head.rfind(".\n"), head.rfind("? "), head.rfind("! "))
    return (head[: end + 1] if end > len(head) // 2 else head.rstrip()), True


def render(tok, system_prompt: str, question: str, answer: str) -> tuple[str, str]:
    """(prompt, completion) with prompt + completion == the chat template's full conversation, minus the BOS
    text that the tokenizer adds by itself."""
    msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": question}]
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": answer}], tokenize=False)
    if not full.startswith(prompt):
        raise MedtuneError("format: the chat template renders the prompt differently alone and before an answer; "
                           "choose another model.chat_template")
    completion = full[len(prompt):].rstrip()
    eot = end_of_turn(tok)
    if not completion.endswith(eot):
        completion += eot
    bos = tok.bos_token
    if bos and prompt.startswith(bos) and tok("x")["input_ids"][0] == tok.bos_token_id:
        prompt = prompt[len(bos):]
    return prompt, completion


def run(p: FormatParams, m: ModelParams, in_dir: Path, out_dir: Path) -> dict:
    tok = load_tokenizer(resolve_base(m)[0], m)
    summary: dict = {}
    outputs = {}
    for split in SPLITS:
        rows, truncated, too_long = [], 0, 0
        for r in read_jsonl(in_dir / f"{split}.jsonl"):
            answer, cut = cut_answer(tok, r["answer"], p.max_answer_tokens)
            prompt, completion = render(tok, p.system_prompt, r["question"], answer)
            n_prompt = len(tok(prompt)["input_ids"])
            n_tokens = len(tok(prompt + completion)["input_ids"])
            truncated += cut
            if n_tokens > p.max_length and split != "test":  # test keeps every question: generation needs only the prompt
                too_long += 1
                continue
            meta = {k: v for k, v in r.items() if k not in ("question", "answer")}
            rows.append(meta | {"question": r["question"], "reference": r["answer"], "prompt": prompt,
                                "completion": completion, "n_prompt_tokens": n_prompt, "n_tokens": n_tokens})
        if not rows:
            raise MedtuneError(f"{in_dir / f'{split}.jsonl'}: no examples left after formatting (format.max_length={p.max_length})")
        outputs[split] = rows
        summary[split] = {"rows": len(rows), "answers_truncated": truncated, "dropped_too_long": too_long,
                          "mean_tokens": round(sum(r["n_tokens"] for r in rows) / len(rows), 1)}
    with atomic_dir(out_dir) as tmp:
        for split, rows in outputs.items():
            write_text_atomic(tmp / f"{split}.jsonl", jsonl_text(rows))
    return summary


@click.command()
@click.option("--in", "in_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--metrics", "metrics_file", required=True, type=click.Path(dir_okay=False, path_type=Path))
def main(in_dir: Path, out_dir: Path, metrics_file: Path) -> None:
    setup_logging()
    with cli_errors():
        m, p = load_params(("model", ModelParams), ("format", FormatParams))
        log_params("format", m, p)
        summary = run(p, m, in_dir, out_dir)
        write_json(metrics_file, summary)
    log.info("formatted: %s", summary)


if __name__ == "__main__":
    main()

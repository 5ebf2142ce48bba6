"""`medtune chat`: ask the fine-tuned model a question from the terminal, streamed token by token; `--compare`
also streams the base model's answer to the same prompt.

    medtune chat --model models/merged "What are the symptoms of glaucoma ?"
    medtune chat --adapter models/adapter --compare "How is high blood pressure treated ?"
    medtune chat --adapter models/adapter --exp my-exp      # no question: one per line from stdin

The model is a merged model folder (`--model`, from the merge stage) or base + LoRA adapter (`--adapter`, from
the train stage). `--exp` takes that folder from a DVC experiment (a name from `dvc exp show`) or any git
revision instead of the workspace: its files come from the DVC cache, nothing is checked out. The prompt is the
training prompt (medtune/prompts.py) with the chat template recorded in the folder's run_config.json and the
`format` params of the same revision.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from medtune.assistant import (
    DISCLAIMER,
    Answer,
    ChatModel,
    Limits,
    limit_options,
    load_base,
    load_tuned,
    model_folder,
    trust_option,
)
from medtune.console import cli_errors, setup_logging


def ask(cm: ChatModel, question: str, limits: Limits, header: str | None) -> None:
    answer = Answer(cm, question, limits)
    if header:
        click.echo(header)
    for piece in answer:
        click.echo(piece, nl=False)
        sys.stdout.flush()
    click.echo()
    if answer.finish_reason == "length":
        click.echo(f"[stopped at {answer.max_new_tokens} tokens (--max-new-tokens)]", err=True)


@click.command()
@click.argument("question", required=False)
@click.option("--model", "model_dir", type=click.Path(file_okay=False, path_type=Path),
              help="a merged model folder (merge stage output), e.g. models/merged")
@click.option("--adapter", type=click.Path(file_okay=False, path_type=Path),
              help="a LoRA adapter folder (train stage output), e.g. models/adapter; loaded on its base model")
@click.option("--exp", help="take the folder from this DVC experiment or git revision instead of the workspace")
@click.option("--compare", is_flag=True, help="also stream the base model's answer to the same prompt")
@limit_options
@trust_option
def main(question: str | None, model_dir: Path | None, adapter: Path | None, exp: str | None, compare: bool,
         limits: Limits, trust_remote_code: bool) -> None:
    """Answer QUESTION (or each line of stdin) with the fine-tuned model, streamed."""
    setup_logging()
    path = model_folder(model_dir, adapter, exp)
    with cli_errors(kept=False):
        tuned, m = load_tuned(path, adapter is not None, exp, trust_remote_code)
        base = load_base(m, tuned.fmt) if compare else None
        click.echo(DISCLAIMER, err=True)
        for q in [question] if question is not None else (line.strip() for line in sys.stdin):
            if not q:
                continue
            ask(tuned, q, limits, f"── {tuned.label}" if base else None)
            if base:
                ask(base, q, limits, f"── {base.label}")


if __name__ == "__main__":
    main()

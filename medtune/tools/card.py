"""`medtune card`: print (or write) the model card of an adapter or merged model folder (medtune/cards.py).

    medtune card --model models/adapter --eval-base eval/base/metrics.json \
        --eval-tuned eval/tuned/metrics.json --data-card data/source/DATA_CARD.md --out adapter_card.md
Reads params `format`, `card`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from medtune import params
from medtune.cards import CardInputs, model_card, write_model_card
from medtune.console import cli_errors, setup_logging

log = logging.getLogger("medtune.card")


@click.command()
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="an adapter folder or a merged model folder (with run_config.json)")
@click.option("--eval-base", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--eval-tuned", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--data-card", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="write here instead of stdout")
def main(model_dir: Path, eval_base: Path, eval_tuned: Path, data_card: Path, out: Path | None) -> None:
    """Print the model card of an adapter or merged model folder (or write it with --out)."""
    setup_logging()
    with cli_errors(kept=False):
        fmt, cp = params.load("format", "card")
        kind = "adapter" if (model_dir / "adapter_config.json").exists() else "merged"
        inp = CardInputs(cp, fmt, eval_base, eval_tuned, data_card)
        if out is None:
            click.echo(model_card(model_dir, kind, inp), nl=False)
        else:
            log.info("wrote the %s card to %s", kind, write_model_card(model_dir, kind, inp, out))


if __name__ == "__main__":
    main()

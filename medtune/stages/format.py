"""Render each split into the exact text the model sees: `prompt` (everything up to the answer) and
`completion` (the answer and its end token), with the token counts. Training and evaluation both read these
fields; the renderer itself is medtune/prompts.py, which chat and serve use too.

DVC stage `format`.  Run by hand:  python -m medtune.stages.format --in data/split --out data/formatted --metrics metrics/format.json
Reads params `model`, `format`. Writes data/formatted/{train,val,test}.jsonl and summary.json (the counts per split),
and the totals to the metrics file.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import click

from medtune import params
from medtune.console import cli_errors, log_params, setup_logging
from medtune.io import atomic_dir, jsonl_text, read_jsonl, write_json, write_text_atomic
from medtune.models import load_tokenizer, resolve_base
from medtune.params import FormatParams, ModelParams
from medtune.prompts import format_split

log = logging.getLogger("medtune.format")
SPLITS = ("train", "val", "test")


def run(p: FormatParams, m: ModelParams, in_dir: Path, out_dir: Path) -> dict:
    tok = load_tokenizer(resolve_base(m)[0], m)
    outputs, summary = {}, {}
    for split in SPLITS:
        src = in_dir / f"{split}.jsonl"
        outputs[split], summary[split] = format_split(tok, p, read_jsonl(src), src, keep_long=split == "test")
    with atomic_dir(out_dir) as tmp:
        for split, rows in outputs.items():
            write_text_atomic(tmp / f"{split}.jsonl", jsonl_text(rows))
        write_json(tmp / "summary.json", summary)
    return summary


def headline(s: dict) -> dict:
    """The few numbers `dvc exp show` and `dvc metrics show` list."""
    return ({f"rows_{split}": s[split]["rows"] for split in SPLITS}
            | {"answers_truncated": s["train"]["answers_truncated"], "mean_tokens_train": s["train"]["mean_tokens"],
               "dropped_too_long": sum(s[split]["dropped_too_long"] for split in SPLITS)})


@click.command()
@click.option("--in", "in_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--metrics", "metrics_file", required=True, type=click.Path(dir_okay=False, path_type=Path))
def main(in_dir: Path, out_dir: Path, metrics_file: Path) -> None:
    started = time.perf_counter()  # the stage's wall time, recorded in its metrics
    setup_logging()
    with cli_errors():
        m, p = params.load("model", "format")
        log_params("format", ("model", m), ("format", p))
        summary = run(p, m, in_dir, out_dir)
        write_json(metrics_file, headline(summary) | {"wall_s": round(time.perf_counter() - started, 1)})
    log.info("formatted: %s", summary)


if __name__ == "__main__":
    main()

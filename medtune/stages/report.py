"""Data-quality report: rows in/out per data stage with drop reasons, duplicates, the leakage check, token
lengths, likely PHI left in the training data, counts per source/qtype/answer option, and rendered training
examples with their loss mask (medtune/quality.py).

DVC stage `report`.  Run by hand:
  python -m medtune.stages.report --raw data/raw --clean data/clean --split data/split --data data/formatted \
      --out metrics/data_quality.json --details reports/data_quality.json --markdown reports/data_quality.md
Reads params `model`, `format`, `report`. Writes a few key figures as DVC metrics (flat JSON, so `dvc exp show`
shows them as columns), the full breakdown as JSON beside the markdown page.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import click

from medtune import params
from medtune.console import cli_errors, log_params, setup_logging
from medtune.io import read_json, read_jsonl, write_json, write_text_atomic
from medtune.models import load_tokenizer, resolve_base
from medtune.params import FormatParams, ModelParams, ReportParams
from medtune.quality import SPLITS, quality_report

log = logging.getLogger("medtune.report")


def run(p: ReportParams, f: FormatParams, m: ModelParams, raw_dir: Path, clean_dir: Path, split_dir: Path,
        data_dir: Path) -> tuple[dict, dict, str]:
    """(key figures, full breakdown, markdown) from the data stages' outputs and the counts they keep beside them."""
    counts = (read_json(x) for x in (raw_dir / "manifest.json", clean_dir / "summary.json", split_dir / "summary.json",
                                     data_dir / "summary.json"))
    rows = {s: read_jsonl(data_dir / f"{s}.jsonl") for s in SPLITS}
    tok = load_tokenizer(resolve_base(m)[0], m)
    return quality_report(p, f, tok, *counts, rows)


@click.command()
@click.option("--raw", "raw_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--clean", "clean_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--split", "split_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="the formatted data")
@click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--details", "details_file", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--markdown", "md_file", required=True, type=click.Path(dir_okay=False, path_type=Path))
def main(raw_dir, clean_dir, split_dir, data_dir, out_file, details_file, md_file) -> None:
    started = time.perf_counter()  # the stage's wall time, recorded in its metrics
    setup_logging()
    with cli_errors():
        m, f, p = params.load("model", "format", "report")
        log_params("report", ("report", p))
        key, details, md = run(p, f, m, raw_dir, clean_dir, split_dir, data_dir)
        write_text_atomic(md_file, md)
        write_json(details_file, details)
        write_json(out_file, key | {"wall_s": round(time.perf_counter() - started, 1)})  # last: the DVC metrics file
    log.info("data quality: %s", key)


if __name__ == "__main__":
    main()

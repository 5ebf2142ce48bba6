"""Normalise text, drop unusable, too short/long, duplicate and near-duplicate records, and flag (or mask, or
drop) likely personal health information, counting every drop by reason (medtune/cleaning.py).

DVC stage `clean`.  Run by hand:  python -m medtune.stages.clean --in data/raw --out data/clean --metrics metrics/clean.json
Reads params `clean`. Writes data/clean/records.jsonl and summary.json (every count by reason), and the totals to
the metrics file.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import click

from medtune import params
from medtune.cleaning import clean_rows
from medtune.console import cli_errors, log_params, setup_logging
from medtune.io import atomic_dir, jsonl_text, read_jsonl, write_json, write_text_atomic
from medtune.params import CleanParams

log = logging.getLogger("medtune.clean")


def run(p: CleanParams, in_dir: Path, out_dir: Path) -> dict:
    src = in_dir / "records.jsonl"
    kept, summary = clean_rows(p, read_jsonl(src), src)
    with atomic_dir(out_dir) as tmp:
        write_text_atomic(tmp / "records.jsonl", jsonl_text(kept))
        write_json(tmp / "summary.json", summary)  # every count by reason; the metrics file keeps the totals
    return summary


def headline(s: dict) -> dict:
    """The few numbers `dvc exp show` and `dvc metrics show` list."""
    return {"rows_in": s["rows_in"], "rows_out": s["rows_out"], "dropped": sum(s["dropped"].values()),
            "duplicates": s["duplicates"], "phi_rows": s["phi_rows"]}


@click.command()
@click.option("--in", "in_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--metrics", "metrics_file", required=True, type=click.Path(dir_okay=False, path_type=Path))
def main(in_dir: Path, out_dir: Path, metrics_file: Path) -> None:
    started = time.perf_counter()  # the stage's wall time, recorded in its metrics
    setup_logging()
    with cli_errors():
        (p,) = params.load("clean")
        log_params("clean", ("clean", p))
        summary = run(p, in_dir, out_dir)
        write_json(metrics_file, headline(summary) | {"wall_s": round(time.perf_counter() - started, 1)})
    log.info("kept %s of %s rows; dropped %s; likely PHI %s (%s)", f"{summary['rows_out']:,}", f"{summary['rows_in']:,}",
             summary["dropped"], summary["phi"], p.phi)


if __name__ == "__main__":
    main()

"""Split cleaned records into train/val/test by group, so that no topic, document, repeated question or
near-duplicate answer straddles train and test; then prove it (medtune/splitting.py).

DVC stage `split`.  Run by hand:  python -m medtune.stages.split --in data/clean --out data/split --metrics metrics/split.json
Reads params `base`, `split`. Writes data/split/{train,val,test}.jsonl and summary.json (counts, leaks dropped, the
leakage check), and the totals to the metrics file.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import click

from medtune import params
from medtune.console import cli_errors, log_params, setup_logging
from medtune.io import atomic_dir, jsonl_text, read_jsonl, write_json, write_text_atomic
from medtune.params import BaseParams, SplitParams
from medtune.splitting import SPLITS, split_rows

log = logging.getLogger("medtune.split")


def run(p: SplitParams, base: BaseParams, in_dir: Path, out_dir: Path) -> dict:
    src = in_dir / "records.jsonl"
    parts, summary = split_rows(p, base.seed, read_jsonl(src), src)
    with atomic_dir(out_dir) as tmp:
        for s in SPLITS:
            write_text_atomic(tmp / f"{s}.jsonl", jsonl_text(parts[s]))
        write_json(tmp / "summary.json", summary)
    return summary


def headline(s: dict) -> dict:
    """The few numbers `dvc exp show` and `dvc metrics show` list."""
    return {k: s[k] for k in (*SPLITS, "groups", "leakage_ok")} | {"dropped_leaks": sum(s["dropped_leaks"].values())}


@click.command()
@click.option("--in", "in_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--metrics", "metrics_file", required=True, type=click.Path(dir_okay=False, path_type=Path))
def main(in_dir: Path, out_dir: Path, metrics_file: Path) -> None:
    started = time.perf_counter()  # the stage's wall time, recorded in its metrics
    setup_logging()
    with cli_errors():
        base, p = params.load("base", "split")
        log_params("split", ("split", p))
        summary = run(p, base, in_dir, out_dir)
        write_json(metrics_file, headline(summary) | {"wall_s": round(time.perf_counter() - started, 1)})
    log.info("split sizes: %s", summary)


if __name__ == "__main__":
    main()

"""Load one or more medical QA sources and write them as canonical records to data/raw.

Sources: a jsonl/csv/parquet file, a saved `datasets` folder, a folder of MedQuAD XML files, or a hub dataset
`hf:<id>` at a pinned revision; `fetch.columns` maps source columns onto the canonical fields, so every
dataset shape goes through the same later stages (medtune/sources.py). `fetch.mix` appends more sources
with their own column names; `max_rows` keeps a seeded random subset of the whole.

DVC stage `fetch`.  Run by hand:  python -m medtune.stages.fetch --out data/raw --metrics metrics/fetch.json
Reads params `base`, `fetch`. Writes data/raw/records.jsonl, then data/raw/manifest.json last, so a
manifest means the fetch completed; the row count and wall time to the metrics file.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import click

from medtune import params
from medtune.console import MedtuneError, cli_errors, log_params, setup_logging
from medtune.io import atomic_dir, jsonl_text, write_json, write_text_atomic
from medtune.params import BaseParams, FetchParams
from medtune.sources import collect, location_problem

log = logging.getLogger("medtune.fetch")


def run(p: FetchParams, base: BaseParams, out_dir: Path) -> dict:
    records, counts = collect(p, base.seed)
    text = jsonl_text(records)
    with atomic_dir(out_dir) as tmp:
        write_text_atomic(tmp / "records.jsonl", text)
        manifest = {"source": p.source, "revision": p.revision, "split": p.split, "sources": counts,
                    "rows": len(records), "sha256": hashlib.sha256(text.encode()).hexdigest()}
        write_json(tmp / "manifest.json", manifest)  # last: its presence means the fetch completed
    return {"rows": len(records), "sources": counts}


@click.command()
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--metrics", "metrics_file", required=True, type=click.Path(dir_okay=False, path_type=Path))
def main(out_dir: Path, metrics_file: Path) -> None:
    started = time.perf_counter()  # the stage's wall time, recorded in its metrics
    setup_logging()
    with cli_errors():
        base, p = params.load("base", "fetch")
        if problems := [why for s in [p, *p.mix] if (why := location_problem(s.source))]:
            raise MedtuneError("; ".join(problems))
        log_params("fetch", ("fetch", p))
        summary = run(p, base, out_dir)
        write_json(metrics_file, {"rows": summary["rows"], "wall_s": round(time.perf_counter() - started, 1)})
    log.info("fetched %s rows from %s -> %s", f"{summary['rows']:,}", summary["sources"], out_dir)


if __name__ == "__main__":
    main()

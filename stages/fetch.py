"""Load a QA dataset (local jsonl/csv/parquet file, a local `datasets` folder, or a hub dataset at a pinned
revision) and write it as canonical records {id, question, answer, ...metadata} to data/raw.

DVC stage `fetch`.  Run by hand:  python -m stages.fetch --out data/raw
Reads params `base`, `fetch`. Writes data/raw/records.jsonl, then data/raw/manifest.json last, so a
manifest means the fetch completed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path
import click

from stages.common import (
    BaseParams,
    MedtuneError,
    atomic_dir,
    cli_errors,
    jsonl_text,
    load_params,
    log_params,
    setup_logging,
    write_json,
    write_text_atomic,
)

log = logging.getLogger("medtune.fetch")
FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclasses.dataclass(frozen=True)
class FetchParams:
    source: str  # a repo-relative file or folder, or "hf:<dataset id>"
    revision: str | None  # required for hf: sources (commit sha or tag)
    split: str
    columns: dict[str, str]  # canonical field -> source column; must map question and answer
    id_column: str | None  # None: ids are "<split>/<row number>"
    max_rows: int | None  # seeded random subset; None keeps every row

    def problems(self) -> list[str]:
        out = []
        missing = {"question", "answer"} - set(self.columns)
        if missing:
            out.append(f"columns: must map {', '.join(sorted(missing))} (canonical field -> source column)")
        if self.source.startswith("hf:") and not self.revision:
            out.append("revision: a hub dataset needs a pinned revision (commit sha or tag)")
        if self.max_rows is not None and self.max_rows < 1:
            out.append("max_rows: must be >= 1 or null")
        return out


def load_table(p: FetchParams):
    """Return a `datasets.Dataset` for the source. Real `datasets` loading code for every kind of source."""
    import datasets

    if p.source.startswith("hf:"):
        try:
            return datasets.load_dataset(p.source[3:], revision=p.revision, split=p.split)
        except Exception as e:  # offline, unknown id, unknown revision
            raise MedtuneError(
                f"fetch.source {p.source!r} @ {p.revision}: could not load ({type(e).__name__}: {e}). "
                "Without network, save it with `datasets.save_to_disk` and point fetch.source at that folder."
            ) from None
    path = Path(p.source)
    if not path.exists():
        raise MedtuneError(f"fetch.source {p.source!r}: file or folder not found")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if p.split not in ds:
                    raise MedtuneError(f"{path}: no split {p.split!r} (has {', '.join(ds)})")
                ds = ds[p.split]
            return ds
        return datasets.load_dataset(str(path), split=p.split)
    kind = FILE_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise MedtuneError(f"{path}: unknown file type {path.suffix!r} (expected {', '.join(FILE_FORMATS)})")
    if path.stat().st_size == 0:
        raise MedtuneError(f"{path}: file is empty")
    if kind == "json":
        from stages.common import read_jsonl  # exact line numbers for malformed lines

        rows = read_jsonl(path)
        if not rows:
            raise MedtuneError(f"{path}: no records")
        return datasets.Dataset.from_list(rows)
    try:
        return datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as e:
        raise MedtuneError(f"{path}: could not read as {kind} ({type(e).__name__}: {e})") from None


def to_records(table, p: FetchParams) -> list[dict]:
    """Map source columns onto canonical fields; a missing column names the file and column."""
    names = set(table.column_names)
    missing = [f"{field} <- {col!r}" for field, col in p.columns.items() if col not in names]
    if p.id_column and p.id_column not in names:
        missing.append(f"id <- {p.id_column!r}")
    if missing:
        raise MedtuneError(
            f"{p.source}: missing columns {', '.join(missing)} (has {', '.join(sorted(names))}); set fetch.columns"
        )
    records = []
    for i, row in enumerate(table):
        rec = {"id": str(row[p.id_column]) if p.id_column else f"{p.split}/{i}"}
        for field, col in p.columns.items():
            rec[field] = row[col]
        records.append(rec)
    return records


def run(p: FetchParams, base: BaseParams, out_dir: Path) -> dict:
    table = load_table(p)
    if len(table) == 0:
        raise MedtuneError(f"{p.source}: no records")
    if p.max_rows is not None and p.max_rows < len(table):
        table = table.shuffle(seed=base.seed).select(range(p.max_rows))
    records = to_records(table, p)
    text = jsonl_text(records)
    with atomic_dir(out_dir) as tmp:
        write_text_atomic(tmp / "records.jsonl", text)
        manifest = {
            "source": p.source,
            "revision": p.revision,
            "split": p.split,
            "rows": len(records),
            "sha256": hashlib.sha256(text.encode()).hexdigest(),
        }
        write_json(tmp / "manifest.json", manifest)  # last: its presence means the fetch completed
    return {"rows": len(records)}


@click.command()
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
def main(out_dir: Path) -> None:
    setup_logging()
    with cli_errors():
        base, p = load_params(("base", BaseParams), ("fetch", FetchParams))
        log_params("fetch", p)
        summary = run(p, base, out_dir)
    log.info("fetched %s rows from %s -> %s", f"{summary['rows']:,}", p.source, out_dir)


if __name__ == "__main__":
    main()

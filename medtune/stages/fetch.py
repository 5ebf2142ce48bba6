"""Load one or more medical QA sources and write them as canonical records to data/raw.

Sources: a jsonl/csv/parquet file, a saved `datasets` folder, a folder of MedQuAD XML files, or a hub
dataset `hf:<id>` at a pinned revision. `fetch.columns` maps source columns onto the canonical fields,
so every dataset shape goes through the same later stages:

  question/answer (+ metadata: source, focus, qtype, url, ...)        MedQuAD
  instruction / context / question -> answer                          Alpaca-style, ChatDoctor, PubMedQA
  question + options + correct (+ explanation); answer = correct text MedMCQA-style multiple choice
  messages: [{role, content}, ...] ending with the assistant's turn   multi-turn dialogue

`fetch.mix` appends more sources with their own column names (mixed collections); `max_rows` keeps a
seeded random subset of the whole.

DVC stage `fetch`.  Run by hand:  python -m medtune.stages.fetch --out data/raw
Reads params `base`, `fetch`. Writes data/raw/records.jsonl, then data/raw/manifest.json last, so a
manifest means the fetch completed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import string
from collections import Counter
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Literal

import click
import numpy as np

from medtune.common import (
    BaseParams,
    MedtuneError,
    atomic_dir,
    cli_errors,
    jsonl_text,
    load_params,
    log_params,
    parse_section,
    read_jsonl,
    setup_logging,
    write_json,
    write_text_atomic,
)

log = logging.getLogger("medtune.fetch")
FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
TEXT_FIELDS = ("question", "answer", "instruction", "context", "explanation")
LETTERS = string.ascii_uppercase


@dataclasses.dataclass(frozen=True)
class Source:
    source: str  # a repo-relative file or folder, or "hf:<dataset id>"
    revision: str | None  # required for hf: sources (commit sha or tag)
    subset: str | None  # a hub dataset's configuration (subset) name; None: its default
    split: str  # which split of a hub / saved dataset
    columns: dict[str, str]  # canonical field -> source column
    id_column: str | None  # None: ids are "<split>/<row number>"

    def problems(self) -> list[str]:
        out = []
        c = set(self.columns)
        if "messages" not in c and not ({"question", "answer"} <= c or {"question", "correct"} <= c):
            out.append("columns: map question and answer (or question and correct for multiple choice, "
                       "or messages for dialogue); canonical field -> source column")
        if self.source.startswith("hf:") and not self.revision:
            out.append("revision: a hub dataset needs a pinned revision (commit sha or tag)")
        if self.subset is not None and not self.source.startswith("hf:"):
            out.append("subset: only hub datasets (hf:...) have subsets; set null")
        return out


@dataclasses.dataclass(frozen=True)
class FetchParams(Source):
    option_columns: list[str]  # multiple choice: one option per column, lettered A, B, ... ([]: none)
    fixed_options: list[str]  # the same options for every row, e.g. ["yes", "no", "maybe"] ([]: none)
    answer_key: Literal["letter", "index0", "index1", "text"]  # how the `correct` column names the option
    mix: list[dict]  # more sources appended, each {source, revision, subset, split, columns, id_column}
    max_rows: int | None  # seeded random subset of all sources together; None keeps every row

    def problems(self) -> list[str]:
        out = super().problems()
        for i, item in enumerate(self.mix):
            out += [p for p in parse_section(item, f"mix[{i}]", Source)[1]]
        if self.option_columns and self.fixed_options:
            out.append("option_columns/fixed_options: set at most one")
        if self.max_rows is not None and self.max_rows < 1:
            out.append("max_rows: must be >= 1 or null")
        return out


def check_utf8(path: Path) -> None:
    """Name the line of the first non-UTF-8 byte: the file was probably saved in another encoding."""
    with path.open("rb") as f:
        for n, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise MedtuneError(f"{path}: not UTF-8 text at line {n}, byte {e.start + 1} ({e.reason}); "
                                   "re-save it as UTF-8") from None


def read_json_array(path: Path) -> list[dict]:
    """A .json file holding one array of records (ChatDoctor's own files are like this)."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise MedtuneError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(rows, list):
        raise MedtuneError(f"{path}: expected an array of records or JSON lines, got a {type(rows).__name__}")
    if (bad := next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)) is not None:
        raise MedtuneError(f"{path}: item {bad} of the array is a {type(rows[bad]).__name__}, expected a JSON object")
    return rows


def read_medquad_xml(folder: Path) -> list[dict]:
    """MedQuAD's own layout: <Document id source url><Focus/>...<QAPairs><QAPair pid><Question qid qtype/><Answer/>."""
    rows = []
    for path in sorted(folder.rglob("*.xml")):
        try:
            doc = ET.parse(path).getroot()
        except ET.ParseError as e:
            raise MedtuneError(f"{path}:{e.position[0]}: malformed XML ({e})") from None
        collection = path.parent.name
        for pair in doc.iter("QAPair"):
            q, a = pair.find("Question"), pair.find("Answer")
            rows.append({
                "id": f"{collection}/{path.stem}/{pair.get('pid')}", "collection": collection,
                "source": doc.get("source"), "url": doc.get("url"), "focus": doc.findtext("Focus"),
                "qtype": q.get("qtype") if q is not None else None,
                "question": q.text if q is not None else None, "answer": a.text if a is not None else None,
            })
    return rows


def load_rows(s: Source) -> list[dict]:
    """The source's rows as plain dicts, read with `datasets` (or line by line for jsonl, for line numbers)."""
    import datasets

    if s.source.startswith("hf:"):
        try:
            return datasets.load_dataset(s.source[3:], s.subset, revision=s.revision, split=s.split).to_list()
        except Exception as e:  # offline, unknown id, unknown revision
            raise MedtuneError(
                f"fetch.source {s.source!r} ({s.subset or 'default subset'}) @ {s.revision}: could not load ({type(e).__name__}: {e}). "
                "Without network, save it with `datasets.save_to_disk` and point fetch.source at that folder."
            ) from None
    path = Path(s.source)
    if not path.exists():
        raise MedtuneError(f"fetch.source {s.source!r}: file or folder not found")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if s.split not in ds:
                    raise MedtuneError(f"{path}: no split {s.split!r} (has {', '.join(ds)})")
                ds = ds[s.split]
            return ds.to_list()
        if any(path.rglob("*.xml")):
            return read_medquad_xml(path)
        return datasets.load_dataset(str(path), split=s.split).to_list()
    kind = FILE_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise MedtuneError(f"{path}: unknown file type {path.suffix!r} (expected {', '.join(FILE_FORMATS)})")
    if path.stat().st_size == 0:
        raise MedtuneError(f"{path}: file is empty")
    if kind == "json":
        check_utf8(path)
        if path.read_text(encoding="utf-8").lstrip().startswith("["):
            return read_json_array(path)
        return read_jsonl(path)  # exact line numbers for malformed lines; no type coercion across rows
    try:
        return datasets.load_dataset(kind, data_files=str(path), split="train").to_list()
    except Exception as e:
        raise MedtuneError(f"{path}: could not read as {kind} ({type(e).__name__}: {e})") from None


def options_of(row: dict, rec: dict, p: FetchParams) -> dict | None:
    if p.option_columns:
        return {LETTERS[i]: row.get(c) for i, c in enumerate(p.option_columns)}
    if p.fixed_options:
        return {LETTERS[i]: o for i, o in enumerate(p.fixed_options)}
    opts = rec.get("options")
    if isinstance(opts, list):
        return {LETTERS[i]: o for i, o in enumerate(opts)}
    if isinstance(opts, dict):
        return {str(k).strip().upper(): v for k, v in opts.items()}
    return opts  # None (not multiple choice) or a wrong type, which clean drops


def correct_letter(value, options: dict, key: str) -> str | None:
    """The correct option's letter, or None when `value` does not name one of `options`."""
    letters = list(options)
    if key in ("index0", "index1") and isinstance(value, str) and value.strip().isdigit():
        value = int(value)  # a csv column read as text
    if key == "letter" and isinstance(value, str) and value.strip().upper() in options:
        return value.strip().upper()
    if key in ("index0", "index1") and isinstance(value, int) and not isinstance(value, bool):
        i = value - (key == "index1")
        return letters[i] if 0 <= i < len(letters) else None
    if key == "text" and isinstance(value, str):
        hits = [k for k, v in options.items() if isinstance(v, str) and v.strip().lower() == value.strip().lower()]
        return hits[0] if len(hits) == 1 else None
    return None


def to_records(rows: list[dict], s: Source, p: FetchParams, prefix: str) -> list[dict]:
    """Map source columns onto canonical fields; a column that no row has names the file and column."""
    names = set().union(*(r.keys() for r in rows))
    missing = [f"{field} <- {col!r}" for field, col in s.columns.items() if col not in names]
    missing += [f"option <- {c!r}" for c in p.option_columns if c not in names]
    if s.id_column and s.id_column not in names:
        missing.append(f"id <- {s.id_column!r}")
    if missing:
        raise MedtuneError(f"{s.source}: missing columns {', '.join(missing)} (has {', '.join(sorted(names))}); set fetch.columns")
    records = []
    for i, row in enumerate(rows):
        rec = {"id": prefix + (str(row.get(s.id_column)) if s.id_column else f"{s.split}/{i}")}
        rec |= {field: row.get(col) for field, col in s.columns.items()}
        if isinstance(rec.get("context"), list) and all(isinstance(c, str) for c in rec["context"]):
            rec["context"] = "\n\n".join(rec["context"])  # PubMedQA: abstract sections
        if "correct" in rec:
            rec["options"] = options_of(row, rec, p)
            ok = isinstance(rec["options"], dict)
            rec["correct"] = correct_letter(rec["correct"], rec["options"], p.answer_key) if ok else None
            rec["answer"] = rec["options"][rec["correct"]] if rec["correct"] else None
        records.append(rec)
    return records


def run(p: FetchParams, base: BaseParams, out_dir: Path) -> dict:
    sources = [p] + [Source(**m) for m in p.mix]
    records, counts = [], {}
    for s in sources:
        rows = load_rows(s)
        if not rows:
            raise MedtuneError(f"{s.source}: no records")
        name = s.subset or s.source.removeprefix("hf:").rstrip("/").split("/")[-1].rsplit(".", 1)[0]
        recs = to_records(rows, s, p, prefix=f"{name}/" if p.mix else "")
        if p.mix:
            recs = [r | {"collection": name} for r in recs]
        counts[s.source] = len(recs)
        records += recs
    if p.max_rows is not None and p.max_rows < len(records):
        keep = np.random.default_rng(base.seed).choice(len(records), size=p.max_rows, replace=False)
        records = [records[i] for i in sorted(keep)]
    dups = [i for i, n in Counter(r["id"] for r in records).items() if n > 1]
    if dups:
        dup = dups[0]
        raise MedtuneError(f"{p.source}: id {dup!r} occurs more than once; set fetch.id_column to a unique column or null")
    text = jsonl_text(records)
    with atomic_dir(out_dir) as tmp:
        write_text_atomic(tmp / "records.jsonl", text)
        manifest = {
            "source": p.source,
            "revision": p.revision,
            "split": p.split,
            "sources": counts,
            "rows": len(records),
            "sha256": hashlib.sha256(text.encode()).hexdigest(),
        }
        write_json(tmp / "manifest.json", manifest)  # last: its presence means the fetch completed
    return {"rows": len(records), "sources": counts}


@click.command()
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
def main(out_dir: Path) -> None:
    setup_logging()
    with cli_errors():
        base, p = load_params(("base", BaseParams), ("fetch", FetchParams))
        log_params("fetch", p)
        summary = run(p, base, out_dir)
    log.info("fetched %s rows from %s -> %s", f"{summary['rows']:,}", summary["sources"], out_dir)


if __name__ == "__main__":
    main()

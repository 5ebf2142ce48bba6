"""Reading the sources `fetch` loads: jsonl/csv/parquet files, saved `datasets` folders, MedQuAD's XML layout and
hub datasets at a pinned revision, mapped onto canonical records by `fetch.columns`:

  question/answer (+ metadata: source, focus, qtype, url, ...)        MedQuAD
  instruction / context / question -> answer                          Alpaca-style, ChatDoctor, PubMedQA
  question + options + correct (+ explanation); answer = correct text MedMCQA-style multiple choice
  messages: [{role, content}, ...] ending with the assistant's turn   multi-turn dialogue
"""

from __future__ import annotations

import json
import string
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

from medtune.console import MedtuneError
from medtune.io import read_jsonl
from medtune.params import FetchParams, Source

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SOURCE_DIR = Path("data/source")  # dvc.yaml's fetch stage depends on this folder: a source elsewhere is not tracked
LETTERS = string.ascii_uppercase


def location_problem(source: str) -> str | None:
    """Why a source is not one DVC tracks: a file or folder under data/source/ (relative), or a pinned hub
    dataset. None when it is."""
    if source.startswith("hf:"):
        return None
    path = Path(source)
    if path.is_absolute() or ".." in path.parts or path.parts[: len(SOURCE_DIR.parts)] != SOURCE_DIR.parts:
        return (f"fetch.source {source!r}: expected a file or folder under {SOURCE_DIR}/ (which dvc.yaml tracks, so a "
                "change to it reruns the pipeline) or hf:<dataset id>; copy the data there")
    return None


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
        raise MedtuneError(f"{path}:{e.lineno}: malformed JSON at column {e.colno} ({e.msg})") from None
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


def column_list(names: set) -> str:
    """A source's column names for an error message: a few, each short (a headerless file's "names" are data)."""
    shown = [str(n) if len(str(n)) <= 40 else str(n)[:37] + "..." for n in sorted(names, key=str)[:12]]
    return ", ".join(shown) + (f" and {len(names) - 12} more" if len(names) > 12 else "")


def to_records(rows: list[dict], s: Source, p: FetchParams, prefix: str) -> list[dict]:
    """Map source columns onto canonical fields; a column that no row has names the file and column."""
    names = set().union(*(r.keys() for r in rows))
    missing = [f"{field} <- {col!r}" for field, col in s.columns.items() if col not in names]
    missing += [f"option <- {c!r}" for c in p.option_columns if c not in names]
    if s.id_column and s.id_column not in names:
        missing.append(f"id <- {s.id_column!r}")
    if missing:
        raise MedtuneError(f"{s.source}: missing columns {', '.join(missing)} (has {column_list(names)}); set fetch.columns")
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


def collect(p: FetchParams, seed: int) -> tuple[list[dict], dict[str, int]]:
    """The canonical records of the main source and every `mix` source, the seeded `max_rows` subset of them,
    and the row count per source. Ids must be unique."""
    import numpy as np

    records, counts = [], {}
    for s in [p, *p.mix]:
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
        keep = np.random.default_rng(seed).choice(len(records), size=p.max_rows, replace=False)
        records = [records[i] for i in sorted(keep)]
    dups = [i for i, n in Counter(r["id"] for r in records).items() if n > 1]
    if dups:
        raise MedtuneError(f"{p.source}: id {dups[0]!r} occurs more than once; set fetch.id_column to a unique column or null")
    return records, counts

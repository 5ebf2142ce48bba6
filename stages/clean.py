"""Normalise text (Unicode, HTML, whitespace), drop unusable records and exact duplicates, counting every drop.

DVC stage `clean`.  Run by hand:  python -m stages.clean --in data/raw --out data/clean --metrics metrics/clean.json
Reads params `clean`. Writes data/clean/records.jsonl and the drop counts to the metrics file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import logging
import re
import unicodedata
from collections import Counter
from pathlib import Path

import click

from stages.common import (
    MedtuneError,
    atomic_dir,
    cli_errors,
    jsonl_text,
    load_params,
    log_params,
    read_jsonl,
    setup_logging,
    write_json,
    write_text_atomic,
)

log = logging.getLogger("medtune.clean")
TAG = re.compile(r"<[^>]{1,200}>")
SPACES = re.compile(r"[ \t\u00a0]+")
BLANK_LINES = re.compile(r"\n\s*\n+")


@dataclasses.dataclass(frozen=True)
class CleanParams:
    min_question_chars: int  # shorter questions are dropped
    min_answer_chars: int  # MedQuAD has page headings ("Topics") as answers; too short to teach anything
    max_answer_chars: int  # the long tail costs training time and is truncated by format anyway
    dedupe: bool  # drop exact duplicate (question, answer) pairs after normalisation
    max_drop_frac: float  # fail if more than this fraction of rows is dropped: the input is probably wrong

    def problems(self) -> list[str]:
        out = []
        if self.min_answer_chars >= self.max_answer_chars:
            out.append("min_answer_chars: must be below max_answer_chars")
        if not 0 <= self.max_drop_frac <= 1:
            out.append("max_drop_frac: must be between 0 and 1")
        return out


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", html.unescape(text))
    text = TAG.sub(" ", text)
    lines = [SPACES.sub(" ", line).strip() for line in text.replace("\r\n", "\n").split("\n")]
    return BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def fingerprint(question: str, answer: str) -> str:
    key = " ".join(question.lower().split()) + "\x00" + " ".join(answer.lower().split())
    return hashlib.sha256(key.encode()).hexdigest()


def run(p: CleanParams, in_dir: Path, out_dir: Path) -> dict:
    rows = read_jsonl(in_dir / "records.jsonl")
    if not rows:
        raise MedtuneError(f"{in_dir / 'records.jsonl'}: no records to clean")
    dropped: Counter[str] = Counter()
    seen: set[str] = set()
    kept = []
    for row in rows:
        q, a = row.get("question"), row.get("answer")
        if not isinstance(q, str) or not isinstance(a, str):
            dropped["not_text"] += 1
            continue
        q, a = normalise(q), normalise(a)
        if len(q) < p.min_question_chars:
            dropped["short_question"] += 1
        elif len(a) < p.min_answer_chars:
            dropped["short_answer"] += 1
        elif len(a) > p.max_answer_chars:
            dropped["long_answer"] += 1
        elif p.dedupe and (fp := fingerprint(q, a)) in seen:
            dropped["duplicate"] += 1
        else:
            if p.dedupe:
                seen.add(fp)
            kept.append({**row, "question": q, "answer": a})
    n_drop = sum(dropped.values())
    if not kept:
        raise MedtuneError(f"{in_dir / 'records.jsonl'}: every row was dropped by cleaning ({dict(dropped)})")
    if n_drop / len(rows) > p.max_drop_frac:
        raise MedtuneError(
            f"{in_dir / 'records.jsonl'}: cleaning dropped {n_drop} of {len(rows)} rows "
            f"(> clean.max_drop_frac={p.max_drop_frac}): {dict(dropped)}"
        )
    with atomic_dir(out_dir) as tmp:
        write_text_atomic(tmp / "records.jsonl", jsonl_text(kept))
    return {"rows_in": len(rows), "rows_out": len(kept), "dropped": dict(sorted(dropped.items()))}


@click.command()
@click.option("--in", "in_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--metrics", "metrics_file", required=True, type=click.Path(dir_okay=False, path_type=Path))
def main(in_dir: Path, out_dir: Path, metrics_file: Path) -> None:
    setup_logging()
    with cli_errors():
        (p,) = load_params(("clean", CleanParams))
        log_params("clean", p)
        summary = run(p, in_dir, out_dir)
        write_json(metrics_file, summary)
    log.info("kept %s of %s rows; dropped %s", f"{summary['rows_out']:,}", f"{summary['rows_in']:,}", summary["dropped"])


if __name__ == "__main__":
    main()

"""Normalise text (Unicode, HTML, whitespace), drop unusable, too short/long, duplicate and near-duplicate
records, flag (and optionally mask or drop) likely personal health information, counting every drop by reason.

Works on every canonical record shape from `fetch`: question/answer (+ instruction, context), multiple
choice (options, correct, explanation; an explanation that only repeats the choice is removed) and
dialogue (`messages`; question/answer become its last user and assistant turns).

DVC stage `clean`.  Run by hand:  python -m medtune.stages.clean --in data/raw --out data/clean --metrics metrics/clean.json
Reads params `clean`. Writes data/clean/records.jsonl and the counts to the metrics file.
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
from typing import Literal

import click

from medtune.common import (
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
INVISIBLE = re.compile(r"[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f\u200b-\u200d\u2060\ufeff]")
SPACES = re.compile(r"[ \t\u00a0]+")
BLANK_LINES = re.compile(r"\n\s*\n+")
DOUBLED_QMARK = re.compile(r"\?(?: ?\?)+")  # MedQuAD template artefact: "Who is at risk for X? ?"
TEXT_FIELDS = ("question", "answer", "instruction", "context", "explanation")
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}  # + ShareGPT
MONTH = r"(?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.?"
DATE = rf"(?:\d{{1,2}}[/.-]\d{{1,2}}[/.-]\d{{2,4}}|\d{{4}}-\d{{2}}-\d{{2}}|{MONTH} \d{{1,2}},? \d{{4}}|\d{{1,2}} {MONTH},? \d{{4}})"
# Regexes, not an NER model: these four identifier kinds have fixed shapes, and a model (presidio + spaCy)
# would add a large download for no gain on them. Dates count only next to a birth keyword.
PHI = {
    "email": re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b"),
    "phone": re.compile(r"(?<![\w-])(?:\+?1[ .-]?)?(?:\(\d{3}\) ?|\d{3}[ .-])\d{3}[ .-]\d{4}(?![\w-])"),
    "date_of_birth": re.compile(rf"(?i)\b(?:d\.?o\.?b\.?|date of birth|birth ?date|born(?: on)?)\s*[:\-]?\s*{DATE}"),
    "record_number": re.compile(r"(?i)\b(?:mrn|medical record(?: number| no\.?)?|record (?:number|no\.?)|patient id)"
                                r"\s*[:#]?\s*(?=[a-z0-9-]*\d)[a-z0-9-]{4,}\b"),
}
NUM_PERM = 128  # MinHash permutations: Jaccard estimates within about +-0.09 (1/sqrt(128))


@dataclasses.dataclass(frozen=True)
class CleanParams:
    min_question_chars: int  # shorter questions are dropped
    max_question_chars: int  # longer questions are dropped (pasted documents, not questions)
    min_answer_chars: int  # MedQuAD has page headings ("Topics") as answers; too short to teach anything
    max_answer_chars: int  # the long tail costs training time and is truncated by format anyway
    dedupe: bool  # drop exact duplicates: same normalised question, answer (and turns, options)
    near_dup_threshold: float | None  # drop a row whose MinHash Jaccard with a kept row is at least this; None: off
    strip_boilerplate: list[str]  # regexes removed from answers (e.g. "^Key Points\\s*"); []: none
    explanation_repeat_regex: str  # MCQ: an explanation that is only this, once the option text is removed, is dropped
    select_longest: int | None  # keep only the N rows with the longest `select_field` text; None keeps all
    select_field: str  # the field `select_longest` ranks by (e.g. explanation, answer)
    phi: Literal["keep", "mask", "drop"]  # likely personal health information: count only, mask it, or drop the row
    max_drop_frac: float  # fail if more than this fraction of rows is dropped: the input is probably wrong

    def problems(self) -> list[str]:
        out = []
        if self.min_answer_chars >= self.max_answer_chars:
            out.append("min_answer_chars: must be below max_answer_chars")
        if self.min_question_chars >= self.max_question_chars:
            out.append("min_question_chars: must be below max_question_chars")
        if self.near_dup_threshold is not None and not 0 < self.near_dup_threshold <= 1:
            out.append("near_dup_threshold: must be in (0, 1] or null")
        for name, pattern in [("explanation_repeat_regex", self.explanation_repeat_regex)] + [
                (f"strip_boilerplate[{i}]", x) for i, x in enumerate(self.strip_boilerplate)]:
            try:
                re.compile(pattern)
            except re.error as e:
                out.append(f"{name}: not a valid regex ({e})")
        if self.select_longest is not None and self.select_longest < 1:
            out.append("select_longest: must be >= 1 or null")
        if not 0 <= self.max_drop_frac <= 1:
            out.append("max_drop_frac: must be between 0 and 1")
        return out


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", html.unescape(text))
    text = INVISIBLE.sub("", TAG.sub(" ", text))
    lines = [SPACES.sub(" ", line).strip() for line in text.replace("\r\n", "\n").split("\n")]
    return DOUBLED_QMARK.sub("?", BLANK_LINES.sub("\n\n", "\n".join(lines)).strip())


def find_phi(text: str) -> set[str]:
    return {kind for kind, rx in PHI.items() if rx.search(text)}


def mask_phi(text: str) -> str:
    for kind, rx in PHI.items():
        text = rx.sub(f"[{kind.upper()}]", text)
    return text


def record_text(row: dict) -> str:
    """All of a record's text, for duplicate keys, near-duplicate shingles and PHI scans."""
    parts = [row.get(f) or "" for f in TEXT_FIELDS] + list((row.get("options") or {}).values())
    parts += [m["content"] for m in row.get("messages") or []]
    return "\n".join(parts)


def minhash(text: str):
    """MinHash of the text's word 3-grams (datasketch), for near-duplicate search."""
    from datasketch import MinHash

    words = text.lower().split() or [""]
    m = MinHash(num_perm=NUM_PERM, seed=1)
    m.update_batch([" ".join(words[i:i + 3]).encode() for i in range(max(1, len(words) - 2))])
    return m


def fingerprint(row: dict) -> str:
    return hashlib.sha256(" ".join(record_text(row).lower().split()).encode()).hexdigest()


def turn(m) -> dict | None:
    """One dialogue turn as {role, content}; ShareGPT's {from: human/gpt, value} is read too. None if malformed."""
    if not isinstance(m, dict):
        return None
    role, content = m.get("role", m.get("from")), m.get("content", m.get("value"))
    role = ROLES.get(role) if isinstance(role, str) else None
    return {"role": role, "content": normalise(content)} if role and isinstance(content, str) else None


def check_row(row: dict, p: CleanParams) -> tuple[dict | None, str]:
    """(normalised row, "") or (None, drop reason). Text fields may be absent, never of another type."""
    row = dict(row)
    if "messages" in row:
        msgs = [turn(m) for m in row["messages"]] if isinstance(row["messages"], list) else []
        if not msgs or None in msgs:
            return None, "bad_messages"
        users = [m["content"] for m in msgs if m["role"] == "user"]
        if msgs[-1]["role"] != "assistant" or not users or not all(m["content"] for m in msgs):
            return None, "bad_messages"
        row |= {"messages": msgs, "question": users[-1], "answer": msgs[-1]["content"]}
    if "correct" in row:
        opts = row.get("options")
        if not isinstance(opts, dict) or len(opts) < 2 or not all(isinstance(v, str) and normalise(v) for v in opts.values()):
            return None, "bad_options"
        row["options"] = {k: normalise(v) for k, v in opts.items()}
        if not isinstance(row["correct"], str) or row["correct"] not in row["options"]:
            return None, "bad_correct_option"
        row["answer"] = row["options"][row["correct"]]
    for field in TEXT_FIELDS:
        if row.get(field) is None and field in ("question", "answer"):
            return None, f"missing_{field}"
        if field in row and row[field] is not None and not isinstance(row[field], str):
            return None, "not_text"
        if isinstance(row.get(field), str):
            row[field] = normalise(row[field])
    for rx in p.strip_boilerplate:
        row["answer"] = re.sub(rx, "", row["answer"]).strip()
    if len(row["question"]) < p.min_question_chars:
        return None, "short_question"
    if len(row["question"]) > p.max_question_chars:
        return None, "long_question"
    if len(row["answer"]) < p.min_answer_chars:
        return None, "short_answer"
    if len(row["answer"]) > p.max_answer_chars:
        return None, "long_answer"
    return row, ""


def explanation_repeats_choice(row: dict, p: CleanParams) -> bool:
    rest = row["explanation"].lower().replace(row["answer"].lower(), " ")
    return re.fullmatch(p.explanation_repeat_regex, rest, flags=re.IGNORECASE | re.DOTALL) is not None


def run(p: CleanParams, in_dir: Path, out_dir: Path) -> dict:
    from datasketch import MinHashLSH

    src = in_dir / "records.jsonl"
    rows = read_jsonl(src)
    if not rows:
        raise MedtuneError(f"{src}: no records to clean")
    dropped: Counter[str] = Counter()
    changed: Counter[str] = Counter()
    phi_found: Counter[str] = Counter()
    seen: set[str] = set()
    phi_rows = 0
    lsh = MinHashLSH(threshold=p.near_dup_threshold, num_perm=NUM_PERM) if p.near_dup_threshold else None
    sigs: dict[str, object] = {}
    kept = []
    for row in rows:
        row, reason = check_row(row, p)
        if row is None:
            dropped[reason] += 1
            continue
        kinds = find_phi(record_text(row))
        phi_found.update(kinds)
        phi_rows += bool(kinds)
        if kinds and p.phi == "drop":
            dropped["phi"] += 1
            continue
        if kinds and p.phi == "mask":
            row = {k: mask_phi(v) if k in TEXT_FIELDS and isinstance(v, str) else v for k, v in row.items()}
            if "messages" in row:
                row["messages"] = [m | {"content": mask_phi(m["content"])} for m in row["messages"]]
            if "options" in row:
                row["options"] = {k: mask_phi(v) for k, v in row["options"].items()}
            changed["phi_masked"] += 1
        if row.get("explanation") and "correct" in row and explanation_repeats_choice(row, p):
            row["explanation"] = ""
            changed["explanation_removed"] += 1
        if p.dedupe:
            if (fp := fingerprint(row)) in seen:
                dropped["duplicate"] += 1
                continue
            seen.add(fp)
        if lsh is not None:
            sig = minhash(record_text(row))
            if any(sig.jaccard(sigs[k]) >= p.near_dup_threshold for k in lsh.query(sig)):
                dropped["near_duplicate"] += 1
                continue
            key = str(len(kept))
            lsh.insert(key, sig)
            sigs[key] = sig
        kept.append(row)
    n_drop = sum(dropped.values())
    if not kept:
        raise MedtuneError(f"{src}: every row was dropped by cleaning ({dict(dropped)})")
    if n_drop / len(rows) > p.max_drop_frac:
        raise MedtuneError(f"{src}: cleaning dropped {n_drop} of {len(rows)} rows "
                           f"(> clean.max_drop_frac={p.max_drop_frac}): {dict(dropped)}")
    not_selected = 0
    if p.select_longest is not None and p.select_longest < len(kept):
        ranked = sorted(range(len(kept)), key=lambda i: (-len(kept[i].get(p.select_field) or ""), str(kept[i]["id"])))
        keep = set(ranked[: p.select_longest])
        not_selected = len(kept) - len(keep)
        kept = [r for i, r in enumerate(kept) if i in keep]
    with atomic_dir(out_dir) as tmp:
        write_text_atomic(tmp / "records.jsonl", jsonl_text(kept))
    return {"rows_in": len(rows), "rows_out": len(kept), "dropped": dict(sorted(dropped.items())),
            "changed": dict(sorted(changed.items())), "not_selected": not_selected,
            "duplicates": dropped["duplicate"] + dropped["near_duplicate"],
            "phi_rows": phi_rows, "phi": dict(sorted(phi_found.items())), "phi_action": p.phi}


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
    log.info("kept %s of %s rows; dropped %s; likely PHI %s (%s)", f"{summary['rows_out']:,}", f"{summary['rows_in']:,}",
             summary["dropped"], summary["phi"], p.phi)


if __name__ == "__main__":
    main()

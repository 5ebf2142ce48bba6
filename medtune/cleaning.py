"""Cleaning records: normalise text (Unicode, HTML, whitespace), drop unusable, too short or long, duplicate and
near-duplicate records, flag (and optionally mask or drop) likely personal health information, and count every
drop by its reason.

Works on every canonical record shape from fetch: question/answer (+ instruction, context), multiple choice
(options, correct, explanation; an explanation that only repeats the choice is removed) and dialogue
(`messages`; question/answer become its last user and assistant turns).
"""

from __future__ import annotations

import hashlib
import html
import re
import unicodedata
from collections import Counter

from medtune.console import MedtuneError
from medtune.dedup import NearDups, minhashes
from medtune.params import CleanParams

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


def clean_rows(p: CleanParams, rows: list[dict], source) -> tuple[list[dict], dict]:
    """The kept rows, in input order, and the counts: rows in/out, drops and changes by reason, likely PHI."""
    if not rows:
        raise MedtuneError(f"{source}: no records to clean")
    dropped: Counter[str] = Counter()
    changed: Counter[str] = Counter()
    phi_found: Counter[str] = Counter()
    seen: set[str] = set()
    phi_rows = 0
    candidates = []  # pass 1: each row checked and normalised, its PHI counted (masked or dropped)
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
        candidates.append(row)
    # pass 2: duplicates, in input order (the first of a pair is kept); the signatures in one bulk call
    near = NearDups(p.near_dup_threshold) if p.near_dup_threshold else None
    sigs = minhashes([record_text(r) for r in candidates]) if near is not None else [None] * len(candidates)
    kept = []
    for row, sig in zip(candidates, sigs):
        if p.dedupe:
            if (fp := fingerprint(row)) in seen:
                dropped["duplicate"] += 1
                continue
            seen.add(fp)
        if near is not None:
            if near.matches(sig):
                dropped["near_duplicate"] += 1
                continue
            near.add(str(len(kept)), sig)
        kept.append(row)
    n_drop = sum(dropped.values())
    if not kept:
        raise MedtuneError(f"{source}: every row was dropped by cleaning ({dict(dropped)})")
    if n_drop / len(rows) > p.max_drop_frac:
        raise MedtuneError(f"{source}: cleaning dropped {n_drop} of {len(rows)} rows "
                           f"(> clean.max_drop_frac={p.max_drop_frac}): {dict(dropped)}")
    not_selected = 0
    if p.select_longest is not None and p.select_longest < len(kept):
        ranked = sorted(range(len(kept)), key=lambda i: (-len(kept[i].get(p.select_field) or ""), str(kept[i]["id"])))
        keep = set(ranked[: p.select_longest])
        not_selected = len(kept) - len(keep)
        kept = [r for i, r in enumerate(kept) if i in keep]
    return kept, {"rows_in": len(rows), "rows_out": len(kept), "dropped": dict(sorted(dropped.items())),
                  "changed": dict(sorted(changed.items())), "not_selected": not_selected,
                  "duplicates": dropped["duplicate"] + dropped["near_duplicate"],
                  "phi_rows": phi_rows, "phi": dict(sorted(phi_found.items())), "phi_action": p.phi}

"""Splitting records into train/val/test by group, so that no topic, document, repeated question or
near-duplicate answer straddles train and test; and the check that proves it.

Rows are joined into groups (transitively) when they share a `split.group_by` value (MedQuAD's focus and
url: its templated questions repeat per topic, so a random split leaks), a normalised question, or a
near-duplicate answer (MinHash). Each group goes to a split by a stable hash of (seed, group key), so
adding data does not reshuffle the rows already there. With `split.test_sources`, test is exactly those
sources instead, and train/val rows that repeat a test question or answer are dropped and counted.
"""

from __future__ import annotations

import re
from collections import Counter

from medtune.console import MedtuneError
from medtune.dedup import NearDups, minhashes
from medtune.hashing import unit_hash
from medtune.params import SplitParams

SPLITS = ("train", "val", "test")
PUNCT = re.compile(r"[^\w\s]")
MIN_WORDS = 8  # answers shorter than this are not near-duplicate candidates ("yes", "Autosomal recessive")


def norm_question(q: str) -> str:
    """Case, spacing and punctuation folded: "Who is at risk for X? ?" == "who is at risk for x"."""
    return " ".join(PUNCT.sub(" ", q.lower()).split())


def answer_text(row: dict) -> str:
    return f"{row.get('answer') or ''}\n{row.get('explanation') or ''}".strip()


def answer_sigs(rows: list[dict]) -> dict[str, object]:
    """Row id -> the MinHash of its answer, for answers long enough to compare (short ones are left out)."""
    long = [r for r in rows if len(answer_text(r).split()) >= MIN_WORDS]
    return dict(zip((str(r["id"]) for r in long), minhashes([answer_text(r) for r in long])))


def answer_sig(row: dict):
    """The MinHash of one answer long enough to compare (None for short ones)."""
    return answer_sigs([row]).get(str(row["id"]))


def group_rows(rows: list[dict], group_by: list[str], threshold: float | None = None, sigs: dict | None = None) -> list[int]:
    """Union-find: rows sharing a group value, a normalised question or a near-duplicate answer get one root.
    `sigs`: answer_sigs of the rows, when the caller has them already."""
    parent = list(range(len(rows)))
    if threshold and sigs is None:
        sigs = answer_sigs(rows)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple[str, str], int] = {}
    near = NearDups(threshold) if threshold else None
    for i, row in enumerate(rows):
        keys = [("q", norm_question(row["question"]))]
        keys += [(g, str(row[g]).lower()) for g in group_by if row.get(g) not in (None, "")]
        for key in keys:
            if key in first:
                parent[find(i)] = find(first[key])
            else:
                first[key] = i
        if near is not None:
            sig = sigs.get(str(row["id"]))
            for j in near.matches(sig):
                parent[find(i)] = find(int(j))
            near.add(str(i), sig)
    return [find(i) for i in range(len(rows))]


def bucket(seed: int, key: str, val_frac: float, test_frac: float) -> str:
    h = unit_hash(str(seed), key)
    return "test" if h < test_frac else "val" if h < test_frac + val_frac else "train"


def leaks(rows: list[dict], test: list[dict], threshold: float | None, sigs: dict | None = None) -> list[tuple[str, str]]:
    """(row id, test id) for each row whose normalised question or near-duplicate answer is in `test`.
    `sigs`: answer_sigs of the rows and the test rows, when the caller has them already."""
    questions = {norm_question(t["question"]): t["id"] for t in test}
    near = NearDups(threshold) if threshold else None
    if near is not None and sigs is None:
        sigs = answer_sigs(rows + test)
    for t in test if near else []:
        near.add(str(t["id"]), sigs.get(str(t["id"])))
    out = []
    for r in rows:
        hit = questions.get(norm_question(r["question"]))
        if hit is None and near is not None and (m := near.matches(sigs.get(str(r["id"])))):
            hit = m[0]
        if hit is not None:
            out.append((str(r["id"]), str(hit)))
    return out




def split_rows(p: SplitParams, seed: int, rows: list[dict], source) -> tuple[dict[str, list[dict]], dict]:
    """{train, val, test: rows sorted by id} and the counts; fails if a test question or near-duplicate answer is
    also in train."""
    parts: dict[str, list[dict]] = {s: [] for s in SPLITS}
    if p.test_sources:
        found = Counter(str(r.get("source")) for r in rows)
        if missing := [s for s in p.test_sources if s not in found]:
            raise MedtuneError(f"split.test_sources: no rows with source {', '.join(map(repr, missing))} "
                               f"in {source} (has {', '.join(sorted(found))})")
        parts["test"] = [r for r in rows if str(r.get("source")) in p.test_sources]
        rows = [r for r in rows if str(r.get("source")) not in p.test_sources]
    sigs = answer_sigs(rows + parts["test"]) if p.near_dup_threshold else None  # once: grouping and both leak checks
    roots = group_rows(rows, p.group_by, p.near_dup_threshold, sigs)
    # a group's key is its smallest row id, so the assignment does not depend on row order
    group_key: dict[int, str] = {}
    for row, root in zip(rows, roots):
        group_key[root] = min(group_key.get(root, str(row["id"])), str(row["id"]))
    test_frac = 0.0 if p.test_sources else p.test_frac
    for row, root in zip(rows, roots):
        parts[bucket(seed, group_key[root], p.val_frac, test_frac)].append(row)
    dropped = {}
    if p.test_sources:  # held-out sources share templates and pages with the rest: drop the repeats
        for s in ("train", "val"):
            bad = {r for r, _ in leaks(parts[s], parts["test"], p.near_dup_threshold, sigs)}
            dropped[s] = len(bad)
            parts[s] = [r for r in parts[s] if str(r["id"]) not in bad]
    for s in SPLITS:
        parts[s].sort(key=lambda r: str(r["id"]))
        if not parts[s]:
            raise MedtuneError(f"split: the {s} split is empty ({len(rows)} rows in {len(group_key)} groups); "
                               "use more data or larger split fractions")
    if found := leaks(parts["train"], parts["test"], p.near_dup_threshold, sigs):
        raise MedtuneError(f"split: {len(found)} train rows repeat a test question or near-duplicate answer, "
                           f"e.g. train {found[0][0]!r} ~ test {found[0][1]!r}")
    return parts, {s: len(parts[s]) for s in SPLITS} | {"groups": len(group_key), "dropped_leaks": dropped, "leakage_ok": True}

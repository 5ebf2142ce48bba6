"""Split cleaned records into train/val/test by group, so that no topic, document, repeated question or
near-duplicate answer straddles train and test; then prove it.

DVC stage `split`.  Run by hand:  python -m medtune.stages.split --in data/clean --out data/split --metrics metrics/split.json
Reads params `base`, `split`. Writes data/split/{train,val,test}.jsonl and the counts + leakage check to metrics.

Rows are joined into groups (transitively) when they share a `split.group_by` value (MedQuAD's focus and
url: its templated questions repeat per topic, so a random split leaks), a normalised question, or a
near-duplicate answer (MinHash). Each group goes to a split by a stable hash of (seed, group key), so
adding data does not reshuffle the rows already there. With `split.test_sources`, test is exactly those
sources instead, and train/val rows that repeat a test question or answer are dropped and counted.
Either way the stage fails if a test question or near-duplicate answer is also in train.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
from collections import Counter
from pathlib import Path

import click

from medtune.stages.clean import NUM_PERM, minhash
from medtune.common import (
    BaseParams,
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

log = logging.getLogger("medtune.split")
SPLITS = ("train", "val", "test")
PUNCT = re.compile(r"[^\w\s]")
MIN_WORDS = 8  # answers shorter than this are not near-duplicate candidates ("yes", "Autosomal recessive")


@dataclasses.dataclass(frozen=True)
class SplitParams:
    val_frac: float  # share of rows (of the non-test rows when test_sources is set) that go to val
    test_frac: float  # share of rows that go to test (ignored when test_sources is set)
    group_by: list[str]  # metadata fields whose rows must stay together (e.g. focus, url); []: question only
    near_dup_threshold: float | None  # answers at least this similar (MinHash Jaccard) stay together; None: off
    test_sources: list[str]  # hold out whole `source` values as the test split; []: off

    def problems(self) -> list[str]:
        out = []
        if not (0 < self.val_frac < 1 and 0 < self.test_frac < 1 and self.val_frac + self.test_frac < 1):
            out.append("val_frac/test_frac: each must be in (0, 1) and together below 1 (train gets the rest)")
        if self.near_dup_threshold is not None and not 0 < self.near_dup_threshold <= 1:
            out.append("near_dup_threshold: must be in (0, 1] or null")
        return out


def norm_question(q: str) -> str:
    """Case, spacing and punctuation folded: "Who is at risk for X? ?" == "who is at risk for x"."""
    return " ".join(PUNCT.sub(" ", q.lower()).split())


def answer_text(row: dict) -> str:
    return f"{row.get('answer') or ''}\n{row.get('explanation') or ''}".strip()


class NearDups:
    """MinHash LSH over answers (datasketch), verified by the estimated Jaccard."""

    def __init__(self, threshold: float):
        from datasketch import MinHashLSH

        self.t, self.lsh, self.sigs = threshold, MinHashLSH(threshold=threshold, num_perm=NUM_PERM), {}

    def sig(self, row: dict):
        text = answer_text(row)
        return minhash(text) if len(text.split()) >= MIN_WORDS else None

    def add(self, key: str, sig) -> None:
        if sig is not None:
            self.lsh.insert(key, sig)
            self.sigs[key] = sig

    def matches(self, sig) -> list[str]:
        return [] if sig is None else sorted(k for k in self.lsh.query(sig) if sig.jaccard(self.sigs[k]) >= self.t)


def group_rows(rows: list[dict], group_by: list[str], threshold: float | None = None) -> list[int]:
    """Union-find: rows sharing a group value, a normalised question or a near-duplicate answer get one root."""
    parent = list(range(len(rows)))

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
            sig = near.sig(row)
            for j in near.matches(sig):
                parent[find(i)] = find(int(j))
            near.add(str(i), sig)
    return [find(i) for i in range(len(rows))]


def bucket(seed: int, key: str, val_frac: float, test_frac: float) -> str:
    h = int.from_bytes(hashlib.sha256(f"{seed}\x00{key}".encode()).digest()[:8], "big") / 2**64
    return "test" if h < test_frac else "val" if h < test_frac + val_frac else "train"


def leaks(rows: list[dict], test: list[dict], threshold: float | None) -> list[tuple[str, str]]:
    """(row id, test id) for each row whose normalised question or near-duplicate answer is in `test`."""
    questions = {norm_question(t["question"]): t["id"] for t in test}
    near = NearDups(threshold) if threshold else None
    for t in test if near else []:
        near.add(str(t["id"]), near.sig(t))
    out = []
    for r in rows:
        hit = questions.get(norm_question(r["question"]))
        if hit is None and near is not None and (m := near.matches(near.sig(r))):
            hit = m[0]
        if hit is not None:
            out.append((str(r["id"]), str(hit)))
    return out


def run(p: SplitParams, base: BaseParams, in_dir: Path, out_dir: Path) -> dict:
    rows = read_jsonl(in_dir / "records.jsonl")
    parts: dict[str, list[dict]] = {s: [] for s in SPLITS}
    if p.test_sources:
        found = Counter(str(r.get("source")) for r in rows)
        if missing := [s for s in p.test_sources if s not in found]:
            raise MedtuneError(f"split.test_sources: no rows with source {', '.join(map(repr, missing))} "
                               f"in {in_dir / 'records.jsonl'} (has {', '.join(sorted(found))})")
        parts["test"] = [r for r in rows if str(r.get("source")) in p.test_sources]
        rows = [r for r in rows if str(r.get("source")) not in p.test_sources]
    roots = group_rows(rows, p.group_by, p.near_dup_threshold)
    # a group's key is its smallest row id, so the assignment does not depend on row order
    group_key: dict[int, str] = {}
    for row, root in zip(rows, roots):
        group_key[root] = min(group_key.get(root, str(row["id"])), str(row["id"]))
    test_frac = 0.0 if p.test_sources else p.test_frac
    for row, root in zip(rows, roots):
        parts[bucket(base.seed, group_key[root], p.val_frac, test_frac)].append(row)
    dropped = {}
    if p.test_sources:  # held-out sources share templates and pages with the rest: drop the repeats
        for s in ("train", "val"):
            bad = {r for r, _ in leaks(parts[s], parts["test"], p.near_dup_threshold)}
            dropped[s] = len(bad)
            parts[s] = [r for r in parts[s] if str(r["id"]) not in bad]
    for s in SPLITS:
        parts[s].sort(key=lambda r: str(r["id"]))
        if not parts[s]:
            raise MedtuneError(f"split: the {s} split is empty ({len(rows)} rows in {len(group_key)} groups); "
                               "use more data or larger split fractions")
    if found := leaks(parts["train"], parts["test"], p.near_dup_threshold):
        raise MedtuneError(f"split: {len(found)} train rows repeat a test question or near-duplicate answer, "
                           f"e.g. train {found[0][0]!r} ~ test {found[0][1]!r}")
    with atomic_dir(out_dir) as tmp:
        for s in SPLITS:
            write_text_atomic(tmp / f"{s}.jsonl", jsonl_text(parts[s]))
    return {s: len(parts[s]) for s in SPLITS} | {"groups": len(group_key), "dropped_leaks": dropped, "leakage_ok": True}


@click.command()
@click.option("--in", "in_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--metrics", "metrics_file", required=True, type=click.Path(dir_okay=False, path_type=Path))
def main(in_dir: Path, out_dir: Path, metrics_file: Path) -> None:
    setup_logging()
    with cli_errors():
        base, p = load_params(("base", BaseParams), ("split", SplitParams))
        log_params("split", p)
        summary = run(p, base, in_dir, out_dir)
        write_json(metrics_file, summary)
    log.info("split sizes: %s", summary)


if __name__ == "__main__":
    main()

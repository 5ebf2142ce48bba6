"""Split cleaned records into train/val/test by group, so one topic never straddles train and test.

DVC stage `split`.  Run by hand:  python -m stages.split --in data/clean --out data/split
Reads params `base`, `split`. Writes data/split/{train,val,test}.jsonl.

Rows are grouped by `split.group_by` (MedQuAD's `focus`: its templated questions repeat per topic, so a
random split leaks) and by normalised question text, joined transitively. Each group goes to a split by a
stable hash of (seed, group key), so adding data does not reshuffle the rows already there.
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
    read_jsonl,
    setup_logging,
    write_text_atomic,
)

log = logging.getLogger("medtune.split")
SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class SplitParams:
    val_frac: float
    test_frac: float
    group_by: str | None  # a metadata field whose rows must stay together (e.g. focus); None: question only

    def problems(self) -> list[str]:
        out = []
        if not (0 < self.val_frac < 1 and 0 < self.test_frac < 1 and self.val_frac + self.test_frac < 1):
            out.append("val_frac/test_frac: each must be in (0, 1) and together below 1 (train gets the rest)")
        return out


def norm_question(q: str) -> str:
    return " ".join(q.lower().replace(" ?", "?").split())


def group_rows(rows: list[dict], group_by: str | None) -> list[int]:
    """Union-find: rows sharing a group value or a normalised question get the same root index."""
    parent = list(range(len(rows)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple[str, str], int] = {}
    for i, row in enumerate(rows):
        keys = [("q", norm_question(row["question"]))]
        if group_by and row.get(group_by) not in (None, ""):
            keys.append(("g", str(row[group_by]).lower()))
        for key in keys:
            if key in first:
                parent[find(i)] = find(first[key])
            else:
                first[key] = i
    return [find(i) for i in range(len(rows))]


def bucket(seed: int, key: str, p: SplitParams) -> str:
    h = int.from_bytes(hashlib.sha256(f"{seed}\x00{key}".encode()).digest()[:8], "big") / 2**64
    return "test" if h < p.test_frac else "val" if h < p.test_frac + p.val_frac else "train"


def run(p: SplitParams, base: BaseParams, in_dir: Path, out_dir: Path) -> dict:
    rows = read_jsonl(in_dir / "records.jsonl")
    roots = group_rows(rows, p.group_by)
    # a group's key is its smallest row id, so the assignment does not depend on row order
    group_key: dict[int, str] = {}
    for row, root in zip(rows, roots):
        group_key[root] = min(group_key.get(root, row["id"]), str(row["id"]))
    parts: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for row, root in zip(rows, roots):
        parts[bucket(base.seed, group_key[root], p)].append(row)
    for s in SPLITS:
        parts[s].sort(key=lambda r: str(r["id"]))
        if not parts[s]:
            raise MedtuneError(f"split: the {s} split is empty ({len(rows)} rows in {len(group_key)} groups); "
                               "use more data or larger split fractions")
    leaked = {norm_question(r["question"]) for r in parts["train"]} & {norm_question(r["question"]) for r in parts["test"]}
    if leaked:  # cannot happen with the grouping above; kept as the stage's guarantee
        raise MedtuneError(f"split: {len(leaked)} test questions also in train, e.g. {sorted(leaked)[0]!r}")
    with atomic_dir(out_dir) as tmp:
        for s in SPLITS:
            write_text_atomic(tmp / f"{s}.jsonl", jsonl_text(parts[s]))
    return {s: len(parts[s]) for s in SPLITS} | {"groups": len(group_key)}


@click.command()
@click.option("--in", "in_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
def main(in_dir: Path, out_dir: Path) -> None:
    setup_logging()
    with cli_errors():
        base, p = load_params(("base", BaseParams), ("split", SplitParams))
        log_params("split", p)
        summary = run(p, base, in_dir, out_dir)
    log.info("split sizes: %s", summary)


if __name__ == "__main__":
    main()

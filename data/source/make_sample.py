"""Rebuild medquad_sample.jsonl, the bundled default data, from the MedQuAD JSON-lines pool.

Run as:  python data/source/make_sample.py ../shared/data/medquad/medquad.jsonl data/source/medquad_sample.jsonl
Keeps 400 pairs, seeded, with answers of 100-700 characters so the default CPU run stays within its
time budget (the full pool's median answer is 852 characters; see DATA_CARD.md).
"""
import json
import random
import sys

src, dst = sys.argv[1], sys.argv[2]
rows = [json.loads(line) for line in open(src, encoding="utf-8")]
rows = [r for r in rows if 100 <= len(r["answer"]) <= 700]
random.Random(0).shuffle(rows)
keep = sorted(rows[:400], key=lambda r: r["id"])
with open(dst, "w", encoding="utf-8") as f:
    for r in keep:
        f.write(json.dumps(r, ensure_ascii=False) + "\n")
print(f"{len(keep)} of {len(rows)} pairs -> {dst}")

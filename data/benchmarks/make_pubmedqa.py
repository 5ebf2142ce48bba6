"""Rebuild pubmedqa_test.jsonl, the evaluate stage's second test, from the PubMedQA expert-labelled set (PQA-L).

Run as:  python data/benchmarks/make_pubmedqa.py ../shared/data/pubmedqa/pubmedqa_pqal.jsonl
Keeps the 500 items of the official test split, in the general choice-test shape that
`python -m medtune.stages.evaluate --choice-test FILE` reads (one JSON object per line, sorted by id):
    {"id", "question", "context" (the abstract without its conclusion, one "LABEL: text" line per
     section, in order), "options": ["yes", "no", "maybe"], "answer": one of the options}
The conclusion (`long_answer`) is left out: it usually states the answer. See README.md here.
"""
import json
import sys
from collections import Counter
from pathlib import Path

OPTIONS = ["yes", "no", "maybe"]

src = Path(sys.argv[1])
dst = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).parent / "pubmedqa_test.jsonl"
rows = [json.loads(line) for line in src.open(encoding="utf-8") if line.strip()]
items = []
for r in rows:
    if r["split"] != "test":
        continue
    assert r["final_decision"] in OPTIONS and len(r["contexts"]) == len(r["context_labels"]), r["id"]
    context = "\n".join(f"{label}: {text}" for label, text in zip(r["context_labels"], r["contexts"]))
    items.append({"id": r["id"], "question": r["question"], "context": context, "options": OPTIONS,
                  "answer": r["final_decision"]})
items.sort(key=lambda x: x["id"])
assert len({x["id"] for x in items}) == len(items) == 500, len(items)
with dst.open("w", encoding="utf-8") as f:
    for x in items:
        f.write(json.dumps(x, ensure_ascii=False) + "\n")
print(f"{len(items)} test items -> {dst}; answers: {dict(Counter(x['answer'] for x in items).most_common())}")

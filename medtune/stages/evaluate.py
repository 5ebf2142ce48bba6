"""Answer the test questions with the base model or base + adapter (batched greedy decoding) and score the
answers against the references: ROUGE-1/2/L F1 with bootstrap confidence intervals, token F1, answer
length, empty and runaway answers. For the tuned model, also the paired tuned - base delta.

With --choice-test FILE, a second test: multiple-choice items (data/benchmarks/pubmedqa_test.jsonl: PubMedQA
yes/no/maybe) scored by option log-likelihood with the same model and prompt layout (format.render), so a
tuned model can be checked for lost general reasoning: accuracy, its CI, the majority-label rate, how often
each option was chosen, and the paired tuned - base delta. Two scores per option: the raw one, log p(option |
prompt), and a calibrated one, that minus log p(option | a content-free prompt of the same layout: no
context, question "N/A"), i.e. contextual calibration (Zhao et al. 2021, "Calibrate Before Use", ICML; the
domain-conditional PMI of Holtzman et al. 2021, "Surface Form Competition"). The raw score mostly follows
the model's prior for the first word of an answer (on the H100, the base gemma-3-270m picked "yes" for
~all 500 items and every tuned adapter "no"); the calibrated one measures how far the item moves it.

DVC stages `evaluate_base` and `evaluate_tuned` (the base evaluation does not depend on the adapter, so it
stays cached across training sweeps). Run by hand:
    python -m medtune.stages.evaluate --data data/formatted --choice-test data/benchmarks/pubmedqa_test.jsonl \
        --out eval/base --metrics metrics/eval_base.json
    python -m medtune.stages.evaluate --data data/formatted --choice-test data/benchmarks/pubmedqa_test.jsonl \
        --adapter models/adapter --baseline eval/base/predictions.jsonl --out eval/tuned --metrics metrics/eval_tuned.json
Reads params `base`, `model`, `format`, `evaluate`.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import re
import string
import time
from collections import Counter
from pathlib import Path

import click
import numpy as np

from medtune.common import (
    BaseParams,
    MedtuneError,
    atomic_dir,
    cli_errors,
    jsonl_text,
    load_params,
    log_params,
    read_jsonl,
    set_seed,
    setup_logging,
    write_json,
    write_text_atomic,
)
from medtune.stages.format import FormatParams, render
from medtune.modeling import ModelParams, device, load_model, load_tokenizer, resolve_base, stop_token_ids

log = logging.getLogger("medtune.evaluate")
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


@dataclasses.dataclass(frozen=True)
class EvaluateParams:
    max_examples: int  # the first N test questions (sorted by id); 0: all of them
    max_new_tokens: int  # answers that reach it without an end-of-turn token count as runaway
    batch_size: int
    bootstrap_samples: int  # resamples for the confidence intervals
    confidence: float  # e.g. 0.95
    bertscore_model: str | None  # a local folder (or cached hub id) of a scorer model; null: BERTScore skipped
    choice_max_examples: int  # the first N items (sorted by id) of the --choice-test file; 0: all of them

    def problems(self) -> list[str]:
        out = []
        if self.max_examples < 0:
            out.append("max_examples: must be >= 0")
        if self.choice_max_examples < 0:
            out.append("choice_max_examples: must be >= 0")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            out.append("max_new_tokens/batch_size: must be >= 1")
        if self.bootstrap_samples < 100:
            out.append("bootstrap_samples: use at least 100")
        if not 0.5 <= self.confidence < 1:
            out.append("confidence: must be in [0.5, 1)")
        return out


def generate(model, tok, prompts: list[str], p: EvaluateParams) -> list[dict]:
    """Greedy answers in batches of similar length (left padding); returns text and whether it stopped."""
    import torch
    from tqdm import tqdm

    stops = stop_token_ids(tok, model)
    if model.device.type == "cuda":
        # cuDNN's attention builds a plan for every new key length, i.e. at every decoding step: 2.3x slower on an
        # H100 (benchmarks/results/h100); the other fused SDPA kernels give the same answers
        torch.backends.cuda.enable_cudnn_sdp(False)
    tok.padding_side = "left"
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[dict] = [{}] * len(prompts)
    for start in tqdm(range(0, len(order), p.batch_size), desc="generate", unit="batch"):
        idx = order[start : start + p.batch_size]
        enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True).to(model.device)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=p.max_new_tokens, do_sample=False, eos_token_id=stops,
                                 pad_token_id=tok.pad_token_id)
        for row, i in zip(gen[:, enc["input_ids"].shape[1]:].tolist(), idx):
            stopped = next((k for k, t in enumerate(row) if t in stops), None)
            ids = row if stopped is None else row[:stopped]
            out[i] = {"answer": tok.decode(ids, skip_special_tokens=True).strip(), "stopped": stopped is not None,
                      "new_tokens": len(ids)}
    return out


def test_loss(model, tok, rows: list[dict], batch_size: int) -> dict:
    """Teacher-forced mean loss on the reference answer tokens (completion), as in training; perplexity = exp."""
    import torch

    tok.padding_side = "right"
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        enc = tok([r["prompt"] + r["completion"] for r in batch], return_tensors="pt", padding=True).to(model.device)
        labels = enc["input_ids"].clone()
        labels[enc["attention_mask"] == 0] = -100
        for i, r in enumerate(batch):
            labels[i, : len(tok(r["prompt"])["input_ids"])] = -100  # no loss on the question
        with torch.no_grad():
            logits = model(**enc).logits[:, :-1].float()
        target = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="sum")
        total += float(nll)
        count += int((target != -100).sum())
    loss = total / max(count, 1)
    return {"test_loss": round(loss, 4), "test_perplexity": round(float(np.exp(loss)), 3), "test_loss_tokens": count}


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
    for k in keys:
        d = np.array([s[k] - base_by_id[s["id"]][k] for s in scored])
        out[f"delta_{k}"] = round(float(d.mean()), 4)
        out[f"delta_{k}_ci"] = bootstrap_ci(d, p, seed)
    return out


# ---------------------------------------------------------------- the second test: multiple choice by log-likelihood

CHOICE_KEYS = ("id", "question", "options", "answer")


def choice_item_problem(row) -> str | None:
    """Why a choice-test line is not {id, question, options, answer, context?}; None when it is."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    missing = [k for k in CHOICE_KEYS if k not in row]
    if missing:
        return f"missing key {', '.join(map(repr, missing))} (expected {', '.join(CHOICE_KEYS)}, and optionally context)"
    if isinstance(row["id"], bool) or not isinstance(row["id"], (str, int)) or str(row["id"]) == "":
        return f"id: expected a non-empty string or an integer, got {row['id']!r}"
    if not isinstance(row["question"], str) or not row["question"].strip():
        return f"question: expected a non-empty string, got {row['question']!r}"
    opts = row["options"]
    if (not isinstance(opts, list) or len(opts) < 2 or len(set(map(str, opts))) != len(opts)
            or not all(isinstance(o, str) and o.strip() for o in opts)):
        return f"options: expected a list of at least 2 distinct non-empty strings, got {opts!r}"
    if row["answer"] not in opts:
        return f"answer: expected one of the options {opts}, got {row['answer']!r}"
    if row.get("context") is not None and not isinstance(row["context"], str):
        return f"context: expected a string (or no context key), got {type(row['context']).__name__}"
    return None


def read_choice_test(path: Path) -> list[dict]:
    """Every item of a choice-test file, checked; a bad line stops with the file, its line number and why."""
    if not path.exists():
        raise MedtuneError(f"{path}: file not found")
    items, line_of = [], {}
    try:
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise MedtuneError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno})") from None
                if (why := choice_item_problem(row)) is not None:
                    raise MedtuneError(f"{path}:{n}: {why}")
                key = str(row["id"])
                if key in line_of:
                    raise MedtuneError(f"{path}:{n}: id: {key!r} repeats the id of line {line_of[key]}")
                line_of[key] = n
                items.append(row | {"id": key})
    except UnicodeDecodeError as e:
        raise MedtuneError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    if not items:
        raise MedtuneError(f"{path}: no choice-test items")
    return items


def choice_prompt(tok, fmt: FormatParams, item: dict) -> str:
    """The prompt as training lays it out (format.render): context, a blank line, the question, and a line asking
    for one of the item's options ("Answer yes, no or maybe.")."""
    opts = item["options"]
    ask = f"Answer {', '.join(opts[:-1])} or {opts[-1]}."
    question = "\n\n".join(x for x in (item.get("context"), item["question"]) if x) + "\n" + ask
    return render(tok, fmt, {"id": item["id"], "question": question})[0]


def choice_inputs(tok, fmt: FormatParams, items: list[dict]) -> dict[tuple, list]:
    """What the model reads to score each option: prompt + option tokens without the last one (the scored tokens
    are predicted from the positions before them) -> [(item index, option index, the option's token ids)].
    Options one token long all read just the prompt, so identical inputs are run once."""
    prompts = [choice_prompt(tok, fmt, it) for it in items]
    heads = tok(prompts)["input_ids"]
    flat = [(i, j) for i, it in enumerate(items) for j in range(len(it["options"]))]
    fulls = tok([prompts[i] + items[i]["options"][j] for i, j in flat])["input_ids"]
    inputs: dict[tuple, list] = {}
    for (i, j), full in zip(flat, fulls):
        head = heads[i]
        if len(full) <= len(head) or full[: len(head)] != head:
            raise MedtuneError(f"choice test item {items[i]['id']!r}: the prompt's tokens are not a prefix of the tokens "
                               f"of prompt + option {items[i]['options'][j]!r}, so the option cannot be scored alone")
        inputs.setdefault(tuple(full[:-1]), []).append((i, j, full[len(head):]))
    return inputs


def option_logprobs(model, tok, items: list[dict], inputs: dict[tuple, list], batch_size: int) -> list[list[float]]:
    """Per item, per option: the summed log-probs of the option's tokens after the prompt (not normalised by
    length: yes/no/maybe are one token each in gemma's vocabulary; longer options of other sets score lower).

    Inputs of similar length are batched and padded on the left (position ids from the attention mask), so
    every option's tokens sit at the end and only the last few positions' logits are computed: gemma's
    vocabulary is 262k."""
    import torch
    from tqdm import tqdm

    keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = [[0.0] * len(it["options"]) for it in items]
    order = sorted(inputs, key=len)
    for start in tqdm(range(0, len(order), batch_size), desc="choice test", unit="batch"):
        batch = order[start : start + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(x)) + list(x) for x in batch], device=model.device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch], device=model.device)
        keep = max(len(t) for x in batch for _, _, t in inputs[x])
        kw = {"logits_to_keep": keep} if keeps_logits else {}
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), **kw).logits
        logp = logits[:, -keep:].float().log_softmax(-1)
        for row, x in enumerate(batch):
            for i, j, targets in inputs[x]:
                pos = torch.arange(keep - len(targets), keep, device=logp.device)
                out[i][j] = float(logp[row, pos, torch.tensor(targets, device=logp.device)].sum())
    return out


def content_free_items(items: list[dict]) -> list[dict]:
    """One content-free item per distinct option list, in first-seen order: no context and the question "N/A",
    so its prompt has the items' layout and "Answer ..." line but no evidence (Zhao et al. 2021). Scored
    with the items (choice_inputs(tok, fmt, items + content_free_items(items))): one more input per list."""
    lists = dict.fromkeys(tuple(it["options"]) for it in items)
    return [{"id": "content-free: " + "/".join(o), "question": "N/A", "options": list(o), "answer": o[0]} for o in lists]


def choice_scores(model, tok, items: list[dict], inputs: dict[tuple, list],
                  batch_size: int) -> tuple[list[list[float]], list[list[float]]]:
    """Per item, per option: (log p(option | the item's prompt), log p(option | the content-free prompt of its
    option list)). `inputs` must come from choice_inputs(tok, fmt, items + content_free_items(items))."""
    free = content_free_items(items)
    scores = option_logprobs(model, tok, items + free, inputs, batch_size)
    prior = {tuple(f["options"]): s for f, s in zip(free, scores[len(items):])}
    return scores[: len(items)], [prior[tuple(it["options"])] for it in items]


def score_choices(model, tok, items: list[dict], inputs: dict[tuple, list], p: EvaluateParams) -> list[dict]:
    """Score each item's options and pick the most likely one (ties: the first listed), raw and calibrated
    (log-prob minus the content-free prompt's log-prob of the same option)."""
    # a small batch: each input holds a whole abstract, and even a few positions' logits span the vocabulary
    raw, prior = choice_scores(model, tok, items, inputs, min(p.batch_size, 8))
    out = []
    for it, lp, lp0 in zip(items, raw, prior):
        choice = it["options"][int(np.argmax(lp))]
        calibrated = it["options"][int(np.argmax(np.array(lp) - np.array(lp0)))]
        out.append({"id": it["id"], "answer": it["answer"], "choice": choice, "correct": choice == it["answer"],
                    "calibrated_choice": calibrated, "calibrated_correct": calibrated == it["answer"],
                    "logprobs": {o: round(v, 4) for o, v in zip(it["options"], lp)},
                    "prior_logprobs": {o: round(v, 4) for o, v in zip(it["options"], lp0)}})
    return out


def answer_counts(preds: list[dict], key: str) -> dict[str, int]:
    """Option -> how many items chose it, every option listed (0 too), in the items' option order."""
    counts = dict.fromkeys((o for c in preds for o in c["logprobs"]), 0)
    for c in preds:
        counts[c[key]] += 1
    return counts


def choice_summary(preds: list[dict], p: EvaluateParams, seed: int) -> dict:
    v = np.array([float(c["correct"]) for c in preds])
    cal = np.array([float(c["calibrated_correct"]) for c in preds])
    majority = Counter(c["answer"] for c in preds).most_common(1)[0][1] / len(preds)
    return {"choice_n": len(preds), "choice_accuracy": round(float(v.mean()), 4), "choice_accuracy_ci": bootstrap_ci(v, p, seed),
            "choice_calibrated_accuracy": round(float(cal.mean()), 4),
            "choice_calibrated_accuracy_ci": bootstrap_ci(cal, p, seed),
            "choice_majority_rate": round(majority, 4),
            "choice_answer_counts": answer_counts(preds, "choice"),
            "choice_calibrated_answer_counts": answer_counts(preds, "calibrated_choice")}


def choice_delta(preds: list[dict], base_by_id: dict[str, dict], p: EvaluateParams, seed: int) -> dict:
    """tuned - base choice accuracy (raw and calibrated) on the same items, with paired bootstrap CIs."""
    out = {}
    for key, name in (("correct", "choice_accuracy"), ("calibrated_correct", "choice_calibrated_accuracy")):
        d = np.array([float(c[key]) - float(base_by_id[c["id"]][key]) for c in preds])
        out |= {f"delta_{name}": round(float(d.mean()), 4), f"delta_{name}_ci": bootstrap_ci(d, p, seed)}
    return out


def read_choice_baseline(path: Path, items: list[dict]) -> dict[str, dict]:
    """The base model's choice predictions for these items (checked before any model is loaded)."""
    if not path.exists():
        raise MedtuneError(f"{path}: not found; re-run evaluate_base with --choice-test for the paired choice delta")
    by_id = {str(b.get("id")): b for b in read_jsonl(path)}
    missing = [it["id"] for it in items if it["id"] not in by_id]
    if missing:
        raise MedtuneError(f"{path}: lacks {len(missing)} of the {len(items)} choice-test ids (e.g. {missing[0]}); "
                           "re-run evaluate_base with the same --choice-test file and evaluate.choice_max_examples")
    old = [it["id"] for it in items if "calibrated_correct" not in by_id[it["id"]]]
    if old:
        raise MedtuneError(f"{path}: {len(old)} of the {len(items)} items have no calibrated choice (e.g. {old[0]}: "
                           "no 'calibrated_correct'; written before calibrated scoring); re-run evaluate_base")
    return by_id


def run(p: EvaluateParams, m: ModelParams, base: BaseParams, data_dir: Path, out_dir: Path,
        adapter: Path | None = None, baseline: Path | None = None, disclaimer: str | None = None,
        choice_test: Path | None = None, fmt: FormatParams | None = None) -> dict:
    """`disclaimer`: the text format adds to answers (format.disclaimer), whose rate in the answers is measured.
    `choice_test`: a second, multiple-choice test, whose prompts are rendered with `fmt` (the format params)."""
    set_seed(base.seed)
    rows = read_jsonl(data_dir / "test.jsonl")
    rows = sorted(rows, key=lambda r: str(r["id"]))[: p.max_examples or None]
    if not rows:
        raise MedtuneError(f"{data_dir / 'test.jsonl'}: no test questions")
    items, base_choices = [], None
    if choice_test is not None:  # every input check before the model loads
        if fmt is None:
            raise ValueError("choice_test needs fmt: the format params its prompts are rendered with")
        if fmt.template == "mcq":
            raise MedtuneError(f"{choice_test}: format.template=mcq letters the options; the choice test is scored "
                               "with the chat, alpaca or qa template")
        items = sorted(read_choice_test(choice_test), key=lambda it: it["id"])[: p.choice_max_examples or None]
        if baseline is not None:
            base_choices = read_choice_baseline(baseline.parent / "choice_predictions.jsonl", items)
    base_path, _ = resolve_base(m)
    tok = load_tokenizer(base_path, m)
    try:  # the items' prompts and, for the calibrated scores, one content-free prompt per option list
        inputs = choice_inputs(tok, fmt, items + content_free_items(items)) if items else {}
    except MedtuneError as e:
        raise MedtuneError(f"{choice_test}: {e}") from None
    model = load_model(base_path, m)
    if adapter is not None:
        from peft import PeftModel

        if not (adapter / "adapter_model.safetensors").exists():
            raise MedtuneError(f"{adapter}: no adapter_model.safetensors (run the train stage)")
        try:
            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()  # merged in memory: faster generation
        except Exception as e:  # truncated or corrupted safetensors, an adapter for another base model
            raise MedtuneError(f"{adapter}: could not load the adapter on {m.base} ({type(e).__name__}: {e})") from None
    model.eval()
    t0 = time.perf_counter()
    preds = generate(model, tok, [r["prompt"] for r in rows], p)
    gen_s = time.perf_counter() - t0
    scored = score(rows, preds, disclaimer)
    metrics = summarise(scored, p, base.seed)
    # a small batch: the loss pass holds full-vocabulary logits for whole answers (the loss does not depend on it)
    metrics |= test_loss(model, tok, rows, min(p.batch_size, 8))
    if p.bertscore_model:
        f1, note = bertscore(p.bertscore_model, [s["prediction"] for s in scored], [s["reference"] for s in scored])
        if f1 is not None:
            for s, x in zip(scored, f1):
                s["bertscore_f1"] = x
            metrics |= {"bertscore_f1": round(float(np.mean(f1)), 4), "bertscore_f1_ci": bootstrap_ci(np.array(f1), p, base.seed)}
        else:
            log.warning("BERTScore %s", note)
            metrics["bertscore_note"] = note
    else:
        metrics["bertscore_note"] = "skipped: evaluate.bertscore_model is null"
    base_scored = read_jsonl(baseline) if baseline is not None else None
    if base_scored is not None:
        metrics |= paired_delta(scored, base_scored, p, base.seed)
        base_by_id = {b["id"]: b for b in base_scored}
        for s in scored:  # one file with both answers side by side
            b = base_by_id[s["id"]]
            s |= {"base_prediction": b["prediction"], "base_rougeL": b["rougeL"]}
    choices = []
    if items:
        t0 = time.perf_counter()
        choices = score_choices(model, tok, items, inputs, p)
        metrics |= choice_summary(choices, p, base.seed)
        if base_choices is not None:
            metrics |= choice_delta(choices, base_choices, p, base.seed)
            for c in choices:
                b = base_choices[c["id"]]
                c |= {"base_choice": b["choice"], "base_calibrated_choice": b["calibrated_choice"]}
        metrics["choice_s"] = round(time.perf_counter() - t0, 1)
    metrics["generation_s"] = round(gen_s, 1)
    metrics["device"] = device()
    with atomic_dir(out_dir) as tmp:
        write_text_atomic(tmp / "predictions.jsonl", jsonl_text(scored))
        if items:
            write_text_atomic(tmp / "choice_predictions.jsonl", jsonl_text(choices))
        write_json(tmp / "breakdown.json", breakdown(rows, scored))
        if base_scored is not None:
            write_text_atomic(tmp / "examples.md", examples_page(scored, base_scored))
    return metrics


@click.command()
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--adapter", type=click.Path(exists=True, file_okay=False, path_type=Path), help="evaluate base + this adapter")
@click.option("--baseline", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="base predictions, for the paired delta")
@click.option("--choice-test", "choice_test", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="a second test: multiple-choice items (JSON lines: id, question, context, options, answer) scored by option log-likelihood")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--metrics", "metrics_file", required=True, type=click.Path(dir_okay=False, path_type=Path))
def main(data_dir: Path, adapter: Path | None, baseline: Path | None, choice_test: Path | None, out_dir: Path, metrics_file: Path) -> None:
    setup_logging()
    with cli_errors():
        base, m, f, p = load_params(("base", BaseParams), ("model", ModelParams), ("format", FormatParams), ("evaluate", EvaluateParams))
        log_params("evaluate", p)
        # the disclaimer rate is measured whether or not training added it (off: the rate the data has)
        metrics = run(p, m, base, data_dir, out_dir, adapter, baseline, disclaimer=f.disclaimer.text, choice_test=choice_test, fmt=f)
        write_json(metrics_file, metrics)
    log.info("%s: rougeL %.4f %s (n=%d)", "tuned" if adapter else "base", metrics["rougeL"], metrics["rougeL_ci"], metrics["n"])
    if "choice_n" in metrics:
        log.info("choice test: accuracy %.4f %s, calibrated %.4f %s (n=%d, majority label %.4f); chosen %s, "
                 "calibrated %s", metrics["choice_accuracy"], metrics["choice_accuracy_ci"],
                 metrics["choice_calibrated_accuracy"], metrics["choice_calibrated_accuracy_ci"], metrics["choice_n"],
                 metrics["choice_majority_rate"], metrics["choice_answer_counts"], metrics["choice_calibrated_answer_counts"])


if __name__ == "__main__":
    main()

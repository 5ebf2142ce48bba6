"""The second test: multiple-choice items (PubMedQA yes/no/maybe) scored by option log-likelihood with the same
model and prompt layout as training (prompts.question_prompt), so a tuned model can be checked for lost general
reasoning. Two scores per option: the raw one, log p(option | prompt), and a calibrated one, that minus log
p(option | a content-free prompt of the same layout: no context, question "N/A"), i.e. contextual calibration
(Zhao et al. 2021, "Calibrate Before Use", ICML; the domain-conditional PMI of Holtzman et al. 2021, "Surface
Form Competition"). The raw score mostly follows the model's prior for the first word of an answer; the
calibrated one measures how far the item moves it."""

from __future__ import annotations

import inspect
from collections import Counter
from pathlib import Path

import numpy as np

from medtune.console import MedtuneError, progress
from medtune.io import numbered_jsonl, read_jsonl
from medtune.metrics import bootstrap_ci
from medtune.params import EvaluateParams, FormatParams
from medtune.prompts import question_prompt

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
    items, line_of = [], {}
    for n, row in numbered_jsonl(path):
        if (why := choice_item_problem(row)) is not None:
            raise MedtuneError(f"{path}:{n}: {why}")
        key = str(row["id"])
        if key in line_of:
            raise MedtuneError(f"{path}:{n}: id: {key!r} repeats the id of line {line_of[key]}")
        line_of[key] = n
        items.append(row | {"id": key})
    if not items:
        raise MedtuneError(f"{path}: no choice-test items")
    return items


def choice_prompt(tok, fmt: FormatParams, item: dict) -> str:
    """The prompt as training lays it out (format.render): context, a blank line, the question, and a line asking
    for one of the item's options ("Answer yes, no or maybe.")."""
    opts = item["options"]
    ask = f"Answer {', '.join(opts[:-1])} or {opts[-1]}."
    question = "\n\n".join(x for x in (item.get("context"), item["question"]) if x) + "\n" + ask
    return question_prompt(tok, fmt, question)


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

    keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = [[0.0] * len(it["options"]) for it in items]
    order = sorted(inputs, key=len)
    for start in progress(range(0, len(order), batch_size), desc="choice test", unit="batch"):
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



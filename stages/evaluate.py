"""Answer the test questions with the base model or base + adapter (batched greedy decoding) and score the
answers against the references: ROUGE-1/2/L F1 with bootstrap confidence intervals, token F1, answer
length, empty and runaway answers. For the tuned model, also the paired tuned - base delta.

DVC stages `evaluate_base` and `evaluate_tuned` (the base evaluation does not depend on the adapter, so it
stays cached across training sweeps). Run by hand:
    python -m stages.evaluate --data data/formatted --out eval/base --metrics metrics/eval_base.json
    python -m stages.evaluate --data data/formatted --adapter models/adapter --baseline eval/base/predictions.jsonl \
        --out eval/tuned --metrics metrics/eval_tuned.json
Reads params `base`, `model`, `evaluate`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import string
import time
from collections import Counter
from pathlib import Path

import click
import numpy as np

from stages.common import (
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
from stages.format import FormatParams
from stages.modeling import ModelParams, device, load_model, load_tokenizer, resolve_base, stop_token_ids

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

    def problems(self) -> list[str]:
        out = []
        if self.max_examples < 0:
            out.append("max_examples: must be >= 0")
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


def run(p: EvaluateParams, m: ModelParams, base: BaseParams, data_dir: Path, out_dir: Path,
        adapter: Path | None = None, baseline: Path | None = None, disclaimer: str | None = None) -> dict:
    """`disclaimer`: the text format adds to answers (format.disclaimer), whose rate in the answers is measured."""
    set_seed(base.seed)
    rows = read_jsonl(data_dir / "test.jsonl")
    rows = sorted(rows, key=lambda r: str(r["id"]))[: p.max_examples or None]
    if not rows:
        raise MedtuneError(f"{data_dir / 'test.jsonl'}: no test questions")
    base_path, _ = resolve_base(m)
    tok = load_tokenizer(base_path, m)
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
    metrics["generation_s"] = round(gen_s, 1)
    metrics["device"] = device()
    with atomic_dir(out_dir) as tmp:
        write_text_atomic(tmp / "predictions.jsonl", jsonl_text(scored))
        write_json(tmp / "breakdown.json", breakdown(rows, scored))
        if base_scored is not None:
            write_text_atomic(tmp / "examples.md", examples_page(scored, base_scored))
    return metrics


@click.command()
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--adapter", type=click.Path(exists=True, file_okay=False, path_type=Path), help="evaluate base + this adapter")
@click.option("--baseline", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="base predictions, for the paired delta")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--metrics", "metrics_file", required=True, type=click.Path(dir_okay=False, path_type=Path))
def main(data_dir: Path, adapter: Path | None, baseline: Path | None, out_dir: Path, metrics_file: Path) -> None:
    setup_logging()
    with cli_errors():
        base, m, f, p = load_params(("base", BaseParams), ("model", ModelParams), ("format", FormatParams), ("evaluate", EvaluateParams))
        log_params("evaluate", p)
        # the disclaimer rate is measured whether or not training added it (off: the rate the data has)
        metrics = run(p, m, base, data_dir, out_dir, adapter, baseline, disclaimer=f.disclaimer.text)
        write_json(metrics_file, metrics)
    log.info("%s: rougeL %.4f %s (n=%d)", "tuned" if adapter else "base", metrics["rougeL"], metrics["rougeL_ci"], metrics["n"])


if __name__ == "__main__":
    main()

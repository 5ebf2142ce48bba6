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


def score(rows: list[dict], preds: list[dict]) -> list[dict]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    scored = []
    for r, g in zip(rows, preds):
        s = scorer.score(r["reference"], g["answer"])
        scored.append({
            "id": r["id"], "question": r["question"], "reference": r["reference"], "prediction": g["answer"],
            "stopped": g["stopped"], "new_tokens": g["new_tokens"],
            **{k: round(s[k].fmeasure, 4) for k in ROUGE_KEYS},
            "token_f1": round(token_f1(g["answer"], r["reference"]), 4),
        })
    return scored


def summarise(scored: list[dict], p: EvaluateParams, seed: int) -> dict:
    m: dict = {"n": len(scored)}
    for k in ROUGE_KEYS + ("token_f1",):
        v = np.array([s[k] for s in scored])
        m[k] = round(float(v.mean()), 4)
        m[f"{k}_ci"] = bootstrap_ci(v, p, seed)
    m["answer_words_mean"] = round(float(np.mean([len(s["prediction"].split()) for s in scored])), 1)
    m["reference_words_mean"] = round(float(np.mean([len(s["reference"].split()) for s in scored])), 1)
    m["empty_rate"] = round(float(np.mean([not s["prediction"] for s in scored])), 4)
    m["runaway_rate"] = round(float(np.mean([not s["stopped"] for s in scored])), 4)
    m["repetition_rate"] = round(float(np.mean([repetition(s["prediction"]) for s in scored])), 4)
    return m


def paired_delta(scored: list[dict], baseline: list[dict], p: EvaluateParams, seed: int) -> dict:
    """tuned - base on the same questions, with a paired bootstrap CI."""
    base_by_id = {b["id"]: b for b in baseline}
    missing = [s["id"] for s in scored if s["id"] not in base_by_id]
    if missing:
        raise MedtuneError(f"baseline predictions lack {len(missing)} test ids (e.g. {missing[0]}); re-run evaluate_base")
    out = {}
    for k in ROUGE_KEYS + ("token_f1",):
        d = np.array([s[k] - base_by_id[s["id"]][k] for s in scored])
        out[f"delta_{k}"] = round(float(d.mean()), 4)
        out[f"delta_{k}_ci"] = bootstrap_ci(d, p, seed)
    return out


def run(p: EvaluateParams, m: ModelParams, base: BaseParams, data_dir: Path, out_dir: Path,
        adapter: Path | None = None, baseline: Path | None = None) -> dict:
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
    scored = score(rows, preds)
    metrics = summarise(scored, p, base.seed)
    base_scored = read_jsonl(baseline) if baseline is not None else None
    if base_scored is not None:
        metrics |= paired_delta(scored, base_scored, p, base.seed)
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
        base, m, p = load_params(("base", BaseParams), ("model", ModelParams), ("evaluate", EvaluateParams))
        log_params("evaluate", p)
        metrics = run(p, m, base, data_dir, out_dir, adapter, baseline)
        write_json(metrics_file, metrics)
    log.info("%s: rougeL %.4f %s (n=%d)", "tuned" if adapter else "base", metrics["rougeL"], metrics["rougeL_ci"], metrics["n"])


if __name__ == "__main__":
    main()

"""Answer the test questions with the base model or base + adapter (batched greedy decoding) and score the
answers against the references: ROUGE-1/2/L F1, token F1 and medical-entity F1 (--lexicon, medtune/entities.py)
with bootstrap confidence intervals, test loss,
answer length, empty and runaway answers; for the tuned model, the paired tuned - base delta
(medtune/metrics.py). With --choice-test FILE, a second test: multiple-choice items scored by option
log-likelihood with the same model and prompt layout (medtune/choice.py).

DVC stages `evaluate_base` and `evaluate_tuned` (the base evaluation does not depend on the adapter, so it
stays cached across training sweeps). Run by hand:
    python -m medtune.stages.evaluate --data data/formatted --choice-test data/benchmarks/pubmedqa_test.jsonl \
        --lexicon data/benchmarks/medical_terms.txt --out eval/base --metrics metrics/eval_base.json
    python -m medtune.stages.evaluate --data data/formatted --choice-test data/benchmarks/pubmedqa_test.jsonl \
        --lexicon data/benchmarks/medical_terms.txt --adapter models/adapter --baseline eval/base/predictions.jsonl --out eval/tuned --metrics metrics/eval_tuned.json
Reads params `base`, `model`, `format`, `evaluate`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import click
import numpy as np

from medtune import params
from medtune.choice import (
    choice_delta,
    choice_inputs,
    choice_summary,
    content_free_items,
    read_choice_baseline,
    read_choice_test,
    score_choices,
)
from medtune.console import MedtuneError, cli_errors, log_params, setup_logging
from medtune.entities import load_lexicon, score_rows, summarise_entities
from medtune.generation import greedy
from medtune.io import atomic_dir, jsonl_text, read_jsonl, write_json, write_text_atomic
from medtune.metrics import (
    bertscore,
    bootstrap_ci,
    breakdown,
    examples_page,
    paired_delta,
    score,
    summarise,
    test_loss,
)
from medtune.models import (
    device,
    load_adapter,
    load_model,
    load_tokenizer,
    resolve_base,
    set_seed,
)
from medtune.params import BaseParams, EvaluateParams, FormatParams, ModelParams

log = logging.getLogger("medtune.evaluate")
# the few numbers the metrics file keeps for `dvc exp show`; every figure (CIs, rates, the choice test) is in
# <out>/metrics.json
HEADLINE = ("n", "rougeL", "delta_rougeL", "token_f1", "delta_token_f1", "entity_f1", "delta_entity_f1",
            "runaway_rate", "empty_rate", "test_loss", "choice_accuracy", "choice_calibrated_accuracy")
# in the metrics file only, so that <out> is the same every run on any machine
TIMINGS = ("generation_s", "choice_s", "device")


def run(p: EvaluateParams, m: ModelParams, base: BaseParams, data_dir: Path, out_dir: Path,
        adapter: Path | None = None, baseline: Path | None = None, disclaimer: str | None = None,
        choice_test: Path | None = None, fmt: FormatParams | None = None, lexicon: Path | None = None) -> dict:
    """`disclaimer`: the text format adds to answers (format.disclaimer), whose rate in the answers is measured.
    `choice_test`: a second, multiple-choice test, whose prompts are rendered with `fmt` (the format params).
    `lexicon`: the medical entity lexicon for entity F1 (medtune/entities.py); none, no entity scores."""
    set_seed(base.seed)
    rows = sorted(read_jsonl(data_dir / "test.jsonl"), key=lambda r: str(r["id"]))[: p.max_examples or None]
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
    lex = load_lexicon(lexicon) if lexicon is not None else None
    base_path, _ = resolve_base(m)
    tok = load_tokenizer(base_path, m)
    try:  # the items' prompts and, for the calibrated scores, one content-free prompt per option list
        inputs = choice_inputs(tok, fmt, items + content_free_items(items)) if items else {}
    except MedtuneError as e:
        raise MedtuneError(f"{choice_test}: {e}") from None
    model = load_model(base_path, m)
    if adapter is not None:
        model = load_adapter(model, adapter, m)
    model.eval()
    t0 = time.perf_counter()
    preds = greedy(model, tok, [r["prompt"] for r in rows], p.max_new_tokens, p.batch_size)
    gen_s = time.perf_counter() - t0
    scored = score(rows, preds, disclaimer)
    metrics = summarise(scored, p, base.seed)
    if lex is not None:
        entities = score_rows(scored, lex)
        for s, e in zip(scored, entities):
            s["entity_f1"] = e["entity_f1"]
        metrics |= summarise_entities(entities)
        if metrics["entity_n"]:
            f1 = np.array([e["entity_f1"] for e in entities if e["entity_f1"] is not None])
            metrics["entity_f1_ci"] = bootstrap_ci(f1, p, base.seed)
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
        write_json(tmp / "metrics.json", {k: v for k, v in metrics.items() if k not in TIMINGS})
        if base_scored is not None:
            write_text_atomic(tmp / "examples.md", examples_page(scored, base_scored))
    return metrics


@click.command()
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--adapter", type=click.Path(exists=True, file_okay=False, path_type=Path), help="evaluate base + this adapter")
@click.option("--baseline", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="base predictions, for the paired delta")
@click.option("--choice-test", "choice_test", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="a second test: multiple-choice items (JSON lines: id, question, context, options, answer) scored by option log-likelihood")
@click.option("--lexicon", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="medical entity lexicon (term<TAB>entity<TAB>kind lines) for entity F1")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--metrics", "metrics_file", required=True, type=click.Path(dir_okay=False, path_type=Path))
def main(data_dir: Path, adapter: Path | None, baseline: Path | None, choice_test: Path | None, lexicon: Path | None,
         out_dir: Path, metrics_file: Path) -> None:
    started = time.perf_counter()  # the stage's wall time, recorded in its metrics
    setup_logging()
    with cli_errors(persist=True):  # dvc.yaml: persist
        base, m, f, p = params.load("base", "model", "format", "evaluate")
        log_params("evaluate", ("evaluate", p))
        # the disclaimer rate is measured whether or not training added it (off: the rate the data has)
        metrics = run(p, m, base, data_dir, out_dir, adapter, baseline, disclaimer=f.disclaimer.text, choice_test=choice_test, fmt=f,
                      lexicon=lexicon)
        headline = {k: metrics[k] for k in HEADLINE + TIMINGS if k in metrics}
        write_json(metrics_file, headline | {"wall_s": round(time.perf_counter() - started, 1)})
    log.info("%s: rougeL %.4f %s (n=%d)", "tuned" if adapter else "base", metrics["rougeL"], metrics["rougeL_ci"], metrics["n"])
    if "choice_n" in metrics:
        log.info("choice test: accuracy %.4f %s, calibrated %.4f %s (n=%d, majority label %.4f); chosen %s, "
                 "calibrated %s", metrics["choice_accuracy"], metrics["choice_accuracy_ci"],
                 metrics["choice_calibrated_accuracy"], metrics["choice_calibrated_accuracy_ci"], metrics["choice_n"],
                 metrics["choice_majority_rate"], metrics["choice_answer_counts"], metrics["choice_calibrated_answer_counts"])


if __name__ == "__main__":
    main()

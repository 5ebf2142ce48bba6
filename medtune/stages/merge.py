"""Merge the LoRA adapter into the base weights, save a standalone model, and prove it: the saved merged
model, loaded back from disk, must give the same logits as base + adapter on test prompts (within
`merge.atol`) and the same greedy answers. The stage fails if it does not.

DVC stage `merge`.  Run by hand:
    python -m medtune.stages.merge --adapter models/adapter --data data/formatted --out models/merged --metrics metrics/merge.json \
        --eval-base eval/base/metrics.json --eval-tuned eval/tuned/metrics.json --data-card data/source/DATA_CARD.md
Reads params `model`, `merge`, `format`, `card`. Writes safetensors, tokenizer (with the chat template),
generation config, run_config.json and the model card README.md (medtune/cards.py) to --out.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import click

from medtune import params
from medtune.cards import CardInputs, check_card_inputs, write_model_card
from medtune.console import MedtuneError, cli_errors, log_params, setup_logging
from medtune.generation import greedy
from medtune.io import atomic_dir, read_jsonl, write_json
from medtune.models import (
    device_kind,
    load_adapter,
    load_model,
    load_tokenizer,
    resolve_base,
    stop_token_ids,
    versions,
)
from medtune.params import MergeParams, ModelParams
from medtune.summary import table

log = logging.getLogger("medtune.merge")


def run(p: MergeParams, m: ModelParams, adapter: Path, data_dir: Path, out_dir: Path, card: CardInputs | None = None) -> dict:
    import torch

    base_path, identity = resolve_base(m)
    tok = load_tokenizer(base_path, m)
    run_config = json.loads((adapter / "run_config.json").read_text()) if (adapter / "run_config.json").exists() else {}
    trained_on = run_config["params"]["train"]["quantization"] if run_config else "none"
    # An adapter trained on a 4-bit/8-bit (QLoRA) base is merged into the full-precision base weights, not into
    # the quantized ones (that would bake quantization error into a model saved at full precision).
    peft_model = load_adapter(load_model(base_path, m, p.dtype), adapter, m, merge=False).eval()
    prompts = [r["prompt"] for r in sorted(read_jsonl(data_dir / "test.jsonl"), key=lambda r: str(r["id"]))[: p.check_prompts]]
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True).to(peft_model.device)
    with torch.no_grad():
        ref_logits = peft_model(**enc).logits.float()
    ref_answers = greedy(peft_model, tok, prompts, p.check_new_tokens, len(prompts), desc="merge check (base + adapter)")
    merged = peft_model.merge_and_unload()
    merged.generation_config.eos_token_id = stop_token_ids(tok, merged)
    with atomic_dir(out_dir) as tmp:
        merged.to(getattr(torch, p.dtype)).save_pretrained(tmp, safe_serialization=True, max_shard_size=p.max_shard_size)
        tok.save_pretrained(tmp)
        del merged, peft_model
        reloaded = load_model(tmp, m.model_copy(update={"trust_remote_code": False}), p.dtype).eval()
        with torch.no_grad():
            diff = (reloaded(**enc).logits.float() - ref_logits).abs()
            max_diff = float(diff[enc["attention_mask"].bool()].max())
        answers = greedy(reloaded, tok, prompts, p.check_new_tokens, len(prompts), desc="merge check (merged)")
        same_answers = [a["ids"] for a in answers] == [a["ids"] for a in ref_answers]
        metrics = {"max_abs_logit_diff": round(max_diff, 6), "atol": p.atol, "prompts": len(prompts),
                   "trained_quantization": trained_on, "merged_dtype": p.dtype,
                   "weight_files": len(list(tmp.glob("*.safetensors"))),
                   "greedy_answers_identical": same_answers, "passed": max_diff <= p.atol and same_answers}
        if not metrics["passed"]:
            raise MedtuneError(f"merge check failed: max |logit diff| {max_diff:.3g} (atol {p.atol}), "
                               f"greedy answers identical: {same_answers}; the merged model was not saved")
        write_json(tmp / "run_config.json", run_config | {"merge": p.model_dump(), "merge_check": metrics,
                                                         "base_model": identity, "versions": versions(), "device": device_kind()})
        if card is not None:  # the model card (README.md), inside the atomic output: no model without its card
            write_model_card(tmp, "merged", card)
    return metrics


@click.command()
@click.option("--adapter", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--metrics", "metrics_file", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--eval-base", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path), help="for the model card")
@click.option("--eval-tuned", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path), help="for the model card")
@click.option("--data-card", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path), help="for the model card")
def main(adapter: Path, data_dir: Path, out_dir: Path, metrics_file: Path, eval_base: Path, eval_tuned: Path, data_card: Path) -> None:
    started = time.perf_counter()  # the stage's wall time, recorded in its metrics
    setup_logging()
    with cli_errors(persist=True):  # dvc.yaml: persist
        m, p, fmt, cp = params.load("model", "merge", "format", "card")
        log_params("merge", ("merge", p))
        card = CardInputs(cp, fmt, eval_base, eval_tuned, data_card)
        check_card_inputs(card)  # before the merge, not after it
        metrics = run(p, m, adapter, data_dir, out_dir, card)
        write_json(metrics_file, metrics | {"wall_s": round(time.perf_counter() - started, 1)})
    log.info("merged: %s", metrics)
    click.echo(f"\nThe run (medtune summary):\n{table()}", err=True)  # the last stage of a run: its results in one table


if __name__ == "__main__":
    main()

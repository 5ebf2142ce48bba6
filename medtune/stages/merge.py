"""Merge the LoRA adapter into the base weights, save a standalone model, and prove it: the saved merged
model, loaded back from disk, must give the same logits as base + adapter on test prompts (within
`merge.atol`) and the same greedy answers. The stage fails if it does not.

DVC stage `merge`.  Run by hand:
    python -m medtune.stages.merge --adapter models/adapter --data data/formatted --out models/merged --metrics metrics/merge.json \
        --eval-base metrics/eval_base.json --eval-tuned metrics/eval_tuned.json --data-card data/source/DATA_CARD.md
Reads params `model`, `merge`, `format`, `card`. Writes safetensors, tokenizer (with the chat template),
generation config, run_config.json and the model card README.md (medtune/tools/card.py) to --out.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Literal

import click

from medtune.tools.card import CardInputs, CardParams, check_card_inputs, write_model_card
from medtune.common import MedtuneError, atomic_dir, cli_errors, load_params, log_params, read_jsonl, setup_logging, write_json
from medtune.stages.format import FormatParams
from medtune.modeling import ModelParams, device_name, load_model, load_tokenizer, resolve_base, stop_token_ids, versions

log = logging.getLogger("medtune.merge")


@dataclasses.dataclass(frozen=True)
class MergeParams:
    dtype: Literal["float32", "bfloat16", "float16"]  # of the saved merged weights
    check_prompts: int  # test prompts used for the logits and greedy-answer checks
    check_new_tokens: int  # length of the greedy answers compared
    atol: float  # max |logit difference| allowed between merged and base + adapter
    max_shard_size: str  # safetensors files are split above this size (e.g. "2GB"): large models load piecewise

    def problems(self) -> list[str]:
        return ["check_prompts: must be >= 1"] if self.check_prompts < 1 else []


def run(p: MergeParams, m: ModelParams, adapter: Path, data_dir: Path, out_dir: Path, card: CardInputs | None = None) -> dict:
    import torch
    from peft import PeftModel

    if not (adapter / "adapter_model.safetensors").exists():
        raise MedtuneError(f"{adapter}: no adapter_model.safetensors (run the train stage)")
    base_path, identity = resolve_base(m)
    tok = load_tokenizer(base_path, m)
    dtype = p.dtype  # reference and reloaded merged model at the saved precision
    run_config = json.loads((adapter / "run_config.json").read_text()) if (adapter / "run_config.json").exists() else {}
    trained_on = run_config["params"]["train"]["quantization"] if run_config else "none"
    # An adapter trained on a 4-bit/8-bit (QLoRA) base is merged into the full-precision base weights, not into
    # the quantized ones (that would bake quantization error into a model saved at full precision).
    try:
        peft_model = PeftModel.from_pretrained(load_model(base_path, m, dtype), adapter)
    except Exception as e:
        raise MedtuneError(f"{adapter}: could not load the adapter on {m.base} ({type(e).__name__}: {e})") from None
    peft_model.eval()
    prompts = [r["prompt"] for r in sorted(read_jsonl(data_dir / "test.jsonl"), key=lambda r: str(r["id"]))[: p.check_prompts]]
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True).to(peft_model.device)
    gen_kw = dict(max_new_tokens=p.check_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                  eos_token_id=stop_token_ids(tok, peft_model))
    with torch.no_grad():
        ref_logits = peft_model(**enc).logits.float()
        ref_answers = peft_model.generate(**enc, **gen_kw)
    merged = peft_model.merge_and_unload()
    merged.generation_config.eos_token_id = gen_kw["eos_token_id"]
    with atomic_dir(out_dir) as tmp:
        merged.to(getattr(torch, p.dtype)).save_pretrained(tmp, safe_serialization=True, max_shard_size=p.max_shard_size)
        tok.save_pretrained(tmp)
        del merged, peft_model
        reloaded = load_model(tmp, dataclasses.replace(m, trust_remote_code=False), dtype).eval()
        with torch.no_grad():
            diff = (reloaded(**enc).logits.float() - ref_logits).abs()
            mask = enc["attention_mask"].bool()
            max_diff = float(diff[mask].max())
            same_answers = bool(torch.equal(reloaded.generate(**enc, **gen_kw), ref_answers))
        metrics = {"max_abs_logit_diff": round(max_diff, 6), "atol": p.atol, "prompts": len(prompts),
                   "trained_quantization": trained_on, "merged_dtype": p.dtype,
                   "weight_files": len(list(tmp.glob("*.safetensors"))),
                   "greedy_answers_identical": same_answers, "passed": max_diff <= p.atol and same_answers}
        if not metrics["passed"]:
            raise MedtuneError(f"merge check failed: max |logit diff| {max_diff:.3g} (atol {p.atol}), "
                               f"greedy answers identical: {same_answers}; the merged model was not saved")
        write_json(tmp / "run_config.json", run_config | {"merge": dataclasses.asdict(p), "merge_check": metrics,
                                                         "base_model": identity, "versions": versions(), "device": device_name()})
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
    setup_logging()
    with cli_errors():
        m, p, fmt, cp = load_params(("model", ModelParams), ("merge", MergeParams), ("format", FormatParams), ("card", CardParams))
        log_params("merge", p)
        card = CardInputs(cp, fmt, eval_base, eval_tuned, data_card)
        check_card_inputs(card)  # before the merge, not after it
        metrics = run(p, m, adapter, data_dir, out_dir, card)
        write_json(metrics_file, metrics)
    log.info("merged: %s", metrics)


if __name__ == "__main__":
    main()

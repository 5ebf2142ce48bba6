"""Model cards: a README.md for the merged model (written by the `merge` stage) and for the adapter (written
by `medtune push`, or by hand with `medtune card`), in the Hugging Face card format (YAML metadata + markdown).

A card states the base model and its revision, the training data with its license (read from the data
card), the params, the evaluation metrics with their confidence intervals, intended use, limitations and
the medical disclaimer. Every fact comes from a file the pipeline wrote; a missing one is an error.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from medtune.console import MedtuneError
from medtune.io import read_json, write_text_atomic
from medtune.params import CardParams, FormatParams

log = logging.getLogger("medtune.card")
DISCLAIMER = ("Not medical advice. This model is a research artifact fine-tuned on consumer-health questions; its "
              "answers can be wrong, outdated or incomplete. Do not use it to diagnose, treat or make decisions about "
              "anyone's health: consult a qualified clinician.")
METRICS = (("rougeL", "ROUGE-L F1"), ("rouge1", "ROUGE-1 F1"), ("rouge2", "ROUGE-2 F1"), ("token_f1", "token F1"))
OPTIONAL_METRICS = (("mcq_accuracy", "MCQ accuracy", "mcq_correct"), ("bertscore_f1", "BERTScore F1", "bertscore_f1"),
                    ("entity_f1", "medical entity F1", "entity_f1"))
RATES = (("runaway_rate", "answers hitting the token limit"), ("repetition_rate", "repetitive answers"),
         ("disclaimer_rate", "answers with the disclaimer"), ("referral_rate", "answers referring to a clinician"))
DATA_FIELDS = ("Source", "Citation", "License", "Changes made", "Known issues")  # bullets read from the data card; Source, License required


def base_of(identity: dict, cp: CardParams) -> tuple[str | None, str | None]:
    """(hub id, license) of the base model named by a run_config's `base_model`; None where params do not say."""
    base = identity.get("base", "")
    hub = base if identity.get("kind") == "hub" else cp.hub_ids.get(base)
    return hub, cp.licenses.get(hub) if hub else None


@dataclasses.dataclass(frozen=True)
class CardInputs:
    """Files a card is built from, besides the model folder itself."""
    params: CardParams
    fmt: FormatParams
    eval_base: Path
    eval_tuned: Path
    data_card: Path


def data_facts(path: Path) -> dict[str, str]:
    """The `- **Label:** text` bullets of a data card (a bullet may run over indented lines)."""
    if not path.exists():
        raise MedtuneError(f"{path}: data card not found")
    text = path.read_text(encoding="utf-8")
    facts = {}
    for m in re.finditer(r"^- \*\*([^*]+?):\*\*\s*(.*?)(?=^\S|\Z)", text, flags=re.MULTILINE | re.DOTALL):
        facts[m.group(1).strip()] = " ".join(m.group(2).split())
    missing = [f for f in ("Source", "License") if f not in facts]
    if missing:
        raise MedtuneError(f"{path}: no '- **{missing[0]}:** ...' line; the model card needs the data's source and license")
    return {k: facts[k] for k in DATA_FIELDS if k in facts}


def metric(d: dict, key: str, path: Path):
    if key not in d:
        raise MedtuneError(f"{path}: no {key!r} (run the evaluate stages)")
    return d[key]


def ci(v: list) -> str:
    return f"[{v[0]:.3f}, {v[1]:.3f}]"


def eval_table(inp: CardInputs) -> tuple[str, dict, dict]:
    base, tuned = read_json(inp.eval_base), read_json(inp.eval_tuned)
    lines = ["| metric | base model | fine-tuned | tuned − base (paired) |", "| --- | --- | --- | --- |"]
    for key, label in METRICS:
        b, t = metric(base, key, inp.eval_base), metric(tuned, key, inp.eval_tuned)
        lines.append(f"| {label} | {b:.3f} {ci(metric(base, key + '_ci', inp.eval_base))} "
                     f"| {t:.3f} {ci(metric(tuned, key + '_ci', inp.eval_tuned))} "
                     f"| {metric(tuned, 'delta_' + key, inp.eval_tuned):+.3f} {ci(metric(tuned, f'delta_{key}_ci', inp.eval_tuned))} |")
    for key, label, delta in OPTIONAL_METRICS:  # present only for some data (MCQ) or settings (BERTScore, --lexicon)
        if base.get(key) is not None and tuned.get(key) is not None:  # entity F1: None if no reference names one
            d = f"{tuned[f'delta_{delta}']:+.3f} {ci(tuned[f'delta_{delta}_ci'])}" if f"delta_{delta}" in tuned else ""
            lines.append(f"| {label} | {base[key]:.3f} {ci(base[key + '_ci'])} | {tuned[key]:.3f} {ci(tuned[key + '_ci'])} | {d} |")
    for key, label in RATES:
        if key in ("runaway_rate", "repetition_rate") or (key in base and key in tuned):
            lines.append(f"| {label} | {metric(base, key, inp.eval_base):.1%} | {metric(tuned, key, inp.eval_tuned):.1%} | |")
    return "\n".join(lines), base, tuned


def check_card_inputs(inp: CardInputs) -> None:
    """Fail early, before expensive work, if the metrics or the data card lack what a card needs."""
    eval_table(inp)
    data_facts(inp.data_card)


def model_card(model_dir: Path, kind: str, inp: CardInputs) -> str:
    """The card text for `model_dir`, an adapter folder (kind "adapter") or a merged model (kind "merged")."""
    rc_path = model_dir / "run_config.json"
    rc = read_json(rc_path)
    params, identity = metric(rc, "params", rc_path), metric(rc, "base_model", rc_path)
    hub, license_id = base_of(identity, inp.params)
    base_name = hub or identity.get("base", "?")
    table, _, tuned_m = eval_table(inp)
    facts = data_facts(inp.data_card)
    train = params.get("train", {})
    n = metric(tuned_m, "n", inp.eval_tuned)
    # the card's metadata as the Hub reads it: ModelCardData, with the evaluation as model-index results
    card_data = ModelCardData(
        license=license_id or "other", language=[inp.params.language], pipeline_tag="text-generation",
        library_name="peft" if kind == "adapter" else "transformers", base_model=hub,
        tags=["medtune", "medical", "question-answering", "lora"] + (["peft"] if kind == "adapter" else ["merged"]),
        model_name=f"{base_name} medtune {kind}",
        eval_results=[EvalResult(task_type="text-generation", task_name="Medical question answering",
                                 dataset_type="medtune-test-split", dataset_name=f"held-out test questions (n = {n})",
                                 dataset_split="test", metric_type=key, metric_name=label,
                                 metric_value=metric(tuned_m, key, inp.eval_tuned)) for key, label in METRICS])
    license_line = (f"License: `{license_id}`, the base model's, which these weights inherit." if license_id else
                    f"License: not recorded for `{base_name}` in params.yaml `card.licenses`: check the base model's "
                    "license before sharing these weights.")
    what = (f"A LoRA adapter (rank {train.get('lora_r')}, alpha {train.get('lora_alpha')}, modules "
            f"{', '.join(train.get('target_modules', []))}) for `{base_name}`; load it on that base model with peft."
            if kind == "adapter" else
            f"`{base_name}` with the LoRA adapter merged into its weights ({rc.get('merge', {}).get('dtype', '?')}); loads "
            "with plain transformers. The merge stage checked that it reproduces base + adapter: max |logit "
            f"difference| {rc.get('merge_check', {}).get('max_abs_logit_diff', '?')}, greedy answers identical: "
            f"{rc.get('merge_check', {}).get('greedy_answers_identical', '?')}.")
    ident = ", ".join(f"{k}: `{v}`" for k, v in sorted(identity.items()))
    template = params.get("model", {}).get("chat_template", "?")
    system = repr(inp.fmt.system_prompt) if inp.fmt.system_prompt else "none"
    data = "\n".join(f"- **{k}:** {v}" for k, v in facts.items())
    params_yaml = yaml.safe_dump(params | {"format": inp.fmt.model_dump()}, sort_keys=True).strip()
    versions = ", ".join(f"{k} {v}" for k, v in sorted(rc.get("versions", {}).items()))
    return ModelCard(f"""---
{card_data.to_yaml()}
---

# {base_name} fine-tuned for medical question answering ({kind})

> **Medical disclaimer.** {DISCLAIMER}

Made with medtune (LoRA fine-tuning, DVC-tracked pipeline). {what}

## Base model

{ident}. {license_line}

Prompt format: `{inp.fmt.template}` layout with chat template `{template}`, system prompt {system}. Prompt the
model the same way (medtune's `chat`, `ui` and `serve` commands do).

## Training data

{data}

## Training params

```yaml
{params_yaml}
```

Trained on {rc.get('device', '?')} with {versions}.

## Evaluation

Held-out test questions (n = {n}), greedy decoding, scored against the reference answers; 95% bootstrap
confidence intervals in brackets, the delta paired per question.

{table}

## Intended use

Research on fine-tuning methods for medical question answering: comparing base models, data and
hyperparameters, and demonstrating the pipeline. Answers are for reading by people who can judge them.

## Limitations

- Not medical advice, not a medical device, not validated clinically; answers can be wrong or harmful.
- Small model, short training run: fluent-sounding answers can be factually wrong; lexical overlap
  metrics (ROUGE, token F1) do not measure correctness or safety.
- {metric(tuned_m, 'runaway_rate', inp.eval_tuned):.0%} of the test answers ran to the token limit without ending.
- Limited to the language ({inp.params.language}), topics and question types of the training data, and to
  what that data knew when it was written; see its known issues above.
""").content


def write_model_card(model_dir: Path, kind: str, inp: CardInputs, out: Path | None = None) -> Path:
    out = out or model_dir / "README.md"
    write_text_atomic(out, model_card(model_dir, kind, inp))
    return out

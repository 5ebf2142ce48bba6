"""Export the merged model for llama.cpp and Ollama: one GGUF file per `export.types` entry and an Ollama Modelfile,
each file proven by the parity check (medtune/llamacpp.py): loaded back through transformers' own GGUF loader, it
must tokenize the test prompts the same, give logits within `export.types[type]` of the merged model's, name the same
stop tokens and, for the float types, give the same greedy answers. The stage fails, and writes nothing, if a file
does not pass. With `export.enabled: false` (the default) it writes only a note and metrics saying why.

DVC stage `export`. Run by hand:
    python -m medtune.stages.export --merged models/merged --data data/formatted --out models/gguf --metrics metrics/export.json
Reads params `model`, `export`, `format`. Writes models/gguf/model-<type>.gguf and models/gguf/Modelfile.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import click

from medtune import params
from medtune.console import MedtuneError, cli_errors, log_params, setup_logging
from medtune.io import atomic_dir, read_jsonl, write_json
from medtune.llamacpp import (
    arch_of,
    check_gguf,
    reference,
    tensor_values,
    vocab_of,
    write_gguf,
)
from medtune.models import load_model, load_tokenizer, stop_token_ids
from medtune.ollama import modelfile
from medtune.params import ExportParams, FormatParams, ModelParams

log = logging.getLogger("medtune.export")
SKIPPED = ("export.enabled is false: no GGUF export in this run (on a CPU it takes minutes, docs/export.md); "
           "for the run you ship: dvc exp run -S export.enabled=true")


def card_facts(merged: Path) -> dict:
    """The model card's essentials, for the GGUF metadata: name, license, base model, tags, language, scores."""
    from huggingface_hub import ModelCard

    from medtune.cards import DISCLAIMER

    readme = merged / "README.md"
    if not readme.exists():
        raise MedtuneError(f"{readme}: no model card (the merge stage writes it)")
    data = ModelCard.load(readme).data
    scores = ", ".join(f"{r.metric_name} {r.metric_value:.3f}" for r in data.eval_results or [])
    name = data.model_name or f"{data.base_model} medtune merged"
    return {"name": name, "license": data.license or "other", "base_model": data.base_model,
            "tags": list(data.tags or []) + ["gguf"], "languages": list(data.language or []),
            "description": f"{name}, fine-tuned for medical question answering with medtune"
                           + (f"; held-out test questions: {scores}" if scores else "") + f". {DISCLAIMER}"}


def run(p: ExportParams, m: ModelParams, fmt: FormatParams, merged: Path, data_dir: Path, out_dir: Path,
        transform=tensor_values) -> dict:
    """Write and check every type into `out_dir` (atomically); the metrics. `transform`: see llamacpp.write_gguf."""
    if not p.enabled:
        with atomic_dir(out_dir) as tmp:
            (tmp / "README.md").write_text(f"No GGUF in this run. {SKIPPED}.\n")
        return {"enabled": False, "skipped": SKIPPED}
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(merged)
    arch_of(config)  # an architecture it cannot write fails here, before anything is loaded
    card = card_facts(merged)
    tok = load_tokenizer(merged, m)
    model = load_model(merged, m.model_copy(update={"trust_remote_code": False}), "float32").eval()
    stops = stop_token_ids(tok, model)
    prompts = [r["prompt"] for r in sorted(read_jsonl(data_dir / "test.jsonl"), key=lambda r: str(r["id"]))[: p.check_prompts]]
    ref = reference(model, tok, prompts, p.check_new_tokens)
    vocab = vocab_of(tok, config)
    metrics: dict = {"enabled": True, "prompts": len(prompts), "modelfile_from": f"model-{next(iter(p.types))}.gguf"}
    ollama = modelfile(tok, fmt, stops, metrics["modelfile_from"], card)  # a layout it cannot template fails here
    with atomic_dir(out_dir) as tmp:
        for qtype, atol in p.types.items():
            path = tmp / f"model-{qtype}.gguf"
            t0 = time.perf_counter()
            info = write_gguf(merged, config, tok, path, qtype, stops, card, vocab, transform)
            t1 = time.perf_counter()
            check = check_gguf(path, qtype, ref, prompts, p.check_new_tokens, atol, str(model.device))
            metrics[qtype] = check | {"bytes": path.stat().st_size, "write_s": round(t1 - t0, 1),
                                      "check_s": round(time.perf_counter() - t1, 1)}
            log.info("%s: %s", path.name, metrics[qtype])
            if not check["passed"]:
                raise MedtuneError(f"export check failed for {qtype}: max |logit diff| {check['max_abs_logit_diff']} "
                                   f"(atol {check['atol']}), tokens identical: {check['tokens_identical']}, stop tokens "
                                   f"{check['stop_token_ids']} (merged model: {ref['stops']}), greedy answers identical: "
                                   f"{check['greedy_answers_identical']}; no GGUF was written")
        (tmp / "Modelfile").write_text(ollama)
        metrics |= info | {"passed": True, "stop_tokens": tok.convert_ids_to_tokens(stops)}
    return metrics


@click.command()
@click.option("--merged", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--metrics", "metrics_file", required=True, type=click.Path(dir_okay=False, path_type=Path))
def main(merged: Path, data_dir: Path, out_dir: Path, metrics_file: Path) -> None:
    started = time.perf_counter()  # the stage's wall time, recorded in its metrics
    setup_logging()
    with cli_errors():
        m, p, fmt = params.load("model", "export", "format")
        log_params("export", ("export", p))
        metrics = run(p, m, fmt, merged, data_dir, out_dir) | {"wall_s": round(time.perf_counter() - started, 1)}
        write_json(metrics_file, metrics)
    log.info("exported: %s", metrics)


if __name__ == "__main__":
    main()

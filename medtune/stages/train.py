"""Fine-tune a LoRA adapter on the formatted train split with trl's SFTTrainer; loss on answer tokens only
(medtune/training.py).

DVC stage `train`.  Run by hand:
    python -m medtune.stages.train --data data/formatted --out models/adapter --metrics metrics/train.json \
        --curves metrics/train_curves --checkpoints models/checkpoints --lineage metrics/lineage.json
Reads params `base`, `model`, `train`. Writes the adapter (safetensors + tokenizer + run_config.json), the
training metrics, loss curves (dvclive TSV + PNG). Checkpoints go to --checkpoints, which DVC does not
track: re-running after an interruption resumes from the last one if the params and data are unchanged.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import click

from medtune import params
from medtune.console import cli_errors, log_params, setup_logging
from medtune.curves import plot_loss, write_curves
from medtune.io import atomic_dir, write_json
from medtune.models import device_kind, lineage, versions
from medtune.params import BaseParams, ModelParams, TrainParams
from medtune.training import fit

log = logging.getLogger("medtune.train")


def run(p: TrainParams, m: ModelParams, base: BaseParams, data_dir: Path, out_dir: Path, curves_dir: Path, ckpt_dir: Path,
        callbacks: tuple = (), started: float | None = None) -> dict:
    """`started`: when the stage began (time.perf_counter), so that its wall time and tokens/s cover everything a
    user waits for: imports, loading, checks, training, evaluation, saving."""
    started = time.perf_counter() if started is None else started
    f = fit(p, m, base.seed, data_dir, ckpt_dir, callbacks)
    if not f.main_process:
        return f.metrics
    with atomic_dir(curves_dir) as tmp:  # the whole run's curves, a resumed one's too
        write_curves(f.history, tmp)
        plot_loss(f.history, tmp / "loss.png")
        write_json(tmp / "log_history.json", f.history)
    model = f.trainer.accelerator.unwrap_model(f.trainer.model)
    for config in model.peft_config.values():  # the base as params name it, not the folder it was loaded from here
        config.base_model_name_or_path = m.base
        if isinstance(config.target_modules, set):  # peft's set would be written in a different order each run
            config.target_modules = sorted(config.target_modules)
    with atomic_dir(out_dir) as tmp:
        # peft keeps only the adapter's weights of a gathered FSDP state dict
        model.save_pretrained(tmp, safe_serialization=True, state_dict=f.adapter_state)
        f.tok.save_pretrained(tmp)
        # what made the adapter, and nothing that differs from run to run (timings go to the metrics file), so
        # that the same inputs and params give the same bytes
        write_json(tmp / "run_config.json", {
            "params": {"base": base.model_dump(), "model": m.model_dump(), "train": p.model_dump()},
            "base_model": f.identity,
            "versions": versions(),
            "device": device_kind(),
        })
    log.info("saved adapter to %s", out_dir)
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # finished: the next run of this stage starts fresh
    wall = time.perf_counter() - started  # this process's; a resumed run adds the training time before the resume
    return f.metrics | {"wall_s": round(wall, 1),
                        "tokens_per_s": round(f.metrics["tokens_trained"] / (wall + f.metrics["train_s_before_resume"]), 1),
                        "lineage": lineage(m, f.identity, f.tok)}


@click.command()
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--metrics", "metrics_file", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--curves", "curves_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--checkpoints", "ckpt_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--lineage", "lineage_file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="small JSON of what produced the adapter, for `dvc exp show`")
def main(data_dir: Path, out_dir: Path, metrics_file: Path, curves_dir: Path, ckpt_dir: Path, lineage_file: Path) -> None:
    started = time.perf_counter()  # the stage's wall time, recorded in its metrics
    setup_logging()
    with cli_errors(persist=True):  # dvc.yaml: persist
        base, m, p = params.load("base", "model", "train")
        log_params("train", ("base", base), ("model", m), ("train", p))
        metrics = run(p, m, base, data_dir, out_dir, curves_dir, ckpt_dir, started=started)
        from accelerate import PartialState

        if PartialState().is_main_process:  # the state run() set up
            write_json(lineage_file, metrics.pop("lineage"))
            write_json(metrics_file, metrics)
    log.info("trained: %s", metrics)


if __name__ == "__main__":
    main()

"""What users wait for, measured end to end: the README's GPU command (`dvc exp run` with recipes/gpu.yaml on the
full MedQuAD pool) from start to the merged model and every metric written; then, in the same call, the plain trl
script (benchmarks/plain_trl.py: trl's defaults plus the LoRA config) on the same formatted rows, with and
without gradient checkpointing; then the first experiment's params with `-S export.enabled=true` (the run you
ship: only the export stage runs); then a second experiment (another learning rate), to show the warm cost.

    python benchmarks/experiment_time.py --repo /tmp/work --model /tmp/models/gemma-3-270m --out $OUT/exp

Writes experiment_time.json and experiment_time.md to --out (copy them to benchmarks/results/<gpu>/).
Run from a clone of the repository in which the experiments may be committed (`dvc exp run` needs a commit).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's package, also where not installed
from medtune.summary import STAGE_METRICS as STAGES

# STAGES: each stage and its metrics file in metrics/, the one mapping `medtune summary` uses too


def sh(cmd: list[str], cwd: Path, log: Path) -> tuple[float, str]:
    """Run a command, its output appended to `log`; (its wall time, its output). Fails loudly."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=os.environ | {"PYTHONUNBUFFERED": "1"})
    with log.open("a") as f:
        f.write(f"\n$ {shlex.join(cmd)}\n{proc.stdout}")
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed ({proc.returncode}); see {log}")
    return time.perf_counter() - t0, proc.stdout


def metrics(repo: Path, name: str) -> dict:
    path = repo / "metrics" / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def details(repo: Path, which: str) -> dict:
    """The evaluate stage's full metrics (confidence intervals and all), beside its headline file in metrics/."""
    path = repo / "eval" / which / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else {}


def experiment(repo: Path, name: str, flags: list[str], log: Path) -> dict:
    wall, output = sh([sys.executable, "-m", "dvc", "exp", "run", "-n", name, *flags], repo, log)
    ran = [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]
    # a stage DVC did not run (unchanged, or restored from its run cache) has no wall time in this experiment
    stage_wall = {stage: metrics(repo, f).get("wall_s") if stage in ran else None for stage, f in STAGES.items()}
    train, tuned, merge = metrics(repo, "train"), details(repo, "tuned"), metrics(repo, "merge")
    return {"name": name, "exp_run_wall_s": round(wall, 1), "stage_wall_s": stage_wall, "stages_run": ran,
            "train_real_tokens": train.get("tokens_trained"), "train_wall_s": train.get("wall_s"),
            "train_tokens_per_s": train.get("tokens_per_s"), "train_steps": train.get("steps"),
            "rougeL": tuned.get("rougeL"), "base_rougeL": details(repo, "base").get("rougeL"),
            "delta_rougeL": tuned.get("delta_rougeL"), "delta_rougeL_ci": tuned.get("delta_rougeL_ci"),
            "runaway_rate": tuned.get("runaway_rate"), "n_test": tuned.get("n"), "merge_passed": merge.get("passed"),
            "export": metrics(repo, "export") if "export" in ran else None}


def plain(repo: Path, model: str, out: Path, gc: bool, log: Path) -> dict:
    result = out / f"plain_trl_{'gc' if gc else 'nogc'}.json"
    sh([sys.executable, str(Path(__file__).parent / "plain_trl.py"), "--model", model, "--data", "data/formatted/train.jsonl",
        "--out", f"/tmp/plain-{'gc' if gc else 'nogc'}", "--result", str(result),
        "--gradient-checkpointing" if gc else "--no-gradient-checkpointing"], repo, log)
    return json.loads(result.read_text())


@click.command()
@click.option("--repo", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--model", required=True, help="the local model folder for model.base (the default model, converted)")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--recipe", default="recipes/gpu.yaml", show_default=True)
@click.option("--second", default="train.learning_rate=3.0e-4", show_default=True, help="the second experiment's -S")
@click.option("--skip-plain", is_flag=True)
def main(repo: Path, model: str, out: Path, recipe: str, second: str, skip_plain: bool) -> None:
    import torch

    sys.path.insert(0, str(repo))
    from medtune.models import local_revision
    from medtune.recipes import overrides

    out.mkdir(parents=True, exist_ok=True)
    log = out / "experiment_time.log"
    revision = local_revision(Path(model))  # a local base folder is pinned by its weights' hash
    flags = overrides(repo / recipe, repo / "params.yaml") + ["-S", f"model.base={model}", "-S", f"model.revision={revision}"]
    result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "command": f"dvc exp run -n gpu $(medtune recipe {recipe}) -S model.base=<local gemma-3-270m> -S model.revision=<its hash>"}
    result["first"] = first = experiment(repo, "gpu", flags, log)
    (out / "experiment_time.json").write_text(json.dumps(result, indent=2) + "\n")  # each result as it comes
    if not skip_plain:
        for gc in (True, False):
            result["plain_trl_gc" if gc else "plain_trl_nogc"] = plain(repo, model, out, gc, log)
            (out / "experiment_time.json").write_text(json.dumps(result, indent=2) + "\n")
    # the run you ship: the first experiment's params, still in the workspace, with the GGUF export on; every
    # other stage is up to date, so only export runs
    result["export_run"] = experiment(repo, "gpu-export", flags + ["-S", "export.enabled=true"], log)
    (out / "experiment_time.json").write_text(json.dumps(result, indent=2) + "\n")
    result["second"] = experiment(repo, "gpu-2", flags + ["-S", second], log)
    p = result.get("plain_trl_gc", {})
    result |= {"exp_run_wall_s": first["exp_run_wall_s"], "stage_wall_s": first["stage_wall_s"],
               "train_real_tokens": first["train_real_tokens"], "train_wall_s": first["train_wall_s"],
               "train_tokens_per_s": first["train_tokens_per_s"], "plain_trl_real_tokens": p.get("real_tokens"),
               "plain_trl_wall_s": p.get("wall_s"), "plain_trl_tokens_per_s": p.get("tokens_per_s"),
               "rougeL": first["rougeL"], "runaway_rate": first["runaway_rate"], "merge_passed": first["merge_passed"]}
    if p:
        result["ratio_vs_plain_trl"] = round(first["train_tokens_per_s"] / p["tokens_per_s"], 2)
    if result.get("plain_trl_nogc"):
        result["ratio_vs_plain_trl_no_gradient_checkpointing"] = round(
            first["train_tokens_per_s"] / result["plain_trl_nogc"]["tokens_per_s"], 2)
    (out / "experiment_time.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "experiment_time.md").write_text(markdown(result))
    click.echo(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}, indent=2))


def markdown(r: dict) -> str:
    first, second = r["first"], r["second"]
    def cell(e: dict, s: str) -> str:
        return "cached" if e["stage_wall_s"].get(s) is None else str(e["stage_wall_s"][s])

    rows = "\n".join(f"| {s} | {cell(first, s)} | {cell(second, s)} |" for s in STAGES)
    plain = ""
    for key, label in (("plain_trl_gc", "plain trl script, trl defaults (gradient checkpointing on)"),
                       ("plain_trl_nogc", "the same with gradient checkpointing off")):
        if key in r:
            p = r[key]
            plain += (f"| {label} | {p['real_tokens']:,} | {p['wall_s']} | {p['tokens_per_s']:,.0f} | "
                      f"{first['train_tokens_per_s'] / p['tokens_per_s']:.2f}x |\n")
    return f"""# The README's GPU command, end to end, on {r['device']}

`{r['command']}` on the full MedQuAD pool, measured by `benchmarks/experiment_time.py` in one device call,
then the plain trl script (`benchmarks/plain_trl.py`) on the same formatted rows, then a second experiment.

| | first experiment | second experiment ({second['name']}) |
| --- | ---: | ---: |
| `dvc exp run` wall, s | **{first['exp_run_wall_s']}** | **{second['exp_run_wall_s']}** |
{rows}

Train stage: {first['train_real_tokens']:,} real tokens in {first['train_wall_s']} s (model load to adapter saved):
**{first['train_tokens_per_s']:,.0f} tokens/s**, {first['train_steps']} steps.

| training run (one epoch, same rows) | real tokens | wall s | tokens/s | medtune's train stage vs it |
| --- | ---: | ---: | ---: | ---: |
| medtune train stage | {first['train_real_tokens']:,} | {first['train_wall_s']} | {first['train_tokens_per_s']:,.0f} | |
{plain}
Quality (test split of the run, n = {first['n_test']}, greedy): ROUGE-L base {first['base_rougeL']} -> tuned
{first['rougeL']} (delta {first['delta_rougeL']} {first['delta_rougeL_ci']}), runaway {first['runaway_rate']},
merge check passed: {first['merge_passed']}. Second experiment: ROUGE-L {second['rougeL']}, runaway
{second['runaway_rate']}.
{export_section(r.get("export_run"))}"""


def export_section(e: dict | None) -> str:
    if not e or not e.get("export"):
        return ""
    x = e["export"]
    rows = "\n".join(f"| {t} | {x[t]['bytes']:,} | {x[t]['write_s']} | {x[t]['check_s']} | {x[t]['max_abs_logit_diff']} | "
                     f"{x[t]['passed']} |" for t in x if isinstance(x[t], dict) and "bytes" in x[t])
    return f"""
## The run you ship: `-S export.enabled=true` on the first experiment's params

`dvc exp run` wall {e['exp_run_wall_s']} s (stages run: {', '.join(e['stages_run'])}); export stage wall
{x.get('wall_s')} s, parity check passed: {x.get('passed')}.

| type | bytes | write s | check s | max abs logit diff | passed |
| --- | ---: | ---: | ---: | ---: | --- |
{rows}
"""


if __name__ == "__main__":
    main()

"""Experiments as the README runs them: a queued sweep (`dvc exp run --queue` with a grid, then
`dvc exp run --run-all`) on the tiny model, compared by `medtune compare` on the real
`dvc exp show --json` output; and the reference recipes in recipes/: each validates against params.yaml, and a
CPU-sized version of each runs through the data stages and two training steps.
"""

from __future__ import annotations

import csv
import importlib
import json
import math
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from medtune import experiments
from medtune.io import read_jsonl
from medtune.models import local_revision
from medtune.tools import compare, validate
from medtune.tools import recipe as recipe_cli
from tests.conftest import ASSETS, REPO, tiny_params
from tests.helpers import dvc


def exp_runs(shown: list) -> dict[str, dict]:
    """name -> data of every experiment in `dvc exp show --json`."""
    return {e["name"]: e["data"] for c in shown for g in c.get("experiments") or [] for e in g["revs"]}


def test_queued_sweep_with_seeds_compared(repo_copy):
    # two ranks (a grid: one queued experiment each), and rank 8 again with a second seed
    out = dvc(repo_copy, "exp", "run", "--queue", "-S", "train.lora_r=4,8")
    assert out.count("Queued experiment") == 2
    dvc(repo_copy, "exp", "run", "--queue", "-S", "train.lora_r=8", "-S", "base.seed=7", "-n", "r8-seed7")
    dvc(repo_copy, "exp", "run", "--run-all")
    assert "Success" in dvc(repo_copy, "queue", "status") and "Failed" not in dvc(repo_copy, "queue", "status")
    runs = exp_runs(json.loads(dvc(repo_copy, "exp", "show", "--json")))
    assert len(runs) == 3
    by_config = {(d["params"]["params.yaml"]["data"]["train"]["lora_r"], d["params"]["params.yaml"]["data"]["base"]["seed"]): n
                 for n, d in runs.items()}
    assert set(by_config) == {(4, 42), (8, 42), (8, 7)}

    proc = subprocess.run([sys.executable, "-m", "medtune.tools.compare", "--out", "reports/compare"], cwd=repo_copy,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "compared 3 runs in 2 rows (skipped: {'no eval/base/metrics.json': 2})" in proc.stderr  # HEAD, workspace: not run
    out_dir = repo_copy / "reports" / "compare"
    rows = {r["changed_params"]: r for r in csv.DictReader((out_dir / "compare.csv").open())}
    assert set(rows) == {"train.lora_r=4", "train.lora_r=8"}

    r4, r8 = rows["train.lora_r=4"], rows["train.lora_r=8"]
    m4 = runs[by_config[(4, 42)]]["metrics"]
    assert float(r4["tuned"]) == m4["metrics/eval_tuned.json"]["data"]["rougeL"]
    assert float(r4["base"]) == m4["metrics/eval_base.json"]["data"]["rougeL"]
    assert float(r4["delta"]) == m4["metrics/eval_tuned.json"]["data"]["delta_rougeL"]
    assert float(r4["tokens_per_s"]) == m4["metrics/train.json"]["data"]["tokens_per_s"]
    # the CIs are not in `dvc exp show` (it drops lists): compare read them from the experiment's commit
    lo, hi = float(r4["delta_ci_low"]), float(r4["delta_ci_high"])
    assert lo <= float(r4["delta"]) <= hi and r4["delta_std"] == ""
    assert r4["within_noise"] == str(lo <= 0 <= hi) and r4["seeds"] == "42"

    # rank 8 ran with two seeds: one row, mean ± std, no single-run CI
    assert sorted(r8["seeds"].split()) == ["42", "7"] and r8["delta_ci_low"] == "" and r8["delta_std"] != ""
    tuned8 = [runs[by_config[(8, s)]]["metrics"]["metrics/eval_tuned.json"]["data"]["rougeL"] for s in (42, 7)]
    assert float(r8["tuned"]) == pytest.approx(sum(tuned8) / 2, abs=1e-4)
    assert [r4["best"], r8["best"]].count("True") == 1
    assert (float(r4["tuned"]) >= float(r8["tuned"])) == (r4["best"] == "True")

    md = (out_dir / "compare.md").read_text()
    assert "| train.lora_r=8 | 42, 7 |" in md.replace(" ★", "").replace(" (tied)", "") or "| train.lora_r=8 | 7, 42 |" in md
    assert " ± " in md and "★" in md
    assert (out_dir / "deltas.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # against one named run (a plain baseline, say): question-by-question differences of the tuned scores
    ref = by_config[(4, 42)]
    cmd = [sys.executable, "-m", "medtune.tools.compare", "--out", "reports/vs", "--reference", ref]
    proc = subprocess.run(cmd, cwd=repo_copy, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    vs = {r["changed_params"]: r for r in csv.DictReader((repo_copy / "reports/vs/compare.csv").open())}
    assert (vs["train.lora_r=4"]["vs_reference"], vs["train.lora_r=4"]["vs_reference_ci_low"]) == ("0.0", "0.0")
    # rank 8: seed 42 has the same test questions; seed 7 split differently, so it is left out of the pairing
    tuned8_42 = runs[by_config[(8, 42)]]["metrics"]["metrics/eval_tuned.json"]["data"]["rougeL"]
    assert float(vs["train.lora_r=8"]["vs_reference"]) == pytest.approx(tuned8_42 - float(r4["tuned"]), abs=2e-4)
    assert "answered other test questions" in proc.stderr
    assert f"| vs {ref} |" in (repo_copy / "reports/vs/compare.md").read_text()
    proc = subprocess.run(cmd[:-1] + ["no-such-run"], cwd=repo_copy, capture_output=True, text=True)
    assert proc.returncode != 0 and "--reference no-such-run: no finished run of that name" in proc.stderr


def write_params(path: Path, **sections) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params.update(sections)
    path.write_text(yaml.safe_dump(params))


def git_dvc_repo(tmp_path, monkeypatch) -> None:
    """A git + DVC repository in tmp_path (the working directory), with the project's params and pipeline."""
    monkeypatch.chdir(tmp_path)
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.com"], ["git", "config", "user.name", "t"],
                ["dvc", "init", "-q"]):
        subprocess.run(cmd, check=True)
    write_params(tmp_path / "params.yaml")
    (tmp_path / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())


def commit_run(name: str, files: dict[str, object], params: dict | None = None) -> str:
    """Write a run's files (JSON, or JSON lines for a list), commit them as DVC commits a run; its sha."""
    if params is not None:
        write_params(Path("params.yaml"), **params)
    for path, data in files.items():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text("".join(json.dumps(r) + "\n" for r in data) if isinstance(data, list) else json.dumps(data))
    subprocess.run(["git", "add", "-A"], check=True)
    subprocess.run(["git", "commit", "-qm", name], check=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()


def shown(monkeypatch, rows: list[dict]) -> None:
    """`dvc exp show`'s rows (dvc.api.exp_show's shape) for runs committed by commit_run."""
    monkeypatch.setattr(experiments, "exp_rows", lambda repo: [{"Experiment": None, "State": None} | r for r in rows])


def test_compare_errors_name_what_is_missing(tmp_path, monkeypatch):
    git_dvc_repo(tmp_path, monkeypatch)
    rev = commit_run("no metrics", {"metrics/train.json": {"tokens_per_s": 1.0, "peak_memory_mb": 1.0}})
    shown(monkeypatch, [{"rev": "workspace"}, {"rev": rev, "Experiment": "bare"}, {"rev": "f" * 40, "State": "Failed"}])
    result = CliRunner().invoke(compare.main, ["--out", "out"])
    assert result.exit_code == 1 and "no finished run with evaluation metrics" in result.output
    assert not (tmp_path / "out").exists()  # nothing half-written
    result = CliRunner().invoke(compare.main, ["--out", "out", "--metric", "rougeLsum"])
    assert result.exit_code == 2 and "'rougeLsum' is not one of 'rouge1', 'rouge2', 'rougeL', 'token_f1'" in result.output
    commit_run("broken", {"eval/base/metrics.json": {"n": 1}, "eval/tuned/metrics.json": "{", "metrics/train.json": {}})
    Path("eval/tuned/metrics.json").write_text("{")
    shown(monkeypatch, [{"rev": "workspace"}])
    result = CliRunner().invoke(compare.main, ["--out", "out"])
    assert result.exit_code == 1 and "eval/tuned/metrics.json of run workspace" in result.output and "malformed" in result.output


# ---------------------------------------------------------------- recipes

RECIPES = ["alpaca_llama31_8b", "medquad_llama32_1b", "medmcqa_llama31_8b", "chatdoctor_llama3_8b_qlora", "mixed_gemma3_1b"]
# The CPU-sized version of a recipe: the tiny model (a word-level tokenizer without a chat template of its own,
# so the gemma3 template file where a recipe names the tokenizer's), and what needs a CUDA GPU or hours swapped
# for its CPU equivalent.
CPU_SIZED = {
    "train": {"quantization": "none", "optim": "adamw_torch", "max_steps": 2, "batch_size": 2, "grad_accum": 1,
              "auto_find_batch_size": False, "gradient_checkpointing": False, "eval_steps": 0, "save_steps": 0,
              "load_best_model": False, "logging_steps": 1},
    "split": {"val_frac": 0.3, "test_frac": 0.3},  # a dozen fixture rows: larger shares so each split gets some
}
# Each recipe's data swapped for the test fixture of the same dataset and columns, so the recipe's column mapping
# is what reads it. The hand-made MedMCQA fixture has the original release's 1-based `cop`; the hub copy is 0-based.
FIXTURES = {"data/source/genmedgpt5k.jsonl": ("chatdoctor_tiny.jsonl", {}),
            "data/source/medquad.jsonl": ("medquad_tiny.jsonl", {}),
            "data/source/pubmedqa_pqal.jsonl": ("pubmedqa_tiny.jsonl", {}),
            "hf:openlifescienceai/medmcqa": ("medmcqa_handmade.jsonl", {"answer_key": "index1"})}


def recipe(name: str) -> dict:
    return yaml.safe_load((REPO / "recipes" / f"{name}.yaml").read_text())


def apply(params: dict, overrides: dict) -> dict:
    """What medtune.tools.recipe does: each value replaces the params.yaml value (mappings too)."""
    for section, values in overrides.items():
        params[section].update(values)
    return params


def test_every_recipe_validates_and_dvc_applies_it_exactly(repo_copy):
    """`medtune.tools.recipe` checks each recipe against the params schema and prints `-S` flags; queued with them
    (as the README's eval line does), DVC's experiment has exactly the recipe's values."""
    for name in RECIPES:
        result = CliRunner().invoke(recipe_cli.main, [str(REPO / "recipes" / f"{name}.yaml")])
        assert result.exit_code == 0, f"{name}: {result.output}"  # validated against the repository's params.yaml
        proc = subprocess.run([sys.executable, "-m", "medtune.tools.recipe", str(REPO / "recipes" / f"{name}.yaml")],
                              cwd=repo_copy, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        dvc(repo_copy, "exp", "run", "--queue", "-n", name, *shlex.split(proc.stdout))
    queued = exp_runs(json.loads(dvc(repo_copy, "exp", "show", "--json")))
    for name in RECIPES:
        got = queued[name]["params"]["params.yaml"]["data"]
        for section, values in recipe(name).items():
            for key, value in values.items():
                assert got[section][key] == value, f"{name}: {section}.{key} = {got[section][key]!r}, recipe {value!r}"


def test_a_recipe_applies_to_the_committed_params_not_what_a_failed_experiment_left(repo_copy):
    """A failed `dvc exp run -S ...` leaves its values in params.yaml; the recipe's flags set every key it does not
    name back to the committed value, and say so."""
    committed = yaml.safe_load((repo_copy / "params.yaml").read_text())
    dirty = yaml.safe_load((repo_copy / "params.yaml").read_text())
    dirty["train"]["lora_r"] = committed["train"]["lora_r"] * 2 + 2  # left over, not in the recipe
    dirty["train"]["learning_rate"] = 0.5  # left over, and set by the recipe
    dirty["format"]["disclaimer"]["enabled"] = not committed["format"]["disclaimer"]["enabled"]  # a mapping
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(dirty, sort_keys=False))
    proc = subprocess.run([sys.executable, "-m", "medtune.tools.recipe", str(REPO / "recipes" / "gpu.yaml")],
                          cwd=repo_copy, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "differs from the last commit in format.disclaimer, train.learning_rate, train.lora_r" in proc.stderr
    dvc(repo_copy, "exp", "run", "--queue", "-n", "after-failure", *shlex.split(proc.stdout))
    got = exp_runs(json.loads(dvc(repo_copy, "exp", "show", "--json")))["after-failure"]["params"]["params.yaml"]["data"]
    assert got["train"]["lora_r"] == committed["train"]["lora_r"]
    assert got["format"]["disclaimer"] == committed["format"]["disclaimer"]
    assert got["train"]["learning_rate"] == recipe("gpu")["train"]["learning_rate"]


@pytest.mark.parametrize("name", RECIPES)
def test_cpu_sized_recipe_runs_through_data_stages_and_two_train_steps(name, tiny_model, tmp_path, monkeypatch):
    r = recipe(name)
    p = apply(apply(tiny_params(tiny_model), r), CPU_SIZED)
    template = r["model"]["chat_template"]  # a template file as it is; the tokenizer's own: the tiny one has none
    p["model"].update(base=str(tiny_model), revision=local_revision(tiny_model), chat_template="gemma3" if template == "model" else template)
    for src in [p["fetch"], *p["fetch"]["mix"]]:
        fixture, extra = FIXTURES[src["source"]]
        src.update(source=f"data/source/{fixture}", revision=None, subset=None)
        (tmp_path / "data" / "source").mkdir(parents=True, exist_ok=True)
        shutil.copy(ASSETS / fixture, tmp_path / "data" / "source" / fixture)
        p["fetch"].update(extra)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    assert CliRunner().invoke(validate.main, []).output == "params.yaml: ok\n"
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for stage in ("fetch", "clean", "split", "format", "train"):  # the commands dvc.yaml runs, in this process
        _python, _m, module, *args = shlex.split(stages[stage]["cmd"])
        result = CliRunner().invoke(importlib.import_module(module).main, args)
        assert result.exit_code == 0, f"{stage}: {result.output}"

    train = json.loads(Path("metrics/train.json").read_text())
    assert train["steps"] == 2 and math.isfinite(train["train_loss"])
    lora = json.loads(Path("models/adapter/adapter_config.json").read_text())
    assert lora["r"] == r["train"]["lora_r"] and lora["lora_alpha"] == r["train"]["lora_alpha"]
    targets = r["train"]["target_modules"]
    if targets != ["all-linear"]:
        assert set(lora["target_modules"]) == set(targets)
    rows = [row for s in ("train", "val", "test") for row in read_jsonl(Path(f"data/formatted/{s}.jsonl"))]
    first = rows[0]
    template = r["format"]["template"]
    if template == "alpaca":
        assert "### Instruction:" in first["prompt"] and first["prompt"].rstrip().endswith("### Response:")
    if template == "qa":
        assert first["prompt"].startswith("### Question:") and first["prompt"].rstrip().endswith("### Answer:")
        assert "\nA. " in first["prompt"] and first["completion"].startswith("Answer: ")
    if r["format"].get("disclaimer", {}).get("enabled"):
        assert all(r["format"]["disclaimer"]["text"] in row["completion"] for row in rows)
    if "instruction" in r["fetch"].get("columns", {}):
        assert all("If you are a doctor" in row["prompt"] for row in rows)
    if r["fetch"].get("mix"):
        assert len({row["collection"] for row in rows}) == 1 + len(r["fetch"]["mix"])


def test_compare_groups_base_models_and_seeds(tmp_path, monkeypatch):
    """Two base models, a learning-rate pair on one and two seeds on the other, and a failed run, each run's
    metrics files committed (as DVC commits them) and listed as `dvc exp show` lists them."""
    git_dvc_repo(tmp_path, monkeypatch)

    def run(name, base, lr, seed, tuned, delta, delta_ci):
        params = {"base": {"seed": seed}, "model": {"base": base, "revision": "r1", "chat_template": "gemma3_base",
                                                    "trust_remote_code": False},
                  "train": yaml.safe_load((REPO / "params.yaml").read_text())["train"] | {"learning_rate": lr}}
        files = {"eval/base/metrics.json": {"n": 50, "rougeL": round(tuned - delta, 4), "rougeL_ci": [0.05, 0.15]},
                 "eval/tuned/metrics.json": {"n": 50, "rougeL": tuned, "rougeL_ci": [tuned - 0.03, tuned + 0.03],
                                             "delta_rougeL": delta, "delta_rougeL_ci": delta_ci},
                 "metrics/train.json": {"tokens_per_s": 100.0, "peak_memory_mb": 2000.0}}
        return {"rev": commit_run(name, files, params), "Experiment": None if name == "main" else name}

    rows = [run("main", "org/model-a", 1e-4, 1, 0.30, 0.10, [0.05, 0.15]),
            run("a-lr2", "org/model-a", 2e-4, 1, 0.28, 0.02, [-0.01, 0.05]),
            run("b-s1", "org/model-b", 1e-4, 1, 0.40, 0.20, [0.15, 0.25]),
            run("b-s2", "org/model-b", 1e-4, 2, 0.42, 0.22, [0.17, 0.27]),
            {"rev": "f" * 40, "Experiment": "broken", "State": "Failed"}]
    rows[0]["Experiment"] = "main"
    shown(monkeypatch, rows)

    result = CliRunner().invoke(compare.main, ["--out", "out"])
    assert result.exit_code == 0, result.output
    rows = {r["run"]: r for r in csv.DictReader(Path("out/compare.csv").open())}
    assert list(rows) == ["main", "a-lr2", "b-s1, b-s2"]  # by base model, best tuned first
    a1, a2, b = rows["main"], rows["a-lr2"], rows["b-s1, b-s2"]
    assert (a1["best"], a2["best"], b["best"]) == ("True", "False", "True")  # the best per base model
    assert a1["changed_params"] == "train.learning_rate=0.0001" and a2["changed_params"] == "train.learning_rate=0.0002"
    assert (a1["within_noise"], a2["within_noise"], b["within_noise"]) == ("False", "True", "False")
    assert a2["tied_with_best"] == "True"  # tuned 0.28 ± 0.03 overlaps 0.30 ± 0.03
    assert b["seeds"] == "1 2" and float(b["delta"]) == 0.21 and float(b["delta_std"]) == pytest.approx(0.0141, abs=1e-4)
    assert b["delta_ci_low"] == "" and a1["delta_ci_low"] == "0.05"
    md = Path("out/compare.md").read_text()
    assert "| `org/model-b` | r1 | b-s1, b-s2 ★ | train.learning_rate=0.0001 | 1, 2 | 50 | 0.2000 ± 0.0000 |" in md
    assert "+0.2100 ± 0.0141" in md and "a-lr2 (tied)" in md


def test_a_base_only_experiment_is_no_row_but_can_be_the_reference(tmp_path, monkeypatch):
    """`dvc exp run -S format.template=qa evaluate_base` commits the tuned metrics and answers of the commit it
    started from: compare leaves it out of the table (its tuned - delta is not its base score), and
    --reference-predictions compares every fine-tune with its base model's answers, question by question."""
    git_dvc_repo(tmp_path, monkeypatch)
    ids = ["q1", "q2", "q3", "q4"]

    def commit(name, template, base_scores, tuned_scores, stale_tuned=None):
        base, tuned = sum(base_scores) / 4, sum(tuned_scores) / 4
        fmt = yaml.safe_load((REPO / "params.yaml").read_text())["format"] | {"template": template}
        files = {"eval/base/metrics.json": {"n": 4, "rougeL": base, "rougeL_ci": [base - 0.05, base + 0.05]},
                 "eval/tuned/metrics.json": stale_tuned or {"n": 4, "rougeL": tuned, "rougeL_ci": [tuned - 0.05, tuned + 0.05],
                                                            "delta_rougeL": round(tuned - base, 4), "delta_rougeL_ci": [0.0, 0.2]},
                 "metrics/train.json": {"tokens_per_s": 100.0, "peak_memory_mb": 2000.0},
                 "eval/base/predictions.jsonl": [{"id": i, "rougeL": s} for i, s in zip(ids, base_scores)],
                 "eval/tuned/predictions.jsonl": [{"id": i, "rougeL": s} for i, s in zip(ids, tuned_scores)]}
        return {"rev": commit_run(name, files, {"format": fmt}), "Experiment": name}

    tuned = commit("tuned", "chat", [0.10, 0.10, 0.10, 0.10], [0.20, 0.30, 0.20, 0.30])
    # only evaluate_base ran: the tuned metrics and answers are still the tuned run's
    base_qa = commit("base-qa", "qa", [0.15, 0.15, 0.25, 0.25], [0.20, 0.30, 0.20, 0.30],
                     stale_tuned=json.loads(Path("eval/tuned/metrics.json").read_text()))
    shown(monkeypatch, [tuned, base_qa])

    args = ["--out", "out", "--reference", "base-qa", "--reference-predictions", "eval/base/predictions.jsonl"]
    result = CliRunner().invoke(compare.main, args)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(Path("out/compare.csv").open()))
    assert [r["run"] for r in rows] == ["tuned"]  # base-qa has no tuned evaluation of its own
    assert float(rows[0]["vs_reference"]) == pytest.approx(0.25 - 0.20)  # tuned answers - base-qa's base answers
    assert "the scores in its eval/base/predictions.jsonl" in Path("out/compare.md").read_text()
    result = CliRunner().invoke(compare.main, args[:-2])  # without it: base-qa's (stale) tuned answers
    assert result.exit_code == 0 and float(next(csv.DictReader(Path("out/compare.csv").open()))["vs_reference"]) == 0.0

"""The pipeline as a user runs it: `dvc repro`, a second `dvc repro`, an evaluation knob, `dvc exp run -S`.

Fast: a tiny model built in a fixture. The real-model run is in test_slow.py.
"""

from __future__ import annotations

import json
import subprocess

import yaml

from tests.helpers import dvc, ran

OUTPUTS = ["data/raw/manifest.json", "data/clean/records.jsonl", "data/split/test.jsonl", "data/formatted/train.jsonl",
           "models/adapter/adapter_model.safetensors", "metrics/eval_base.json", "metrics/eval_tuned.json",
           "eval/tuned/predictions.jsonl", "models/merged/model.safetensors", "metrics/merge.json",
           "metrics/lineage.json", "metrics/data_quality.json", "reports/data_quality.md", "metrics/export.json",
           "models/gguf/README.md"]


def test_dvc_repro_end_to_end_then_cached_then_eval_only(repo_copy):
    out = dvc(repo_copy, "repro")
    assert ran(out) == {"fetch", "clean", "split", "format", "train", "evaluate_base", "evaluate_tuned", "merge", "report",
                        "export"}
    for f in OUTPUTS:
        assert (repo_copy / f).exists(), f
    assert json.loads((repo_copy / "metrics/merge.json").read_text())["passed"]
    lock = (repo_copy / "dvc.lock").read_text()
    assert "models/adapter" in lock and "learning_rate" in lock

    assert ran(dvc(repo_copy, "repro")) == set()  # nothing reruns

    # every stage run again gives byte-identical outputs: only metrics/ (wall times, tokens/s) may differ
    first = output_hashes(repo_copy)
    dvc(repo_copy, "repro", "--force")
    second = output_hashes(repo_copy)
    assert {"models/adapter", "models/merged", "eval/tuned", "data/formatted"} <= set(first)
    assert {k for k in first if first[k] != second[k]} == set()

    params = (repo_copy / "params.yaml").read_text()
    (repo_copy / "params.yaml").write_text(params.replace("max_new_tokens: 8", "max_new_tokens: 6"))
    # merge: its model card cites the metrics; export: the merged model changed
    assert ran(dvc(repo_copy, "repro")) == {"evaluate_base", "evaluate_tuned", "merge", "export"}
    assert "| ROUGE-L F1 |" in (repo_copy / "models/merged/README.md").read_text()


def test_dvc_exp_run_compares_two_experiments(repo_copy):
    dvc(repo_copy, "repro")
    subprocess.run(["git", "add", "-A"], cwd=repo_copy, check=True)
    subprocess.run(["git", "commit", "-qm", "baseline run"], cwd=repo_copy, check=True)
    out = dvc(repo_copy, "exp", "run", "-S", "train.learning_rate=0.002", "-n", "lr-2e-3")
    assert ran(out) == {"train", "evaluate_tuned", "merge", "export"}  # data and the base evaluation stay cached
    shown = json.loads(dvc(repo_copy, "exp", "show", "--json"))
    text = json.dumps(shown)
    assert "lr-2e-3" in text and "0.002" in text and "eval_tuned.json" in text
    diff = dvc(repo_copy, "metrics", "diff", "HEAD", "--json")
    assert "metrics/eval_tuned.json" in diff or "metrics/train.json" in diff


def output_hashes(repo) -> dict[str, str]:
    """Each output dvc.lock records outside metrics/, with its md5 (a folder's: of its listing)."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for stage in lock["stages"].values() for o in stage.get("outs", [])
            if not o["path"].startswith("metrics/")}

"""`python -m medtune.tools.check`, the CI gate on pulled artifacts: run the pipeline in one clone, `dvc push` to a
local remote, `git clone` + `dvc pull` into a second clone, and check there without retraining. Then tamper
with a pulled file, with a metric, and raise a threshold: each fails with a message naming what failed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml
from click.testing import CliRunner

from medtune.tools import check
from tests.conftest import REPO
from tests.test_pipeline import dvc

# the tiny model's 4 test answers are near-random: thresholds that its run meets, so the test is about the gate
TINY_CHECK = {"min_delta": -1.0, "require_ci_above_zero": False, "min_test_questions": 1, "max_runaway_rate": 1.0,
              "max_empty_rate": 0.0}


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def run_check(repo: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medtune.tools.check"], cwd=repo, capture_output=True, text=True)


def set_check(repo: Path, **values) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["check"].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_check_on_a_pulled_clone_passes_then_names_what_was_tampered(repo_copy, tmp_path):
    remote = tmp_path / "remote"
    # the project's remote config, pointed at a temp folder the documented way (config.local is not committed)
    (repo_copy / ".dvc" / "config").write_text((REPO / ".dvc" / "config").read_text())
    dvc(repo_copy, "remote", "modify", "--local", "local", "url", str(remote))
    set_check(repo_copy, **TINY_CHECK)
    dvc(repo_copy, "repro")
    git(repo_copy, "add", "-A")
    git(repo_copy, "commit", "-qm", "run")
    assert "pushed" in dvc(repo_copy, "push")

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo_copy), str(clone))
    assert not (clone / "models" / "adapter").exists()  # git holds only the pointers (dvc.lock)
    dvc(clone, "remote", "modify", "--local", "local", "url", str(remote))
    dvc(clone, "pull")
    ok = run_check(clone)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("check passed: dvc status clean; delta_rougeL")
    assert "adapter answered 2 test question(s)" in ok.stdout

    weights = clone / "models" / "adapter" / "adapter_model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-64] + bytes(64))  # same size, last tensor bytes zeroed
    bad = run_check(clone)
    assert bad.returncode == 1
    assert "dvc status: models/adapter modified (output of train; does not match dvc.lock)" in bad.stderr
    weights.write_bytes(original)

    tuned = clone / "metrics" / "eval_tuned.json"
    metrics = json.loads(tuned.read_text())
    tuned.write_text(json.dumps(metrics | {"delta_rougeL": metrics["delta_rougeL"] + 0.5}))
    bad = run_check(clone)
    assert bad.returncode == 1
    assert "dvc status: metrics/eval_tuned.json modified" in bad.stderr
    assert "metrics/eval_tuned.json: rougeL" in bad.stderr and "disagrees with delta_rougeL" in bad.stderr
    assert "models/adapter" not in bad.stderr  # restored: only what was tampered is named
    git(clone, "checkout", "--", "metrics/eval_tuned.json")

    set_check(clone, min_delta=0.9, min_test_questions=30)  # no stage depends on `check`: dvc status stays clean
    bad = run_check(clone)
    assert bad.returncode == 1
    assert "dvc status" not in bad.stderr
    assert "metrics/eval_tuned.json: delta_rougeL" in bad.stderr and "is below check.min_delta +0.9000" in bad.stderr
    assert "metrics/eval_tuned.json: n 4 test questions is below check.min_test_questions 30" in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("Error: check failed (2): ")  # all at once, one line


def test_check_rejects_bad_params_before_any_work(tmp_path, monkeypatch):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["check"]["min_dleta"] = params["check"].pop("min_delta")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(check.main, [])
    assert result.exit_code == 1
    assert "check.min_dleta: unknown key (did you mean 'check.min_delta'?)" in result.output
    assert "check.min_delta: missing" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_check_names_missing_artifacts_when_nothing_was_pulled(repo_copy):
    """A fresh clone without `dvc pull`: every missing output is named, nothing is loaded or trained."""
    set_check(repo_copy, **TINY_CHECK)
    bad = run_check(repo_copy)
    assert bad.returncode == 1
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: check failed")
    for name in ("metrics/eval_tuned.json: not found (run `dvc pull`)", "metrics/merge.json: not found",
                 "models/adapter/adapter_model.safetensors: not found (run `dvc pull`)"):
        assert name in last

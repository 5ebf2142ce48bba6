"""Experiments as the README runs them: a queued sweep (`dvc exp run --queue` with a grid, then
`dvc exp run --run-all`) on the tiny model, compared by `python -m stages.compare` on the real
`dvc exp show --json` output; and the reference recipes in recipes/: each validates against params.yaml, and a
CPU-sized version of each runs through the data stages and two training steps.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from stages import compare
from tests.conftest import REPO
from tests.test_pipeline import dvc


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

    proc = subprocess.run([sys.executable, "-m", "stages.compare", "--out", "reports/compare"], cwd=repo_copy,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "compared 3 runs in 2 rows (skipped: {'no metrics/eval_base.json': 2})" in proc.stderr  # HEAD, workspace: not run
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


def write_params(path: Path, **sections) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params.update(sections)
    path.write_text(yaml.safe_dump(params))


def test_compare_errors_name_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params.yaml")
    (tmp_path / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    (tmp_path / "exps.json").write_text('[{"rev": "workspace",\n "data": }]')
    result = CliRunner().invoke(compare.main, ["--exps", "exps.json", "--out", "out"])
    assert result.exit_code == 1 and "exps.json:2: malformed JSON" in result.output
    (tmp_path / "exps.json").write_text(json.dumps([{"rev": "workspace", "name": None, "data": {"metrics": {}}, "error": None}]))
    result = CliRunner().invoke(compare.main, ["--exps", "exps.json", "--out", "out"])
    assert result.exit_code == 1 and "exps.json: no finished run with evaluation metrics" in result.output
    assert not (tmp_path / "out").exists()  # nothing half-written
    write_params(tmp_path / "params.yaml", compare={"metric": "rougeLsum", "seed_noise_sigmas": 2.0})
    result = CliRunner().invoke(compare.main, ["--exps", "exps.json", "--out", "out"])
    assert result.exit_code == 1 and "compare.metric: expected one of" in result.output

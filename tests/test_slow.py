"""The default pipeline on the real default model (gemma-3-270m from PyPI), as the README runs it: minutes on CPU."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml

from tests.conftest import REPO
from tests.helpers import dvc, ran


@pytest.mark.slow
def test_default_dvc_repro_tunes_a_model_that_beats_its_base(tmp_path, monkeypatch):
    # the real model's dense conversion is cached per user (~45 s once); keep it across runs
    monkeypatch.delenv("HF_HOME", raising=False)
    repo = tmp_path / "repo"
    subprocess.run(["git", "clone", "-q", str(REPO), str(repo)], check=True)
    for f in ("params.yaml", "dvc.yaml"):  # the working tree's version, committed or not
        shutil.copy(REPO / f, repo / f)
    shutil.rmtree(repo / "medtune")
    shutil.copytree(REPO / "medtune", repo / "medtune", ignore=shutil.ignore_patterns("__pycache__"))
    out = dvc(repo, "repro", "--force")
    assert "train" in ran(out) and "merge" in ran(out)
    base = json.loads((repo / "eval/base/metrics.json").read_text())
    tuned = json.loads((repo / "eval/tuned/metrics.json").read_text())
    assert base["n"] == tuned["n"] >= 30
    assert tuned["rougeL"] > base["rougeL"], (base["rougeL"], tuned["rougeL"])
    assert tuned["delta_rougeL_ci"][0] > 0  # the gain is not noise
    assert tuned["runaway_rate"] < 0.5  # the tuned model learned to stop
    assert json.loads((repo / "metrics/merge.json").read_text())["passed"]
    assert ran(dvc(repo, "repro")) == set()  # a second run reruns nothing
    # the data a fresh clone makes is the committed run's, byte for byte (the models are compared on one machine
    # in test_pipeline.py: float reductions may differ with the CPU's thread count)
    committed, made = (output_hashes(yaml.safe_load(t)) for t in ((REPO / "dvc.lock").read_text(),
                                                                 (repo / "dvc.lock").read_text()))
    data = [k for k in committed if k.startswith("data/")]
    assert len(data) == 4 and all(committed[k] == made[k] for k in data), {k: (committed[k], made.get(k)) for k in data}


def output_hashes(lock: dict) -> dict[str, str]:
    return {o["path"]: o["md5"] for stage in lock["stages"].values() for o in stage.get("outs", [])}

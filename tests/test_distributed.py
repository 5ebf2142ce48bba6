"""`train` under `accelerate launch` with 2 CPU processes: the same stage, the same params, one adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from medtune.params import (
    BaseParams,
    CleanParams,
    FetchParams,
    FormatParams,
    ModelParams,
    SplitParams,
)
from medtune.stages import clean, fetch, split
from medtune.stages import format as format_stage
from tests.conftest import ASSETS, REPO, tiny_params


def test_train_under_accelerate_launch_with_two_cpu_processes_saves_one_adapter(tmp_path, tiny_model):
    p = tiny_params(tiny_model)
    p["train"].update(target_modules=["q_proj", "v_proj"], max_steps=4, batch_size=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    base = BaseParams(**p["base"])
    fetch.run(FetchParams(**(p["fetch"] | {"source": str(ASSETS / "medquad_tiny.jsonl")})), base, tmp_path / "raw")
    clean.run(CleanParams(**p["clean"]), tmp_path / "raw", tmp_path / "clean")
    split.run(SplitParams(**p["split"]), base, tmp_path / "clean", tmp_path / "split")
    format_stage.run(FormatParams(**p["format"]), ModelParams(**p["model"]), tmp_path / "split", tmp_path / "fmt")

    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs/accelerate/cpu2.yaml"),
           "-m", "medtune.stages.train", "--data", "fmt", "--out", "adapter", "--metrics", "train.json",
           "--curves", "curves", "--checkpoints", "ckpt", "--lineage", "lineage.json"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert log.count("saved adapter to adapter") == 1  # only the main process writes outputs
    assert "world size 2" in log
    metrics = json.loads((tmp_path / "train.json").read_text())
    assert metrics["steps"] == 4 and metrics["processes"] == 2
    assert sorted(x.name for x in tmp_path.iterdir() if x.name.startswith(".adapter")) == []  # no stray temp dirs

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), tmp_path / "adapter")
    with torch.no_grad():
        out = model(torch.tensor([[2, 10, 11]])).logits
    assert torch.isfinite(out).all()

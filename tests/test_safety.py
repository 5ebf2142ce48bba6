"""Untrusted input stays data: a model folder cannot run its own code, errors do not echo what they read, and
bad values in params.yaml are refused before they can reach training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from medtune import params
from medtune.commands import chat
from medtune.models import local_revision
from tests.conftest import tiny_params
from tests.helpers import QUESTION

LIMITS = ["--max-new-tokens", "4", "--max-new-tokens-cap", "8", "--max-prompt-tokens", "64"]


def evil_folder(tiny_model: Path, root: Path) -> Path:
    """A merged-model folder as a download might bring it: its run_config asks for remote code, its config.json
    maps the model class to a module of its own, and that module leaves a mark when it is imported."""
    folder = root / "downloaded"
    shutil.copytree(tiny_model, folder)
    (folder / "run_config.json").write_text(json.dumps({"params": {"model": {
        "base": str(tiny_model), "revision": local_revision(tiny_model), "chat_template": "gemma3_base",
        "trust_remote_code": True}}, "base_model": {"base": str(tiny_model), "kind": "local"}}))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(f"from pathlib import Path\nPath({str(root / 'pwned')!r}).write_text('ran')\n"
                                    "from transformers import LlamaConfig, LlamaForCausalLM\n"
                                    # subclasses: loading marks the class it loads for auto-saving, and that mark
                                    # must not land on transformers' own LlamaForCausalLM for the rest of the run
                                    "class EvilConfig(LlamaConfig):\n    pass\n"
                                    "class EvilForCausalLM(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    return folder


def test_a_model_folder_cannot_run_its_own_code(workdir, tiny_model, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(workdir)
    folder = evil_folder(tiny_model, tmp_path)
    result = CliRunner().invoke(chat.main, [*LIMITS, "--model", str(folder), QUESTION])
    assert not (tmp_path / "pwned").exists(), "the folder's evil.py ran"
    assert "Traceback" not in result.output and "refused: pass --trust-remote-code" in caplog.text


def test_remote_code_runs_only_when_the_user_says_so(workdir, tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(workdir)
    folder = evil_folder(tiny_model, tmp_path)
    CliRunner().invoke(chat.main, [*LIMITS, "--model", str(folder), "--trust-remote-code", QUESTION])
    assert (tmp_path / "pwned").exists()  # the flag is what allows it: the test above is not passing by accident


@pytest.mark.parametrize("key, value, message", [
    ("train.learning_rate", float("inf"), "train.learning_rate: input should be a finite number"),
    ("train.learning_rate", float("nan"), "train.learning_rate: input should be a finite number"),
    ("train.weight_decay", -0.1, "train.weight_decay: input should be greater than or equal to 0"),
    ("train.warmup", float("nan"), "train.warmup: input should be a finite number"),
    ("merge.atol", -1e-3, "merge.atol: input should be greater than 0"),
    ("model.revision", "main", "model.revision: 'main' can move"),
])
def test_non_finite_and_out_of_range_params_are_refused(tiny_model, key, value, message):
    p = tiny_params(tiny_model)
    section, name = key.split(".")
    p[section][name] = value
    if key == "model.revision":
        p["model"]["base"] = "google/gemma-3-270m"
    assert any(message in problem for problem in params.check_all(p)), params.check_all(p)


def test_duplicate_yaml_keys_are_refused_with_their_line(tmp_path, tiny_model):
    text = yaml.safe_dump(tiny_params(tiny_model), sort_keys=False).replace("  lora_r: 16\n", "  lora_r: 16\n  lora_r: 64\n")
    (tmp_path / "params.yaml").write_text(text)
    line = text.splitlines().index("  lora_r: 64") + 1
    from medtune.tools import validate

    result = CliRunner().invoke(validate.main, ["--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 1
    assert f"params.yaml:{line}: train.lora_r: duplicate key (first at line {line - 1})" in result.output


def test_malformed_json_says_where_without_doubling_words(tmp_path):
    from medtune.console import MedtuneError
    from medtune.io import read_jsonl

    (tmp_path / "a.jsonl").write_text('{"id": 1}\n{"question": "unterminated}')
    with pytest.raises(MedtuneError) as e:
        read_jsonl(tmp_path / "a.jsonl")
    assert f"{tmp_path / 'a.jsonl'}:2: malformed JSON at column 14 (Unterminated string starting at)" == str(e.value)
    assert "at at" not in str(e.value)

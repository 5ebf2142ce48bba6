"""Plain helpers the test files share: params built from the repository's params.yaml shrunk to the tiny model,
`dvc` run as a user runs it, and servers started on a free port. Fixtures live in conftest.py."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from medtune import params
from medtune.models import load_tokenizer, local_revision
from medtune.params import (
    BaseParams,
    CleanParams,
    FetchParams,
    FormatParams,
    ModelParams,
    SplitParams,
    TrainParams,
)
from medtune.prompts import render
from tests.conftest import REPO, tiny_params

BASE = BaseParams(seed=3)  # the model-stage tests' seed
COLUMNS = {"question": "question", "answer": "answer", "focus": "focus", "source": "source", "url": "url"}
REPEAT = yaml.safe_load((REPO / "params.yaml").read_text())["clean"]["explanation_repeat_regex"]
QUESTION = "what are the symptoms of glaucoma ?"
DISCLAIMER = {"enabled": False, "text": "Not medical advice; see a clinician.", "position": "end", "fraction": 1.0}


def source_in(root: Path, asset: str = "medquad_tiny.jsonl") -> str:
    """Copy a fixture under root/data/source/, where fetch reads sources from; its path relative to root."""
    import shutil

    from tests.conftest import ASSETS

    (root / "data" / "source").mkdir(parents=True, exist_ok=True)
    shutil.copy(ASSETS / asset, root / "data" / "source" / asset)
    return f"data/source/{asset}"


def dvc(repo: Path, *args: str) -> str:
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # stages run `python`
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def fetch_params(source, **kw) -> FetchParams:
    return FetchParams(**{"source": str(source), "revision": None, "subset": None, "split": "train", "columns": COLUMNS,
                                "id_column": "id", "option_columns": [], "fixed_options": [], "answer_key": "letter",
                                "mix": [], "max_rows": None} | kw)


def clean_params(**kw) -> CleanParams:
    return CleanParams(**{"min_question_chars": 10, "max_question_chars": 2000, "min_answer_chars": 40,
                                "max_answer_chars": 4000, "dedupe": True, "near_dup_threshold": 0.9,
                                "strip_boilerplate": [], "explanation_repeat_regex": REPEAT, "select_longest": None,
                                "select_field": "explanation", "phi": "keep", "max_drop_frac": 0.5} | kw)


def split_params(**kw) -> SplitParams:
    return SplitParams(**{"val_frac": 0.2, "test_frac": 0.2, "group_by": ["focus", "url"], "near_dup_threshold": 0.9,
                                "test_sources": []} | kw)


def format_params(**kw) -> FormatParams:
    return FormatParams(**{"template": "chat", "system_prompt": "", "max_answer_tokens": 48, "max_length": 96,
                                        "overflow": "drop", "disclaimer": DISCLAIMER} | kw)


def section(cls, tiny_model, name, **kw):
    return cls(**(tiny_params(tiny_model)[name] | kw))


def model_params(tiny_model) -> ModelParams:
    return ModelParams(base=str(tiny_model), revision=local_revision(tiny_model), chat_template="gemma3_base", trust_remote_code=False)


def train_params(tiny_model, **kw) -> TrainParams:
    return section(TrainParams, tiny_model, "train", **({"target_modules": ("q_proj", "v_proj")} | kw))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], cwd: Path, ready_path: str, log: Path) -> tuple[subprocess.Popen, str]:
    """Start `python -m medtune.<...>` on a free port and wait until `ready_path` answers 200."""
    port = free_port()
    env = os.environ | {"PYTHONPATH": str(REPO), "GRADIO_ANALYTICS_ENABLED": "False"}
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, "-m", *args, "--port", str(port)], cwd=cwd, env=env, stdout=f, stderr=f)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{args[0]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + ready_path, timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    pytest.fail(f"{args[0]} did not start in time:\n{log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def expected_answer(tiny_model: Path, adapter: Path | None, question: str, max_new_tokens: int) -> str:
    """Greedy generation on the training prompt, written out independently of medtune.commands.chat."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    m = model_params(tiny_model)
    tok = load_tokenizer(tiny_model, m)
    (fmt,) = params.load("format")
    prompt = render(tok, fmt, {"id": "q", "question": question})[0]
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    enc = tok(prompt, return_tensors="pt")
    stops = [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")]
    ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=tok.pad_token_id)
    return tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)

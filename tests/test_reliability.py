"""Bad input and unsafe input fail fast with one line naming the file/key, and leave nothing half-written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from medtune.console import MedtuneError
from medtune.models import local_revision, resolve_base
from medtune.params import EvaluateParams, MergeParams, ModelParams
from medtune.stages import clean, evaluate, fetch, merge, train
from tests.conftest import REPO, tiny_params
from tests.helpers import (
    BASE,
    clean_params,
    fetch_params,
    model_params,
    section,
    source_in,
    train_params,
)


def test_non_utf8_input_names_the_file(tmp_path):
    src = tmp_path / "latin1.jsonl"
    src.write_bytes('{"question": "Qu\'est-ce que la fi\xe8vre ?", "answer": "Une temp\xe9rature \xe9lev\xe9e du corps."}\n'.encode("latin-1"))
    with pytest.raises(MedtuneError, match=r"latin1.jsonl: not UTF-8"):
        fetch.run(fetch_params(src, id_column=None, columns={"question": "question", "answer": "answer"}), BASE, tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_wrong_types_and_a_10_mb_answer_are_dropped_and_counted(tmp_path, tiny_rows):
    rows = [{"id": str(i), "question": r["question"], "answer": r["answer"]} for i, r in enumerate(tiny_rows)]
    rows += [{"id": "num", "question": "What is the number?", "answer": 42},
             {"id": "huge", "question": "What is a very long answer?", "answer": "word " * 2_000_000}]
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = clean.run(clean_params(), tmp_path / "raw", tmp_path / "clean")
    assert summary["dropped"]["not_text"] == 1 and summary["dropped"]["long_answer"] == 1
    assert summary["rows_in"] == summary["rows_out"] + sum(summary["dropped"].values())


def test_missing_offline_base_model_says_how_to_provide_it():
    m = ModelParams(base="nobody/no-such-model", revision="0123456789abcdef0123456789abcdef01234567",
                    chat_template="gemma3_base", trust_remote_code=False)
    with pytest.raises(MedtuneError, match=r"not available.*hf download.*local folder"):
        resolve_base(m)


def test_hub_model_must_be_pinned(tmp_path, tiny_model, monkeypatch):
    from medtune.params import check_all

    p = tiny_params(tiny_model)
    p["model"].update(base="google/gemma-3-270m", revision=None)
    assert any("model.revision: pin the base model" in x for x in check_all(p))


def test_params_check_needs_no_serving_libraries(tmp_path):
    """A training machine without the serving extras (fastapi, gradio) still checks params.yaml."""
    import subprocess
    import sys

    block = "import sys; sys.modules.update(fastapi=None, gradio=None, uvicorn=None); from medtune.tools.validate import main; main()"
    proc = subprocess.run([sys.executable, "-c", block, "--params", str(REPO / "params.yaml")], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("params.yaml: ok"), proc.stderr[-2000:]


def test_pickle_weights_are_refused(tmp_path, tiny_model):
    local = tmp_path / "pickled"
    shutil.copytree(tiny_model, local)
    (local / "model.safetensors").unlink()
    torch.save({}, local / "pytorch_model.bin")
    m = ModelParams(base=str(local), revision=local_revision(local), chat_template="gemma3_base", trust_remote_code=False)
    with pytest.raises(MedtuneError, match="only pickle .bin weights"):
        resolve_base(m)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model, formatted) -> Path:
    d = tmp_path_factory.mktemp("adapter")
    train.run(train_params(tiny_model), model_params(tiny_model), BASE, formatted, d / "adapter", d / "curves", d / "ckpt")
    return d / "adapter"


def test_an_adapter_of_another_base_model_fails_in_one_line(tmp_path, adapter, tiny_model):
    """torch names each mismatched tensor on a line of its own; the error stays one line with the count."""
    from safetensors.torch import save_file

    from medtune.models import load_adapter, load_model

    other = tmp_path / "adapter"
    shutil.copytree(adapter, other)
    weights = load_file(other / "adapter_model.safetensors")
    save_file({k: v.repeat(1, 2) if "lora_A" in k else v for k, v in weights.items()}, other / "adapter_model.safetensors")
    m = model_params(tiny_model)
    with pytest.raises(MedtuneError) as e:
        load_adapter(load_model(tiny_model, m, "float32"), other, m)
    n = sum("lora_A" in k for k in weights)
    assert "\n" not in str(e.value) and f"{n} tensors have other shapes than this base model's" in str(e.value)


def test_truncated_adapter_fails_merge_and_evaluate_with_a_clear_message(tmp_path, adapter, tiny_model, formatted):
    broken = tmp_path / "adapter"
    shutil.copytree(adapter, broken)
    data = (broken / "adapter_model.safetensors").read_bytes()
    (broken / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(MedtuneError, match=r"adapter.*could not load the adapter"):
        merge.run(section(MergeParams, tiny_model, "merge"), model_params(tiny_model), broken, formatted, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    with pytest.raises(MedtuneError, match=r"could not load the adapter"):
        evaluate.run(section(EvaluateParams, tiny_model, "evaluate"), model_params(tiny_model), BASE, formatted,
                     tmp_path / "eval", adapter=broken)


def test_same_params_and_seed_give_the_same_adapter_on_cpu(tmp_path, adapter, tiny_model, formatted):
    again = tmp_path / "again"
    train.run(train_params(tiny_model), model_params(tiny_model), BASE, formatted, again, tmp_path / "c", tmp_path / "k")
    a, b = load_file(adapter / "adapter_model.safetensors"), load_file(again / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_adapter_names_its_base_as_params_do_not_by_a_path_of_this_machine(tmp_path, tiny_model, formatted, monkeypatch):
    """The adapter's config names the base model the way params.yaml does (a relative folder here; a hub id or
    pypi: name elsewhere), never the absolute path it was loaded from on the training machine."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model, tmp_path / "tiny")
    m = ModelParams(base="tiny", revision=local_revision(tmp_path / "tiny"), chat_template="gemma3_base", trust_remote_code=False)
    out = tmp_path / "adapter"
    train.run(train_params(tiny_model), m, BASE, formatted, out, tmp_path / "curves", tmp_path / "k")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny"
    for f in out.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".md", ".txt"):
            assert str(tmp_path) not in f.read_text(), f


def test_unwritable_output_is_a_one_line_error(tmp_path, tiny_model, monkeypatch):
    if os.geteuid() == 0:  # root ignores permission bits; a file in the way of a folder fails for everyone
        target = tmp_path / "blocked"
        target.write_text("not a folder")
        out = target / "raw"
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        out = tmp_path / "ro" / "raw"
    monkeypatch.chdir(tmp_path)
    p = tiny_params(tiny_model)
    p["fetch"]["source"] = source_in(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    result = CliRunner().invoke(fetch.main, ["--out", str(out), "--metrics", str(tmp_path / "fetch.json")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.startswith(f"Error: {out.parent}") and len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_killed_train_stage_resumes_and_ends_with_the_same_steps(tmp_path, tiny_model, formatted, sig):
    import signal
    import subprocess
    import sys
    import time

    p = tiny_params(tiny_model)
    p["train"].update(target_modules=["q_proj", "v_proj"], max_steps=200, save_steps=5, logging_steps=50)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    cmd = [sys.executable, "-m", "medtune.stages.train", "--data", str(formatted), "--out", "adapter", "--metrics", "train.json",
           "--curves", "curves", "--checkpoints", "ckpt", "--lineage", "lineage.json"]
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    # checkpoint-10 complete (the Trainer writes trainer_state.json last), so the resume must start at or after it
    while not (tmp_path / "ckpt" / "checkpoint-10" / "trainer_state.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "training finished before it could be interrupted"
    proc.send_signal(getattr(signal, sig))
    proc.wait(timeout=60)
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "train.json").exists()  # nothing half-written
    assert any((tmp_path / "ckpt").glob("checkpoint-*"))
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((tmp_path / "train.json").read_text())
    assert metrics["resumed_from_step"] >= 10 and metrics["steps"] == 200
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_disk_full_while_writing_keeps_the_previous_outputs(tmp_path, tiny_model):
    """A write that fails half-way (here: the file-size limit a full disk would impose) stops the stage with one
    line naming the file, and the previous, complete outputs are still there."""
    import resource
    import signal
    import subprocess
    import sys

    p = tiny_params(tiny_model)
    p["fetch"]["source"] = source_in(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    cmd = [sys.executable, "-m", "medtune.stages.fetch", "--out", "raw", "--metrics", "fetch.json"]
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parent.parent), "PYTHONDONTWRITEBYTECODE": "1"}
    subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True)
    before = {f.name: f.read_bytes() for f in (tmp_path / "raw").iterdir()}

    def full_disk():  # writes beyond 4 kB fail with EFBIG, as ENOSPC would on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, preexec_fn=full_disk)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "records.jsonl" in proc.stderr and "too large" in proc.stderr.lower()
    assert {f.name: f.read_bytes() for f in (tmp_path / "raw").iterdir()} == before  # nothing lost or half-written
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".raw")]  # no temp folder left behind


def test_secrets_never_reach_logs_or_model_cards(tmp_path, tiny_model, monkeypatch):
    secret = "hf_SECRETtoken1234567890"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.chdir(tmp_path)
    p = tiny_params(tiny_model)
    p["fetch"]["source"] = source_in(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    import subprocess
    import sys

    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    logs = ""
    for cmd in (["medtune.stages.fetch", "--out", "raw", "--metrics", "fetch.json"], ["medtune.stages.clean", "--in", "raw", "--out", "clean", "--metrics", "clean.json"]):
        proc = subprocess.run([sys.executable, "-m", *cmd], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
        logs += proc.stdout + proc.stderr
    assert "fetch params" in logs and secret not in logs  # params are logged, the environment is not
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f


def test_outputs_get_the_umask_permissions_and_a_killed_writes_leftovers_go(tmp_path):
    """Temp-then-rename must not leave owner-only files (mkstemp's 0600), and what a killed write left beside an
    output (a temp folder git would show) is removed by the next write of that output."""
    from medtune.io import atomic_dir, write_json

    leftover = tmp_path / ".merged.abc123.tmp"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "merged") as tmp:
            (tmp / "sub").mkdir()
            write_json(tmp / "sub" / "run_config.json", {"a": 1})
    finally:
        os.umask(old)
    assert not leftover.exists()
    assert (tmp_path / "merged").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "merged" / "sub" / "run_config.json").stat().st_mode & 0o777 == 0o644
    ignored = subprocess.run(["git", "check-ignore", "-q", "models/.merged.abc123.tmp"], cwd=REPO)
    assert ignored.returncode == 0  # git status does not show one meanwhile


def test_an_error_while_writing_names_the_output_not_the_temp_folder(tmp_path):
    from medtune.io import atomic_dir

    with pytest.raises(OSError) as e, atomic_dir(tmp_path / "eval") as tmp:
        (tmp / "predictions.jsonl").mkdir()
        (tmp / "predictions.jsonl").write_text("x")  # a folder in the way: IsADirectoryError on a temp path
    assert e.value.filename == str(tmp_path / "eval" / "predictions.jsonl") and ".tmp" not in str(e.value)
    assert not (tmp_path / "eval").exists() and not list(tmp_path.glob(".*.tmp"))


def test_a_non_finite_loss_stops_training_and_saves_no_adapter(tmp_path, tiny_model, formatted):
    from safetensors.torch import save_file

    broken = tmp_path / "model"  # a base whose final norm holds a NaN: every loss is NaN from the first step
    shutil.copytree(tiny_model, broken)
    weights = load_file(broken / "model.safetensors")
    weights["model.norm.weight"][0] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    p = train_params(broken, max_steps=4, logging_steps=1, save_steps=0)
    with pytest.raises(MedtuneError, match=r"train: the eval loss is nan before any training step: the base model's "
                                           r"weights or the data give a non-finite loss; no adapter was saved"):
        train.run(p, model_params(broken), BASE, formatted, tmp_path / "adapter", tmp_path / "curves", tmp_path / "ckpt")
    assert not (tmp_path / "adapter").exists()


def test_a_failed_stage_under_dvc_says_what_happened_to_its_previous_outputs(monkeypatch):
    from medtune.console import outputs_note

    monkeypatch.setenv("DVC_STAGE", "fetch")
    assert "`dvc checkout fetch` restores them" in outputs_note(kept=True, persist=False)
    assert outputs_note(kept=True, persist=True) == "; the previous outputs were kept"
    assert outputs_note(kept=False, persist=False) == ""  # chat, serve: they write nothing, so they claim nothing


def test_a_missing_local_base_folder_is_not_taken_for_a_hub_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()  # models/mine: a folder path under an existing folder, not org/name on the hub
    m = ModelParams(base="models/mine", revision="sha256:" + "0" * 64, chat_template="gemma3_base", trust_remote_code=False)
    with pytest.raises(MedtuneError, match=r"model.base 'models/mine': no such folder"):
        resolve_base(m)

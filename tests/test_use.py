"""Using the fine-tuned model: the chat CLI, the OpenAI-compatible HTTP API (a real uvicorn server and a real
HTTP client), the model card written by merge, and push --dry-run. A tiny LoRA adapter is built with peft
on the tiny model from conftest; the browser test of the web UI is in test_ui.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from click.testing import CliRunner

from medtune import params
from medtune.assistant import Answer, Limits, load_tuned
from medtune.cards import CardInputs
from medtune.commands import chat
from medtune.models import load_tokenizer
from medtune.prompts import render
from medtune.stages import merge
from medtune.tools import card as card_stage
from medtune.tools import push
from tests.conftest import tiny_params
from tests.helpers import (
    QUESTION,
    expected_answer,
    model_params,
    start_server,
    stop_server,
)

LIMITS = ["--max-new-tokens", "12", "--max-new-tokens-cap", "40", "--max-prompt-tokens", "64"]  # small, for a tiny model


@pytest.fixture
def in_workdir(workdir, monkeypatch, tmp_path) -> Path:
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("MEDTUNE_CACHE", str(tmp_path / "cache"))
    return workdir


# ---------------------------------------------------------------- chat CLI


def test_chat_streams_the_greedy_answer_to_the_training_prompt(in_workdir, tiny_model, tiny_adapter):
    result = CliRunner().invoke(chat.main, [*LIMITS, "--adapter", str(tiny_adapter), QUESTION])
    assert result.exit_code == 0, result.output
    want = expected_answer(tiny_model, tiny_adapter, QUESTION, 12)
    assert want.strip() and result.stdout.strip() == want.strip()
    assert "Not medical advice" in result.stderr

    limits = Limits(max_new_tokens=12, max_new_tokens_cap=40, max_prompt_tokens=64, temperature=0.0, top_p=1.0)
    tuned, _ = load_tuned(tiny_adapter, adapter=True)
    answer = Answer(tuned, QUESTION, limits)
    pieces = list(answer)
    assert len(pieces) > 1 and "".join(pieces).strip() == want.strip()  # streamed in pieces, not one block
    assert 1 <= answer.completion_tokens <= 12 and answer.finish_reason in ("stop", "length")


def test_chat_compare_shows_base_beside_tuned_and_stdin_mode(in_workdir, tiny_model, tiny_adapter):
    result = CliRunner().invoke(chat.main, [*LIMITS, "--adapter", str(tiny_adapter), "--compare"], input=f"{QUESTION}\n\n")
    assert result.exit_code == 0, result.output
    tuned_head, base_head = "── fine-tuned", "── base"
    out = result.stdout
    assert out.index(tuned_head) < out.index(base_head)
    tuned_text = out.split(base_head)[0].split("\n", 1)[1].strip()
    base_text = out.split(base_head)[1].split("\n", 1)[1].strip()
    assert tuned_text == expected_answer(tiny_model, tiny_adapter, QUESTION, 12).strip()
    assert base_text == expected_answer(tiny_model, None, QUESTION, 12).strip() != tuned_text


def test_chat_with_the_merged_model_answers_like_base_plus_adapter(in_workdir, tiny_model, tiny_adapter, merged):
    result = CliRunner().invoke(chat.main, [*LIMITS, "--model", str(merged), QUESTION])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == expected_answer(tiny_model, tiny_adapter, QUESTION, 12).strip()


def test_chat_from_a_dvc_experiment_reads_the_adapter_from_the_cache(in_workdir, tmp_path, tiny_model, tiny_adapter, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "models").mkdir(parents=True)
    (repo / "params.yaml").write_text((in_workdir / "params.yaml").read_text())
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def sh(*cmd):
        proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.com"], ["git", "config", "user.name", "t"],
                [sys.executable, "-m", "dvc", "init", "-q"]):
        sh(*cmd)
    shutil.copytree(tiny_adapter, repo / "models" / "adapter")
    sh(sys.executable, "-m", "dvc", "add", "-q", "models/adapter")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "adapter")
    sh("git", "tag", "v1")
    sh(sys.executable, "-m", "dvc", "exp", "save", "-n", "my-exp")
    shutil.rmtree(repo / "models" / "adapter")  # the workspace no longer has it: it must come from the cache
    monkeypatch.chdir(repo)
    runner = CliRunner()
    result = runner.invoke(chat.main, [*LIMITS, "--adapter", "models/adapter", "--exp", "my-exp", QUESTION])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == expected_answer(tiny_model, tiny_adapter, QUESTION, 12).strip()
    tagged = runner.invoke(chat.main, [*LIMITS, "--adapter", "models/adapter", "--exp", "v1", QUESTION])  # any git revision
    assert tagged.exit_code == 0 and tagged.stdout == result.stdout, tagged.output
    bad = runner.invoke(chat.main, [*LIMITS, "--adapter", "models/adapter", "--exp", "no-such-exp", QUESTION])
    assert bad.exit_code == 1 and "no-such-exp: not an experiment" in bad.output and "Traceback" not in bad.output
    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(Path(os.environ["MEDTUNE_CACHE"]) / "revs")
    gone = runner.invoke(chat.main, [*LIMITS, "--adapter", "models/adapter", "--exp", "my-exp", QUESTION])
    assert gone.exit_code == 1 and "models/adapter is not in the DVC cache" in gone.output and "dvc pull" in gone.output


@pytest.mark.parametrize("args, code, message", [
    (["--adapter", "X", "--model", "Y", "q"], 2, "exactly one of --model"),
    (["--adapter", "nowhere", "q"], 2, "nowhere: no such folder"),
    (["--adapter", "ADAPTER", "word " * 80], 1, "over --max-prompt-tokens (64)"),
])
def test_chat_rejects_bad_input_in_one_line(in_workdir, tiny_adapter, args, code, message):
    args = [str(tiny_adapter) if a == "ADAPTER" else a for a in args]
    result = CliRunner().invoke(chat.main, [*LIMITS, *args])
    assert result.exit_code == code and message in result.output and "Traceback" not in result.output


# ---------------------------------------------------------------- HTTP API


@pytest.fixture(scope="module")
def api(workdir, tiny_adapter, tmp_path_factory):
    proc, url = start_server(["medtune.commands.serve", "--adapter", str(tiny_adapter), "--with-base", *LIMITS,
                              "--max-request-bytes", "2048", "--max-batch", "2", "--max-queue", "4", "--request-timeout", "120"],
                             workdir, "/health",
                             tmp_path_factory.mktemp("serve") / "serve.log")
    yield url
    stop_server(proc)


def ask(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": QUESTION}]} | body, timeout=60)


def sse_events(url: str, **body) -> list:
    events = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60,
                      json={"messages": [{"role": "user", "content": QUESTION}], "stream": True} | body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
    return events


def test_api_answers_whole_and_streamed_like_the_cli(api, workdir, tiny_model, tiny_adapter, monkeypatch):
    monkeypatch.chdir(workdir)
    want = expected_answer(tiny_model, tiny_adapter, QUESTION, 12).strip()
    r = ask(api, model="tuned")
    assert r.status_code == 200 and "Not medical advice" in r.headers["x-medical-disclaimer"]
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "tuned"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"].strip() == want
    assert choice["finish_reason"] in ("stop", "length")
    assert body["usage"]["completion_tokens"] > 0 and body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]

    events = sse_events(api, stream_options={"include_usage": True})
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks]
    assert len([p for p in pieces if p]) > 1 and "".join(pieces).strip() == want
    assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]
    assert events[-2]["usage"] == body["usage"]

    base = ask(api, model="base").json()["choices"][0]["message"]["content"].strip()
    assert base == expected_answer(tiny_model, None, QUESTION, 12).strip() != want
    assert ask(api, max_tokens=3).json()["usage"]["completion_tokens"] <= 3
    models = httpx.get(f"{api}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tuned", "base"] and "adapter" in models["data"][0]["description"]


@pytest.mark.parametrize("body, status, message", [
    ({"max_tokens": 41}, 400, "max_tokens must be between 1 and 40"),
    ({"max_completion_tokens": 0}, 400, "max_tokens must be between 1 and 40"),
    ({"model": "gpt-4"}, 404, "model 'gpt-4' is not served here"),
    ({"messages": []}, 400, "messages: List should have at least 1 item"),
    ({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": QUESTION}]}, 400,
     "exactly one user message"),
    ({"messages": [{"role": "user", "content": "  "}]}, 400, "the question is empty"),
    ({"messages": [{"role": "user", "content": "word " * 80}]}, 400, "over --max-prompt-tokens"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
    ({"temperature": 3}, 400, "temperature must be in [0, 2]"),
    ({"logprobs": True}, 400, "logprobs: Extra inputs are not permitted"),
    ({"n": 2}, 400, "n: Input should be 1"),
])
def test_api_refuses_bad_requests_with_openai_errors(api, body, status, message):
    r = ask(api, **body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert message in err["message"] and err["type"] == "invalid_request_error"


def test_api_refuses_oversized_and_malformed_bodies(api):
    url = f"{api}/v1/chat/completions"
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 3000}]})
    r = httpx.post(url, content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "--max-request-bytes (2,048)" in r.json()["error"]["message"]
    chunked = httpx.post(url, content=iter([big[:1500].encode(), big[1500:].encode()]))  # no content-length
    assert chunked.status_code == 413
    bad = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    assert ask(api).status_code == 200  # still serving


# ---------------------------------------------------------------- model card and push


@pytest.fixture(scope="module")
def merged(workdir, tiny_model, tiny_adapter, tmp_path_factory) -> Path:
    """merge.run on the tiny adapter, with the model card, as the merge stage runs it."""
    old = os.getcwd()
    os.chdir(workdir)
    try:
        m = model_params(tiny_model)
        fmt, cp, mp = params.load("format", "card", "merge")
        tok = load_tokenizer(tiny_model, m)
        data = tmp_path_factory.mktemp("fmt")
        rows = [{"id": f"t{i}", "prompt": render(tok, fmt, {"id": f"t{i}", "question": q})[0]}
                for i, q in enumerate([QUESTION, "is glaucoma inherited ?"])]
        (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        out = tmp_path_factory.mktemp("merged") / "merged"
        card = CardInputs(cp, fmt, workdir / "metrics/eval_base.json", workdir / "metrics/eval_tuned.json", workdir / "DATA_CARD.md")
        assert merge.run(mp, m, tiny_adapter, data, out, card)["passed"]
        return out
    finally:
        os.chdir(old)


def test_merge_writes_a_model_card_with_lineage_data_license_metrics_and_disclaimer(merged, tiny_model):
    from huggingface_hub import ModelCard

    text = (merged / "README.md").read_text()
    card = ModelCard.load(merged / "README.md")  # as the Hub reads it: metadata, and the evaluation as model-index
    assert (card.data.license, card.data.base_model, card.data.library_name) == ("apache-2.0", "medtune/tiny-llama", "transformers")
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == {"rougeL": 0.2, "rouge1": 0.2, "rouge2": 0.2, "token_f1": 0.2}  # workdir's eval_tuned.json
    assert {r.dataset_split for r in card.data.eval_results} == {"test"}
    assert "Medical disclaimer" in text and "Not medical advice" in text
    assert str(tiny_model) in text  # the base model as trained, with its identity
    assert "CC BY 4.0" in text and "Ben Abacha" in text  # the data's license and citation, from the data card
    assert "| ROUGE-L F1 | 0.200 [0.100, 0.300] | 0.200 [0.100, 0.300] | +0.050 [0.010, 0.090] |" in text
    assert "| answers referring to a clinician | 12.5% | 12.5% | |" in text and "MCQ accuracy" not in text
    assert "n = 7" in text and "lora_r: 4" in text and "## Intended use" in text and "## Limitations" in text


def test_merge_stops_before_merging_when_the_card_cannot_be_written(in_workdir, tmp_path, tiny_model, tiny_adapter):
    bad_card = tmp_path / "DATA_CARD.md"
    bad_card.write_text("# data\n- **Source:** somewhere\n")  # no license
    result = CliRunner().invoke(merge.main, ["--adapter", str(tiny_adapter), "--data", str(tmp_path), "--out", str(tmp_path / "m"),
                                             "--metrics", str(tmp_path / "m.json"), "--eval-base", "metrics/eval_base.json",
                                             "--eval-tuned", "metrics/eval_tuned.json", "--data-card", str(bad_card)])
    assert result.exit_code == 1 and "no '- **License:** ...' line" in result.output
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.json").exists()


def test_card_command_writes_the_adapter_card(in_workdir, tmp_path, tiny_adapter, tiny_model):
    out = tmp_path / "card.md"
    args = ["--model", str(tiny_adapter), "--eval-base", "metrics/eval_base.json", "--eval-tuned", "metrics/eval_tuned.json",
            "--data-card", "DATA_CARD.md", "--out", str(out)]
    result = CliRunner().invoke(card_stage.main, args)
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert "library_name: peft" in text and "A LoRA adapter (rank 4, alpha 8, modules q_proj, v_proj)" in text
    assert "license: apache-2.0" in text and "base_model: medtune/tiny-llama" in text

    p = yaml.safe_load((in_workdir / "params.yaml").read_text())
    p["card"]["licenses"] = {}  # a base whose license params do not record: said so, not guessed
    (in_workdir / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    try:
        assert CliRunner().invoke(card_stage.main, args).exit_code == 0
    finally:
        p["card"]["licenses"] = {"medtune/tiny-llama": "apache-2.0"}
        (in_workdir / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    text = out.read_text()
    assert "license: other" in text and "not recorded for `medtune/tiny-llama`" in text
    missing = CliRunner().invoke(card_stage.main, ["--model", str(tiny_adapter), "--eval-base", "params.yaml",
                                                   "--eval-tuned", "metrics/eval_tuned.json", "--data-card", "DATA_CARD.md"])
    assert missing.exit_code == 1 and "params.yaml:1: malformed JSON" in missing.output


def test_push_dry_run_lists_exactly_what_would_be_uploaded(in_workdir, tiny_adapter, merged):
    args = ["--adapter", str(tiny_adapter), "--repo-id", "me/medtune-tiny", "--dry-run", "--eval-base", "metrics/eval_base.json",
            "--eval-tuned", "metrics/eval_tuned.json", "--data-card", "DATA_CARD.md"]
    result = CliRunner().invoke(push.main, args)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("would upload") and "me/medtune-tiny" in lines[0]
    listed = {line.split("\t")[0].strip(): int(line.split("\t")[1].replace(",", "")) for line in lines[1:]}
    files = {p.name for p in tiny_adapter.iterdir() if p.is_file()}
    assert set(listed) == files  # every adapter file, README.md being the new card
    assert listed["adapter_model.safetensors"] == (tiny_adapter / "adapter_model.safetensors").stat().st_size
    assert listed["README.md"] != (tiny_adapter / "README.md").stat().st_size  # not peft's placeholder
    assert (tiny_adapter / "README.md").read_text() == "peft's placeholder card\n"  # the adapter folder is untouched

    merged_run = CliRunner().invoke(push.main, ["--model", str(merged), "--repo-id", "me/medtune-tiny-merged", "--dry-run"])
    assert merged_run.exit_code == 0, merged_run.output
    assert {line.split("\t")[0].strip() for line in merged_run.stdout.splitlines()[1:]} == {p.name for p in merged.iterdir()}


def test_push_without_dry_run_fails_in_one_line_when_the_hub_is_unreachable(in_workdir, merged, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never reach a real hub from a test
    result = CliRunner().invoke(push.main, ["--model", str(merged), "--repo-id", "me/medtune-tiny"])
    assert result.exit_code == 1 and "upload to me/medtune-tiny failed: OfflineModeIsEnabled" in result.output
    assert "Traceback" not in result.output
    no_card = CliRunner().invoke(push.main, ["--adapter", str(merged), "--repo-id", "me/x", "--dry-run"])
    assert no_card.exit_code == 2 and "--adapter needs --eval-base, --eval-tuned, --data-card" in no_card.output



def test_command_options_are_checked_before_anything_loads(in_workdir, tiny_adapter):
    result = CliRunner().invoke(chat.main, ["--adapter", str(tiny_adapter), "--max-new-tokens", "0", "--temperature", "-1", "q"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "--max-new-tokens: Input should be greater than 0" in result.output and "temperature: must be in [0, 2]" not in result.output
    result = CliRunner().invoke(chat.main, ["--adapter", str(tiny_adapter), "--max-new-tokens", "50", "--max-new-tokens-cap", "40",
                                            "--temperature", "3", "q"])
    assert result.exit_code == 2 and "max-new-tokens: must be <= max-new-tokens-cap" in result.output
    assert "temperature: must be in [0, 2]" in result.output


def test_card_params_typos_get_a_did_you_mean(tiny_model):
    p = tiny_params(tiny_model)
    p["card"]["licence"] = "mit"
    assert any("card.licence: unknown key (did you mean 'card.licenses'?)" in x for x in params.check_all(p))


def test_api_works_with_the_official_openai_client(api, workdir, tiny_model, tiny_adapter, monkeypatch):
    import openai

    monkeypatch.chdir(workdir)
    client = openai.OpenAI(base_url=f"{api}/v1", api_key="unused", max_retries=0)
    want = expected_answer(tiny_model, tiny_adapter, QUESTION, 12).strip()
    messages = [{"role": "user", "content": QUESTION}]
    whole = client.chat.completions.create(model="tuned", messages=messages)
    assert whole.choices[0].message.content.strip() == want and whole.usage.completion_tokens > 0
    stream = client.chat.completions.create(model="tuned", messages=messages, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices).strip() == want
    assert [m.id for m in client.models.list()] == ["tuned", "base"]
    with pytest.raises(openai.BadRequestError, match="max_tokens must be between 1 and 40"):
        client.chat.completions.create(model="tuned", messages=messages, max_tokens=500)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-4o", messages=messages)


def test_tokens_never_reach_the_model_card(in_workdir, tmp_path, tiny_adapter, monkeypatch):
    secret = "hf_SECRETtoken1234567890"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    out = tmp_path / "card.md"
    result = CliRunner().invoke(card_stage.main, ["--model", str(tiny_adapter), "--eval-base", "metrics/eval_base.json",
                                                  "--eval-tuned", "metrics/eval_tuned.json", "--data-card", "DATA_CARD.md",
                                                  "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert secret not in out.read_text() and secret not in result.output

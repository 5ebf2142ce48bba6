"""The GGUF export (medtune/llamacpp.py, medtune/ollama.py, the `export` stage): tiny Gemma 3 and Llama models written
as GGUF and loaded back through transformers' own GGUF loader; a perturbed weight, a wrong convention and flipped
bytes each fail the parity check, and the stage then writes nothing; an architecture or a tokenizer it cannot write
fails with one line naming it; the Modelfile's TEMPLATE renders a question byte for byte as format does; and
`dvc artifacts get` fetches a version of the merged model from the local remote in a fresh clone.
ollama and llama.cpp are not installed here: what they would read is checked through transformers and gguf.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from medtune import llamacpp, params
from medtune.console import MedtuneError
from medtune.models import load_model, load_tokenizer, stop_token_ids
from medtune.ollama import modelfile
from medtune.params import ExportParams
from medtune.prompts import question_prompt
from medtune.stages import export
from tests.conftest import REPO, tiny_params
from tests.helpers import QUESTION, dvc, format_params, model_params, ran

CARD = {"name": "tiny medtune merged", "description": "a test model. Not medical advice.", "license": "apache-2.0",
        "tags": ["medtune", "gguf"], "languages": ["en"], "base_model": "medtune/tiny"}


def export_params(**kw) -> ExportParams:
    p = yaml.safe_load((REPO / "params.yaml").read_text())["export"]
    return ExportParams(**p | {"enabled": True, "check_prompts": 3, "check_new_tokens": 6} | kw)


def prompts_for(tok) -> list[str]:
    questions = [QUESTION, "Is cystic fibrosis inherited? Who gets it, and why?", "What causes  high blood   pressure ?"]
    return [question_prompt(tok, format_params(), q) for q in questions]


def merged_folder(model: Path, tmp_path: Path) -> Path:
    """The tiny model as the merge stage leaves a merged model: with a model card (README.md)."""
    out = tmp_path / "merged"
    shutil.copytree(model, out)
    (out / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: medtune/tiny\nmodel_name: tiny medtune merged\n"
                                   "language: [en]\ntags: [medtune, merged]\n---\n\n# tiny\n")
    return out


def formatted_data(tmp_path: Path, tok) -> Path:
    d = tmp_path / "formatted"
    d.mkdir()
    (d / "test.jsonl").write_text("".join(json.dumps({"id": f"q{i}", "prompt": p}) + "\n" for i, p in enumerate(prompts_for(tok))))
    return d


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_each_type_round_trips_through_transformers_gguf_loader(tiny_gguf_models, tmp_path, arch):
    src = tiny_gguf_models[arch]
    m = model_params(src)
    tok, model = load_tokenizer(src, m), load_model(src, m, "float32").eval()
    from transformers import AutoConfig
    from transformers.integrations.gguf import read_gguf_metadata

    config, prompts = AutoConfig.from_pretrained(src), prompts_for(tok)
    ref = llamacpp.reference(model, tok, prompts, 6)
    assert ref["stops"] == [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")]
    for qtype, atol in (("f32", 1e-5), ("f16", 0.01), ("bf16", 0.05), ("q8_0", 0.1)):
        path = tmp_path / f"model-{qtype}.gguf"
        info = llamacpp.write_gguf(src, config, tok, path, qtype, ref["stops"], CARD)
        assert info["arch"] == {"gemma3": "gemma3", "llama": "llama"}[arch] and info["tokenizer"] == "llama"
        check = llamacpp.check_gguf(path, qtype, ref, prompts, 6, atol, "cpu")
        assert check["passed"] and check["tokens_identical"] and check["stop_token_ids"] == ref["stops"], (qtype, check)
        if qtype == "f32":  # exact: every convention (norm + 1, q/k permutation, tied output) undone by the reader
            assert check["max_abs_logit_diff"] == 0.0
        if qtype in llamacpp.FLOAT_TYPES:
            assert check["greedy_answers_identical"]
    meta, tensors = read_gguf_metadata(str(tmp_path / "model-q8_0.gguf"))
    assert meta["general.license"] == "apache-2.0" and meta["general.base_model.0.name"] == "medtune/tiny"
    assert meta["general.name"] == CARD["name"] and meta["tokenizer.chat_template"] == tok.chat_template
    assert meta["tokenizer.ggml.eot_token_id"] == tok.convert_tokens_to_ids("<end_of_turn>")
    assert ("output.weight" in tensors) == (arch == "llama")  # gemma ties its embeddings
    sizes = {t: (tmp_path / f"model-{t}.gguf").stat().st_size for t in ("f32", "f16", "q8_0")}
    assert sizes["f32"] > sizes["f16"] > sizes["q8_0"]


def test_the_stage_writes_checked_gguf_files_a_modelfile_and_metrics(tiny_gguf_models, tmp_path, monkeypatch):
    src = merged_folder(tiny_gguf_models["gemma3"], tmp_path)
    data = formatted_data(tmp_path, load_tokenizer(src, model_params(src)))
    p = tiny_params(src)
    p["export"].update(enabled=True, check_prompts=3, check_new_tokens=6)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(export.main, ["--merged", str(src), "--data", str(data), "--out", "gguf", "--metrics", "export.json"])
    assert result.exit_code == 0, result.output
    assert sorted(f.name for f in (tmp_path / "gguf").iterdir()) == ["Modelfile", "model-f16.gguf", "model-q8_0.gguf"]
    metrics = json.loads((tmp_path / "export.json").read_text())
    assert metrics["passed"] and metrics["enabled"] and metrics["prompts"] == 3 and metrics["wall_s"] > 0
    for qtype in ("f16", "q8_0"):
        assert metrics[qtype]["passed"] and metrics[qtype]["bytes"] == (tmp_path / "gguf" / f"model-{qtype}.gguf").stat().st_size
        assert metrics[qtype]["write_s"] >= 0 and metrics[qtype]["check_s"] > 0
    assert metrics["f16"]["greedy_answers_identical"] and metrics["stop_tokens"] == ["<eos>", "<end_of_turn>"]
    text = (tmp_path / "gguf" / "Modelfile").read_text()
    assert "FROM ./model-f16.gguf" in text and 'LICENSE """apache-2.0' in text and "Not medical advice" in text


def test_a_disabled_export_records_that_it_skipped(tmp_path):
    metrics = export.run(export_params(enabled=False), None, None, tmp_path, tmp_path, tmp_path / "gguf")
    assert metrics["enabled"] is False and "export.enabled is false" in metrics["skipped"]
    assert [p.name for p in (tmp_path / "gguf").iterdir()] == ["README.md"]


def perturbed(name, data, config, arch):
    data = llamacpp.tensor_values(name, data, config, arch)
    return data + 0.5 if name == "model.layers.0.self_attn.v_proj.weight" else data


def norms_not_shifted(name, data, config, arch):  # Gemma's norms written as transformers holds them, not + 1
    return data


@pytest.mark.parametrize("transform", [perturbed, norms_not_shifted])
def test_a_wrong_weight_fails_the_check_and_the_stage_writes_nothing(tiny_gguf_models, tmp_path, transform):
    src = merged_folder(tiny_gguf_models["gemma3"], tmp_path)
    m = model_params(src)
    data = formatted_data(tmp_path, load_tokenizer(src, m))
    with pytest.raises(MedtuneError, match=r"^export check failed for f16: max \|logit diff\| .*; no GGUF was written$"):
        export.run(export_params(), m, format_params(), src, data, tmp_path / "gguf", transform=transform)
    assert not (tmp_path / "gguf").exists() and not list(tmp_path.glob(".gguf*"))


def test_flipped_bytes_in_a_written_file_fail_the_check(tiny_gguf_models, tmp_path):
    import gguf

    src = tiny_gguf_models["llama"]
    m = model_params(src)
    tok, model = load_tokenizer(src, m), load_model(src, m, "float32").eval()
    from transformers import AutoConfig

    prompts = prompts_for(tok)
    ref = llamacpp.reference(model, tok, prompts, 6)
    path = tmp_path / "model-f16.gguf"
    llamacpp.write_gguf(src, AutoConfig.from_pretrained(src), tok, path, "f16", ref["stops"], CARD)
    assert llamacpp.check_gguf(path, "f16", ref, prompts, 6, 0.01, "cpu")["passed"]
    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.attn_q.weight")
    raw = bytearray(path.read_bytes())
    start = tensor.data_offset + 64
    raw[start:start + 256] = bytes(b ^ 0x7C for b in raw[start:start + 256])  # exponent bits of 128 f16 weights
    path.write_bytes(bytes(raw))
    check = llamacpp.check_gguf(path, "f16", ref, prompts, 6, 0.01, "cpu")
    assert not check["passed"] and check["max_abs_logit_diff"] > 0.01


def test_an_architecture_or_tokenizer_it_cannot_write_fails_with_one_line_naming_it(tiny_model, tmp_path):
    from transformers import AutoConfig, GPT2Config

    folder = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=8, n_head=2, architectures=["GPT2LMHeadModel"]).save_pretrained(folder)
    with pytest.raises(MedtuneError) as e:
        export.run(export_params(), model_params(folder), format_params(), folder, tmp_path, tmp_path / "gguf")
    assert str(e.value) == "GGUF export: architecture gpt2 (GPT2LMHeadModel) cannot be written; supported: gemma3_text, llama"
    assert not (tmp_path / "gguf").exists()
    with pytest.raises(MedtuneError, match=r"^GGUF export: a WordLevel tokenizer .* cannot be written; supported: .*\)$"):
        llamacpp.vocab_of(load_tokenizer(tiny_model, model_params(tiny_model)), AutoConfig.from_pretrained(tiny_model))


def render_go(template: str, values: dict[str, str]) -> str:
    """Ollama's Go templates, the subset the Modelfile uses: {{ .X }} and {{ if .X }}...{{ else }}...{{ end }}."""
    out, stack, pos = [], [], 0  # stack: whether each enclosing branch is being rendered
    for m in re.finditer(r"\{\{\s*(.*?)\s*\}\}", template):
        if all(stack):
            out.append(template[pos:m.start()])
        pos, action = m.end(), m.group(1)
        if (cond := re.fullmatch(r"if \.(\w+)", action)) is not None:
            stack.append(bool(values[cond.group(1)]))
        elif action == "else":
            stack[-1] = not stack[-1]
        elif action == "end":
            stack.pop()
        elif (var := re.fullmatch(r"\.(\w+)", action)) is not None:
            out.append(values[var.group(1)] if all(stack) else "")
        else:
            raise AssertionError(f"template action outside the subset: {action!r}")
    assert not stack
    return "".join(out) + template[pos:]


def parse_modelfile(text: str) -> dict:
    """FROM, TEMPLATE, SYSTEM and the PARAMETER stop lines of a Modelfile (triple-quoted values kept verbatim)."""
    fields = {k: m.group(1) for k in ("TEMPLATE", "SYSTEM", "LICENSE") if (m := re.search(rf'^{k} """(.*?)"""$', text, re.M | re.S))}
    return fields | {"FROM": re.search(r"^FROM (.+)$", text, re.M).group(1),
                     "stops": re.findall(r'^PARAMETER stop "(.*)"$', text, re.M)}


@pytest.mark.parametrize("layout", [{}, {"system_prompt": "You answer medical questions carefully."},
                                    {"template": "qa"}, {"template": "alpaca", "system_prompt": "Answer briefly."}])
def test_the_modelfile_template_renders_a_question_as_format_does(tiny_gguf_models, layout):
    src = tiny_gguf_models["gemma3"]
    m = model_params(src)
    tok, fmt = load_tokenizer(src, m), format_params(**layout)
    stops = stop_token_ids(tok, load_model(src, m, "float32"))
    mf = parse_modelfile(modelfile(tok, fmt, stops, "model-f16.gguf", CARD))
    assert mf["FROM"] == "./model-f16.gguf" and mf["stops"] == tok.convert_ids_to_tokens(stops) == ["<eos>", "<end_of_turn>"]
    assert mf.get("SYSTEM", "") == fmt.system_prompt
    for question in (QUESTION, "Is it inherited?\nAnd is it common?"):
        rendered = render_go(mf["TEMPLATE"], {"System": mf.get("SYSTEM", ""), "Prompt": question})
        assert rendered.encode() == question_prompt(tok, fmt, question).encode()
    # a system prompt set in Ollama (`/set system`) renders as training would have with it
    custom = render_go(mf["TEMPLATE"], {"System": "Be brief.", "Prompt": QUESTION})
    assert custom == question_prompt(tok, fmt.model_copy(update={"system_prompt": "Be brief."}), QUESTION)


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def test_dvc_artifacts_get_fetches_a_merged_model_version_from_the_remote_in_a_fresh_clone(repo_copy, tmp_path):
    remote = tmp_path / "remote"
    (repo_copy / ".dvc" / "config").write_text((REPO / ".dvc" / "config").read_text())
    dvc(repo_copy, "remote", "modify", "--local", "local", "url", str(remote))
    assert "export" in ran(dvc(repo_copy, "repro"))
    skipped = json.loads((repo_copy / "metrics" / "export.json").read_text())
    assert skipped["enabled"] is False and (repo_copy / "models" / "gguf" / "README.md").exists()
    git(repo_copy, "add", "-A")
    git(repo_copy, "commit", "-qm", "run")
    git(repo_copy, "tag", "-a", "merged@v1.0.0", "-m", "the merged model, version 1.0.0")
    dvc(repo_copy, "push")

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo_copy), str(clone))
    assert not (clone / "models" / "merged").exists()  # git holds only the pointers
    out = dvc(clone, "artifacts", "get", str(clone), "merged", "--rev", "v1.0.0", "--remote-config", f"url={remote}",
              "-o", str(tmp_path / "got"))
    assert "Downloaded" in out
    for f in ("model.safetensors", "README.md", "tokenizer.json"):
        assert (tmp_path / "got" / f).read_bytes() == (repo_copy / "models" / "merged" / f).read_bytes(), f
    names = yaml.safe_load((clone / "dvc.yaml").read_text())["artifacts"]
    assert {n: a["path"] for n, a in names.items()} == {"adapter": "models/adapter", "merged": "models/merged",
                                                        "gguf": "models/gguf"}


def test_the_export_params_are_checked(tmp_path):
    def load(**export_kw):
        data = yaml.safe_load((REPO / "params.yaml").read_text())
        data["export"] |= export_kw
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        return params.load("export", path=tmp_path / "params.yaml")

    assert load()[0].types == {"f16": 0.25, "q8_0": 8.0}  # the order is kept: the Modelfile names the first
    for bad in ({"q4_k": 1.0}, {}, {"f16": -0.1}, ["f16", "q8_0"]):
        with pytest.raises(MedtuneError, match=r"params.yaml:\d+: export.types"):
            load(types=bad)

"""Every dataset shape of docs/data.md's "Data shapes" section goes through fetch -> clean -> split -> format
(-> report) from params alone, on real sample rows, through the CLI; the same params give byte-identical files.

The params are the documentation's own yaml blocks, so the documentation is what is tested.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from medtune.io import read_jsonl
from medtune.splitting import SPLITS
from medtune.stages import clean, fetch, report, split
from medtune.stages import format as format_stage
from tests.conftest import ASSETS, REPO, tiny_params
from tests.helpers import dvc, ran

# README source paths -> the samples in tests/assets (see tests/assets/README.md)
SAMPLES = {"data/source/medquad_xml": ASSETS / "medquad_xml", "data/source/chatdoctor.jsonl": ASSETS / "chatdoctor_tiny.jsonl",
           "data/source/pubmedqa.jsonl": ASSETS / "pubmedqa_tiny.jsonl", "data/source/medmcqa.jsonl": ASSETS / "medmcqa_handmade.jsonl",
           "data/source/dialogues.jsonl": ASSETS / "dialogue_tiny.jsonl",
           "data/source/medquad_sample.jsonl": REPO / "data/source/medquad_sample.jsonl"}
# The samples are a few rows: larger val/test shares so each split gets some. The XML sample is four documents,
# too few to split by focus/url.
TINY_SPLIT = {"val_frac": 0.3, "test_frac": 0.3}
EXTRA = {"medquad_xml": {"split": {"group_by": []}}}
DEFAULTS = yaml.safe_load((REPO / "params.yaml").read_text())
SHAPES = ["medquad_xml", "instruction", "context_question_answer", "mcq", "mcq_fixed_options", "dialogue", "mixed"]
STAGE_OUTPUTS = ["data/raw/records.jsonl", "data/raw/manifest.json", "data/clean/records.jsonl", "data/clean/summary.json",
                 "metrics/clean.json", *[f"data/split/{s}.jsonl" for s in SPLITS], "data/split/summary.json",
                 "metrics/split.json", *[f"data/formatted/{s}.jsonl" for s in SPLITS], "data/formatted/summary.json",
                 "metrics/format.json",
                 "metrics/data_quality.json", "reports/data_quality.json", "reports/data_quality.md"]


def doc_blocks() -> dict[str, dict]:
    text = (REPO / "docs" / "data.md").read_text()
    blocks = re.findall(r"```yaml\n# shape: (\w+)\n(.*?)```", text, flags=re.S)
    return {name: yaml.safe_load(body) for name, body in blocks}


def shape_params(name: str, tiny_model: Path, root: Path) -> dict:
    p = tiny_params(tiny_model)
    p["split"].update(TINY_SPLIT)
    p["format"].update({k: DEFAULTS["format"][k] for k in ("max_answer_tokens", "max_length")})  # no training here
    for part in (doc_blocks()[name], EXTRA.get(name, {})):
        for section, values in part.items():
            p[section].update(values)
    for src in [p["fetch"]] + p["fetch"]["mix"]:  # copy the sample where the documented path points
        dst = root / src["source"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if SAMPLES[src["source"]].is_dir() else shutil.copy)(SAMPLES[src["source"]], dst)
    return p


def run_stages(root: Path) -> None:
    """The data stages as dvc.yaml runs them."""
    steps = [
        (fetch.main, "--out data/raw --metrics metrics/fetch.json"),
        (clean.main, "--in data/raw --out data/clean --metrics metrics/clean.json"),
        (split.main, "--in data/clean --out data/split --metrics metrics/split.json"),
        (format_stage.main, "--in data/split --out data/formatted --metrics metrics/format.json"),
        (report.main, "--raw data/raw --clean data/clean --split data/split --data data/formatted "
                      "--out metrics/data_quality.json "
                      "--details reports/data_quality.json --markdown reports/data_quality.md"),
    ]
    for cmd, args in steps:
        result = CliRunner().invoke(cmd, args.split())
        assert result.exit_code == 0, f"{cmd.name}: {result.output}"


def formatted(root: Path) -> dict[str, list[dict]]:
    return {s: read_jsonl(root / "data/formatted" / f"{s}.jsonl") for s in SPLITS}


def test_readme_documents_every_shape():
    assert sorted(doc_blocks()) == sorted(SHAPES)


@pytest.mark.parametrize("shape", SHAPES)
def test_shape_runs_through_the_data_stages_from_params_alone(shape, tiny_model, tmp_path, monkeypatch):
    roots = []
    for run in ("a", "b"):
        root = tmp_path / run
        root.mkdir()
        (root / "params.yaml").write_text(yaml.safe_dump(shape_params(shape, tiny_model, root)))
        monkeypatch.chdir(root)
        run_stages(root)
        roots.append(root)
    for f in STAGE_OUTPUTS:  # same params and seed: byte-identical outputs; metrics the same but for the wall time
        a, b = ((r / f).read_bytes() for r in roots)
        if f.startswith("metrics/"):
            a, b = ({k: v for k, v in json.loads(x).items() if k != "wall_s"} for x in (a, b))
        assert a == b, f
    root = roots[0]
    rows = formatted(root)
    every = [r for s in SPLITS for r in rows[s]]
    quality = json.loads((root / "reports/data_quality.json").read_text())
    key = json.loads((root / "metrics/data_quality.json").read_text())
    assert all(not isinstance(v, dict) for v in key.values()) and {"rows_train", "dropped", "duplicates", "leakage_ok",
                                                                    "truncation_rate", "phi_flagged"} <= set(key)
    assert quality["leakage_ok"] and quality["end_token_trained"] == 1.0
    assert quality["rows_train"] == len(rows["train"]) > 0 and quality["rows_test"] == len(rows["test"]) > 0
    assert all(r["completion"].endswith("<eos>") and r["prompt"] and r["reference"] for r in every)
    md = (root / "reports/data_quality.md").read_text()  # three examples with the trained tokens marked
    assert md.count("end token `<eos>` trained: yes") == min(3, len(rows["train"])) and md.count("⟦<eos>⟧") >= 1
    CHECKS[shape](root, rows, every, quality)


def check_medquad_xml(root, rows, every, quality):
    cleaned = {r["id"]: r for r in read_jsonl(root / "data/clean/records.jsonl")}
    assert len(read_jsonl(root / "data/raw/records.jsonl")) == 16
    assert "(Graves' disease," in cleaned["6_NINDS_QA/0000209/1"]["answer"]  # XML entity decoded
    r = cleaned["6_NINDS_QA/0000172/3"]  # <collection>/<file>/<pid>, as in the project's JSON-lines MedQuAD
    assert (r["question"], r["qtype"], r["focus"], r["source"]) == (
        "What is the outlook for Klver-Bucy Syndrome ?", "outlook", "Klver-Bucy Syndrome", "6_NINDS_QA")
    assert r["answer"].startswith("There is no cure for Klver-Bucy syndrome.") and r["url"].endswith("kluver_bucy.htm")
    assert all(r["prompt"].startswith("### Question:\n") and r["prompt"].endswith("### Answer:\n") for r in every)


def check_instruction(root, rows, every, quality):
    r = rows["train"][0]
    assert r["prompt"].startswith("Below is an instruction")
    assert "### Instruction:\nIf you are a doctor, please answer the medical questions" in r["prompt"]
    assert f"### Input:\n{r['question']}\n\n### Response:\n" in r["prompt"]
    raw = {x["id"]: x for x in read_jsonl(ASSETS / "chatdoctor_tiny.jsonl")}
    assert r["reference"] == " ".join(raw[r["id"]]["output"].split())  # runs of spaces folded by clean


def check_context_question_answer(root, rows, every, quality):
    r = rows["train"][0]
    raw = {x["id"]: x for x in read_jsonl(ASSETS / "pubmedqa_tiny.jsonl")}[r["id"]]
    assert raw["contexts"][0][:60] in r["prompt"] and r["question"] == raw["question"] and r["year"] == raw["year"]
    assert r["prompt"].index(raw["contexts"][-1][:40]) < r["prompt"].index(raw["question"])  # context, then the question
    fm = json.loads((root / "data/formatted/summary.json").read_text())
    assert sum(fm[s]["rows"] for s in SPLITS) == 24


def check_mcq(root, rows, every, quality):
    c = json.loads((root / "data/clean/summary.json").read_text())
    assert c["dropped"] == {"bad_correct_option": 1, "bad_options": 1}  # mcq/6: cop 7; mcq/7: option B missing
    assert c["changed"] == {"explanation_removed": 2}  # mcq/2 "Ans. is 'b' i.e., Small intestine", mcq/5 "B"
    by_id = {r["id"]: r for r in every}
    assert by_id["mcq/1"]["options"] == {"A": "Vitamin A", "B": "Vitamin B12", "C": "Vitamin C", "D": "Vitamin D"}
    assert by_id["mcq/1"]["correct"] == "C" and by_id["mcq/1"]["completion"].startswith("Answer: C. Vitamin C\nExplanation: Scurvy")
    assert by_id["mcq/2"]["completion"] == "Answer: B. Small intestine<eos>"
    assert by_id["mcq/4"]["prompt"] == "Question: Drug of choice for anaphylactic shock is:\nA. Adrenaline\nB. Atropine\nC. Hydrocortisone\nD. Antihistamine\n"
    assert sum(quality["counts"]["correct"][s].get("B", 0) for s in SPLITS) == 5  # mcq/2, 5, 8, 9, 10


def check_mcq_fixed_options(root, rows, every, quality):
    raw = {x["id"]: x for x in read_jsonl(ASSETS / "pubmedqa_tiny.jsonl")}
    for r in every:
        assert r["options"] == {"A": "yes", "B": "no", "C": "maybe"}
        assert r["options"][r["correct"]] == raw[r["id"]]["final_decision"]
        target = f"Answer: {r['correct']}. {raw[r['id']]['final_decision']}\nExplanation: "
        assert r["reference"].startswith(target)
        assert r["completion"].startswith(target) or r["answer_truncated"]  # the tiny tokenizer cannot decode a cut answer


def check_dialogue(root, rows, every, quality):
    raw = {x["id"]: x for x in read_jsonl(ASSETS / "dialogue_tiny.jsonl")}
    for r in every:
        turns = raw[r["id"]]["messages"]
        assert r["question"] == turns[-2]["content"] and r["reference"] == turns[-1]["content"]
        assert turns[0]["content"] in r["prompt"] and turns[1]["content"] in r["prompt"]  # earlier turns in the prompt
        assert r["prompt"].endswith("<start_of_turn>model\n") and turns[-1]["content"] not in r["prompt"]
        assert r["completion"].startswith(turns[-1]["content"][:30])


def check_mixed(root, rows, every, quality):
    raw = read_jsonl(root / "data/raw/records.jsonl")
    assert len(raw) == 300 and {r["collection"] for r in raw} == {"medquad_sample", "chatdoctor"}
    assert all(r["id"].startswith(r["collection"] + "/") for r in raw)
    assert set(quality["counts"]["collection"]["train"]) <= {"medquad_sample", "chatdoctor"}


CHECKS = {name: globals()[f"check_{name}"] for name in SHAPES}


def test_report_figures_show_in_dvc_exp_show(repo_copy):
    """`dvc repro report` runs only the data stages; `dvc exp show` lists the report's key figures."""

    assert ran(dvc(repo_copy, "repro", "report")) == {"fetch", "clean", "split", "format", "report"}
    shown = json.dumps(json.loads(dvc(repo_copy, "exp", "show", "--json")))
    for key in ("rows_train", "dropped", "duplicates", "leakage_ok", "truncation_rate", "phi_flagged"):
        assert f'"{key}"' in shown, key
    assert "metrics/data_quality.json" in shown and (repo_copy / "reports/data_quality.md").exists()

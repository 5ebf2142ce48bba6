"""fetch -> clean -> split -> format on real MedQuAD rows, through `run()` and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from stages import clean, fetch, format as format_stage, split
from stages.common import BaseParams, MedtuneError, read_jsonl
from tests.conftest import ASSETS, tiny_params

BASE = BaseParams(seed=7)
COLUMNS = {"question": "question", "answer": "answer", "focus": "focus", "source": "source", "url": "url"}
REPEAT = yaml.safe_load((Path(__file__).parent.parent / "params.yaml").read_text())["clean"]["explanation_repeat_regex"]
DISCLAIMER = {"enabled": False, "text": "Not medical advice; see a clinician.", "position": "end", "fraction": 1.0}


def fetch_params(source, **kw) -> fetch.FetchParams:
    return fetch.FetchParams(**{"source": str(source), "revision": None, "split": "train", "columns": COLUMNS,
                                "id_column": "id", "option_columns": [], "fixed_options": [], "answer_key": "letter",
                                "mix": [], "max_rows": None} | kw)


def clean_params(**kw) -> clean.CleanParams:
    return clean.CleanParams(**{"min_question_chars": 10, "max_question_chars": 2000, "min_answer_chars": 40,
                                "max_answer_chars": 4000, "dedupe": True, "near_dup_threshold": 0.9,
                                "strip_boilerplate": [], "explanation_repeat_regex": REPEAT, "select_longest": None,
                                "select_field": "explanation", "phi": "keep", "max_drop_frac": 0.5} | kw)


def split_params(**kw) -> split.SplitParams:
    return split.SplitParams(**{"val_frac": 0.2, "test_frac": 0.2, "group_by": ["focus", "url"], "near_dup_threshold": 0.9,
                                "test_sources": []} | kw)


def format_params(**kw) -> format_stage.FormatParams:
    return format_stage.FormatParams(**{"template": "chat", "system_prompt": "", "max_answer_tokens": 48, "max_length": 96,
                                        "overflow": "drop", "disclaimer": DISCLAIMER} | kw)


@pytest.fixture
def raw_dir(tmp_path) -> Path:
    fetch.run(fetch_params(ASSETS / "medquad_tiny.jsonl"), BASE, tmp_path / "raw")
    return tmp_path / "raw"


@pytest.fixture
def clean_dir(tmp_path, raw_dir) -> Path:
    clean.run(clean_params(), raw_dir, tmp_path / "clean")
    return tmp_path / "clean"


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet", "saved"])
def test_fetch_reads_every_local_format(tmp_path, tiny_rows, suffix):
    import datasets

    ds = datasets.Dataset.from_list(tiny_rows)
    src = tmp_path / f"src{suffix}"
    {".jsonl": lambda: ds.to_json(src, lines=True), ".csv": lambda: ds.to_csv(src), ".parquet": lambda: ds.to_parquet(src),
     "saved": lambda: ds.save_to_disk(src)}[suffix]()
    summary = fetch.run(fetch_params(src), BASE, tmp_path / "raw")
    rows = read_jsonl(tmp_path / "raw" / "records.jsonl")
    assert summary["rows"] == len(tiny_rows) == len(rows)
    assert rows[0]["question"] == tiny_rows[0]["question"] and rows[0]["id"] == tiny_rows[0]["id"]
    manifest = json.loads((tmp_path / "raw" / "manifest.json").read_text())
    assert manifest["rows"] == len(rows) and len(manifest["sha256"]) == 64


def test_fetch_subset_is_seeded(tmp_path):
    a = fetch.run(fetch_params(ASSETS / "medquad_tiny.jsonl", max_rows=10), BASE, tmp_path / "a")
    fetch.run(fetch_params(ASSETS / "medquad_tiny.jsonl", max_rows=10), BASE, tmp_path / "b")
    assert a["rows"] == 10
    assert (tmp_path / "a" / "records.jsonl").read_bytes() == (tmp_path / "b" / "records.jsonl").read_bytes()


def test_fetch_hub_source_offline_says_how_to_provide_it(tmp_path):
    with pytest.raises(MedtuneError, match="save_to_disk"):
        fetch.run(fetch_params("hf:nobody/no-such-dataset", revision="abc123"), BASE, tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_fetch_missing_column_names_it(tmp_path, tiny_rows):
    src = tmp_path / "x.jsonl"
    src.write_text("".join(json.dumps({"q": r["question"], "answer": r["answer"]}) + "\n" for r in tiny_rows))
    with pytest.raises(MedtuneError, match=r"missing columns question <- 'question'"):
        fetch.run(fetch_params(src, columns={"question": "question", "answer": "answer"}, id_column=None), BASE, tmp_path / "raw")


def test_fetch_malformed_json_names_the_line(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"question": "What is X?", "answer": "X is a thing that exists in the world."}\n{"question": oops}\n')
    with pytest.raises(MedtuneError, match=r"bad.jsonl:2: malformed JSON"):
        fetch.run(fetch_params(src, id_column=None, columns={"question": "question", "answer": "answer"}), BASE, tmp_path / "raw")


def test_clean_counts_every_drop(tmp_path, raw_dir, tiny_rows):
    summary = clean.run(clean_params(), raw_dir, tmp_path / "clean")
    assert summary["dropped"] == {"duplicate": 1, "short_answer": 1}
    assert summary["rows_in"] == len(tiny_rows) == summary["rows_out"] + 2


def test_clean_fails_when_everything_is_dropped(tmp_path, raw_dir):
    with pytest.raises(MedtuneError, match="every row was dropped"):
        clean.run(clean_params(min_answer_chars=3000, max_answer_chars=4000), raw_dir, tmp_path / "clean")
    assert not (tmp_path / "clean").exists()


def test_clean_normalises_html_and_whitespace():
    assert clean.normalise("A &amp; B <b>bold</b>\t\tx \n\n\n\ny") == "A & B bold x\n\ny"


def test_split_is_deterministic_grouped_and_leak_free(tmp_path, clean_dir):
    p = split_params()
    a = split.run(p, BASE, clean_dir, tmp_path / "a")
    b = split.run(p, BASE, clean_dir, tmp_path / "b")
    assert a == b and a["train"] + a["val"] + a["test"] == len(read_jsonl(clean_dir / "records.jsonl"))
    for s in split.SPLITS:
        assert (tmp_path / "a" / f"{s}.jsonl").read_bytes() == (tmp_path / "b" / f"{s}.jsonl").read_bytes()
    focus = {s: {r["focus"] for r in read_jsonl(tmp_path / "a" / f"{s}.jsonl")} for s in split.SPLITS}
    assert not focus["train"] & focus["test"] and not focus["train"] & focus["val"]


def test_split_keeps_same_question_together():
    rows = [{"id": "a", "question": "What is X ?", "focus": "x1"}, {"id": "b", "question": "what is x?", "focus": "x2"},
            {"id": "c", "question": "What is Y?", "focus": "x2"}, {"id": "d", "question": "What is Z?", "focus": "z"}]
    roots = split.group_rows(rows, ["focus"])
    assert roots[0] == roots[1] == roots[2] != roots[3]


def test_format_renders_prompt_and_completion_that_training_and_eval_share(tmp_path, clean_dir, tiny_model):
    from stages.modeling import ModelParams

    split.run(split_params(), BASE, clean_dir, tmp_path / "split")
    m = ModelParams(base=str(tiny_model), revision=None, chat_template="gemma3_base", trust_remote_code=False)
    p = format_params(max_answer_tokens=12)
    summary = format_stage.run(p, m, tmp_path / "split", tmp_path / "fmt")
    row = read_jsonl(tmp_path / "fmt" / "train.jsonl")[0]
    assert row["prompt"].startswith("<start_of_turn>user\n") and row["prompt"].endswith("<start_of_turn>model\n")
    assert row["completion"].endswith("<eos>")
    assert summary["train"]["answers_truncated"] > 0  # 12 tokens is shorter than most answers
    # the prompt carries no BOS text: the tokenizer adds it, exactly once
    from stages.modeling import load_tokenizer

    ids = load_tokenizer(tiny_model, m)(row["prompt"] + row["completion"])["input_ids"]
    assert ids.count(2) == 1 and ids[0] == 2  # <bos> is id 2 in the tiny vocabulary


def write_params(path: Path, tiny_model: Path, **changes) -> None:
    p = tiny_params(tiny_model)
    for key, value in changes.items():
        section, name = key.split(".")
        p[section][name] = value
    path.write_text(yaml.safe_dump(p))


def test_cli_unknown_params_key_suggests_the_right_one(tmp_path, tiny_model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params.yaml", tiny_model, **{"split.val_fraction": 0.1})
    (tmp_path / "in").mkdir()
    result = CliRunner().invoke(split.main, ["--in", "in", "--out", "out", "--metrics", "m.json"])
    assert result.exit_code == 1
    assert "split.val_fraction: unknown key (did you mean 'split.val_frac'?)" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_cli_reports_every_params_problem_at_once(tmp_path, tiny_model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params.yaml", tiny_model, **{"clean.dedupe": "yes", "clean.max_drop_frac": 3})
    (tmp_path / "in").mkdir()
    result = CliRunner().invoke(clean.main, ["--in", "in", "--out", "out", "--metrics", "m.json"])
    assert result.exit_code == 1
    assert "clean.dedupe: expected bool" in result.output


def test_cli_missing_input_file_is_one_line(tmp_path, tiny_model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params.yaml", tiny_model, **{"fetch.source": "data/nope.jsonl"})
    result = CliRunner().invoke(fetch.main, ["--out", "raw"])
    assert result.exit_code == 1 and "data/nope.jsonl" in result.output and "not found" in result.output
    assert not (tmp_path / "raw").exists()


def test_cli_empty_dataset_fails_and_keeps_previous_output(tmp_path, tiny_model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params.yaml", tiny_model, **{"fetch.source": "empty.jsonl"})
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "records.jsonl").write_text("previous\n")
    result = CliRunner().invoke(fetch.main, ["--out", "raw"])
    assert result.exit_code == 1 and "empty.jsonl: file is empty" in result.output
    assert (tmp_path / "raw" / "records.jsonl").read_text() == "previous\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".raw")] == []

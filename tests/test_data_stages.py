"""fetch -> clean -> split -> format on real MedQuAD rows, through `run()` and the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from medtune import splitting
from medtune.cleaning import normalise
from medtune.console import MedtuneError
from medtune.dedup import NearDups
from medtune.io import read_jsonl
from medtune.models import local_revision
from medtune.params import BaseParams, ReportParams, TrainParams
from medtune.splitting import SPLITS, answer_sig, group_rows
from medtune.stages import clean, fetch, split
from medtune.stages import format as format_stage
from tests.conftest import ASSETS, tiny_params
from tests.helpers import (
    COLUMNS,
    clean_params,
    fetch_params,
    format_params,
    split_params,
)

BASE = BaseParams(seed=7)


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
    with pytest.raises(MedtuneError, match=r"'hf:nobody/aggregate' \(chatdoctor\) @ abc123: could not load"):
        fetch.run(fetch_params("hf:nobody/aggregate", revision="abc123", subset="chatdoctor"), BASE, tmp_path / "raw")
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
    assert normalise("A &amp; B <b>bold</b>\t\tx \n\n\n\ny") == "A & B bold x\n\ny"


def test_split_is_deterministic_grouped_and_leak_free(tmp_path, clean_dir):
    p = split_params()
    a = split.run(p, BASE, clean_dir, tmp_path / "a")
    b = split.run(p, BASE, clean_dir, tmp_path / "b")
    assert a == b and a["train"] + a["val"] + a["test"] == len(read_jsonl(clean_dir / "records.jsonl"))
    for s in SPLITS:
        assert (tmp_path / "a" / f"{s}.jsonl").read_bytes() == (tmp_path / "b" / f"{s}.jsonl").read_bytes()
    focus = {s: {r["focus"] for r in read_jsonl(tmp_path / "a" / f"{s}.jsonl")} for s in SPLITS}
    assert not focus["train"] & focus["test"] and not focus["train"] & focus["val"]


def test_split_keeps_same_question_together():
    rows = [{"id": "a", "question": "What is X ?", "focus": "x1"}, {"id": "b", "question": "what is x?", "focus": "x2"},
            {"id": "c", "question": "What is Y?", "focus": "x2"}, {"id": "d", "question": "What is Z?", "focus": "z"}]
    roots = group_rows(rows, ["focus"])
    assert roots[0] == roots[1] == roots[2] != roots[3]


def test_format_renders_prompt_and_completion_that_training_and_eval_share(tmp_path, clean_dir, tiny_model):
    from medtune.params import ModelParams

    split.run(split_params(), BASE, clean_dir, tmp_path / "split")
    m = ModelParams(base=str(tiny_model), revision=local_revision(tiny_model), chat_template="gemma3_base", trust_remote_code=False)
    p = format_params(max_answer_tokens=12)
    summary = format_stage.run(p, m, tmp_path / "split", tmp_path / "fmt")
    row = read_jsonl(tmp_path / "fmt" / "train.jsonl")[0]
    assert row["prompt"].startswith("<start_of_turn>user\n") and row["prompt"].endswith("<start_of_turn>model\n")
    assert row["completion"].endswith("<eos>")
    assert summary["train"]["answers_truncated"] > 0  # 12 tokens is shorter than most answers
    # the prompt carries no BOS text: the tokenizer adds it, exactly once
    from medtune.models import load_tokenizer

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
    assert "clean.dedupe: input should be a valid boolean" in result.output and "clean.max_drop_frac: input should be less than or equal to 1" in result.output


def test_cli_missing_input_file_is_one_line(tmp_path, tiny_model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params.yaml", tiny_model, **{"fetch.source": "data/source/nope.jsonl"})
    result = CliRunner().invoke(fetch.main, ["--out", "raw", "--metrics", "fetch.json"])
    assert result.exit_code == 1 and "data/source/nope.jsonl" in result.output and "not found" in result.output
    assert not (tmp_path / "raw").exists()


@pytest.mark.parametrize("source", ["/etc/passwd", "../elsewhere/qa.jsonl", "data/raw/records.jsonl"])
def test_a_source_dvc_does_not_track_is_refused_without_reading_it(tmp_path, tiny_model, monkeypatch, source):
    """dvc.yaml's fetch stage depends on data/source/: a source elsewhere would not rerun the pipeline when it
    changes, and an error about its columns could quote a line of a file outside the project."""
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params.yaml", tiny_model, **{"fetch.source": source})
    result = CliRunner().invoke(fetch.main, ["--out", "raw", "--metrics", "fetch.json"])
    assert result.exit_code == 1 and f"fetch.source {source!r}: expected a file or folder under data/source/" in result.output
    assert "root:" not in result.output and len(result.output.strip().splitlines()) == 1 and not (tmp_path / "raw").exists()


def test_cli_empty_dataset_fails_and_keeps_previous_output(tmp_path, tiny_model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params.yaml", tiny_model, **{"fetch.source": "data/source/empty.jsonl"})
    (tmp_path / "data" / "source").mkdir(parents=True)
    (tmp_path / "data" / "source" / "empty.jsonl").write_text("")
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "records.jsonl").write_text("previous\n")
    result = CliRunner().invoke(fetch.main, ["--out", "raw", "--metrics", "fetch.json"])
    assert result.exit_code == 1 and "empty.jsonl: file is empty" in result.output
    assert (tmp_path / "raw" / "records.jsonl").read_text() == "previous\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".raw")] == []


# ---------------------------------------------------------------- bad records, PHI, selection


def write_raw(tmp_path, rows) -> Path:
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "raw"


def test_clean_drops_bad_records_by_reason(tmp_path, tiny_rows):
    good = [{"id": str(i), "question": r["question"], "answer": r["answer"]} for i, r in enumerate(tiny_rows[:20])]
    bad = [{"id": "no-answer", "question": "What is missing here?"},              # missing field
           {"id": "list", "question": "What type is this?", "answer": ["a list"]},  # wrong type
           {"id": "empty", "question": "   ", "answer": tiny_rows[0]["answer"] + " More."},  # empty text
           {"id": "turns", "messages": [{"role": "user", "content": "Hello doctor?"}]}]  # dialogue without an answer
    summary = clean.run(clean_params(), write_raw(tmp_path, good + bad), tmp_path / "clean")
    assert summary["dropped"] == {"missing_answer": 1, "not_text": 1, "short_question": 1, "bad_messages": 1}
    assert summary["rows_out"] == 20


@pytest.mark.parametrize("action", ["keep", "mask", "drop"])
def test_clean_flags_likely_phi_and_masks_or_drops_it(tmp_path, tiny_rows, action):
    rows = [{"id": str(i), "question": r["question"], "answer": r["answer"]} for i, r in enumerate(tiny_rows[:20])]
    rows[0]["question"] = "My son (DOB: 04/12/2015, MRN: 48213377) has a fever. What should I do?"
    rows[1]["answer"] += " Write to jane.doe@example.org or call (301) 555-0199."
    summary = clean.run(clean_params(phi=action), write_raw(tmp_path, rows), tmp_path / "clean")
    assert summary["phi"] == {"date_of_birth": 1, "email": 1, "phone": 1, "record_number": 1} and summary["phi_rows"] == 2
    out = {r["id"]: r for r in read_jsonl(tmp_path / "clean" / "records.jsonl")}
    if action == "keep":
        assert "jane.doe@example.org" in out["1"]["answer"] and "48213377" in out["0"]["question"]
    elif action == "mask":
        assert out["0"]["question"] == "My son ([DATE_OF_BIRTH], [RECORD_NUMBER]) has a fever. What should I do?"
        assert out["1"]["answer"].endswith("Write to [EMAIL] or call [PHONE].") and summary["changed"] == {"phi_masked": 2}
    else:
        assert "0" not in out and "1" not in out and summary["dropped"]["phi"] == 2


def test_clean_keeps_the_rows_with_the_longest_field(tmp_path, tiny_rows):
    rows = [{"id": str(i), "question": r["question"], "answer": r["answer"]} for i, r in enumerate(tiny_rows[:20])]
    summary = clean.run(clean_params(select_longest=5, select_field="answer"), write_raw(tmp_path, rows), tmp_path / "clean")
    kept = read_jsonl(tmp_path / "clean" / "records.jsonl")
    longest = sorted((len(normalise(r["answer"])) for r in rows), reverse=True)[:5]
    assert sorted((len(r["answer"]) for r in kept), reverse=True) == longest and summary["not_selected"] == 15


def test_fetch_malformed_xml_names_the_file_and_line(tmp_path):
    folder = tmp_path / "xml" / "6_NINDS_QA"
    shutil.copytree(ASSETS / "medquad_xml" / "6_NINDS_QA", folder)
    (folder / "0000999.xml").write_text('<?xml version="1.0"?>\n<Document id="1">\n<QAPairs>\n</Document>\n')
    with pytest.raises(MedtuneError, match=r"0000999.xml:4: malformed XML"):
        fetch.run(fetch_params(tmp_path / "xml"), BASE, tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_fetch_mix_entry_problems_name_the_entry(tmp_path, tiny_model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    entry = {"source": "x.jsonl", "revision": None, "subset": None, "split": "train", "id_column": None, "columns": {"q": "question"}}
    write_params(tmp_path / "params.yaml", tiny_model, **{"fetch.mix": [entry, {"source": "y.jsonl"}]})
    result = CliRunner().invoke(fetch.main, ["--out", "raw", "--metrics", "fetch.json"])
    assert result.exit_code == 1 and "fetch.mix.0.columns: map question and answer" in result.output
    assert "fetch.mix.1.revision: missing" in result.output and not (tmp_path / "raw").exists()


# ---------------------------------------------------------------- split


@pytest.fixture
def sample_clean(tmp_path) -> Path:
    """The default run's 400 real MedQuAD rows, cleaned."""
    src = Path(__file__).parent.parent / "data" / "source" / "medquad_sample.jsonl"
    fetch.run(fetch_params(src, columns=COLUMNS | {"qtype": "qtype"}), BASE, tmp_path / "raw")
    clean.run(clean_params(), tmp_path / "raw", tmp_path / "clean")
    return tmp_path / "clean"


@pytest.mark.parametrize("val,test", [(0.1, 0.1), (0.15, 0.15)])
def test_split_ratios_are_params_and_groups_never_straddle(tmp_path, sample_clean, val, test):
    summary = split.run(split_params(val_frac=val, test_frac=test), BASE, sample_clean, tmp_path / "split")
    n = summary["train"] + summary["val"] + summary["test"]
    assert n == len(read_jsonl(sample_clean / "records.jsonl")) and summary["leakage_ok"]
    assert abs(summary["test"] / n - test) < 0.05 and abs(summary["val"] / n - val) < 0.05
    parts = {s: read_jsonl(tmp_path / "split" / f"{s}.jsonl") for s in SPLITS}
    for field in ("focus", "url"):
        assert not {r[field] for r in parts["train"]} & {r[field] for r in parts["test"]}
    near = NearDups(0.9)
    for r in parts["train"]:
        near.add(r["id"], answer_sig(r))
    assert not any(near.matches(answer_sig(r)) for r in parts["test"])  # no near-duplicate answer across train/test


def test_split_holds_out_whole_sources_and_drops_train_repeats(tmp_path, sample_clean):
    rows = read_jsonl(sample_clean / "records.jsonl")
    ninds = next(r for r in rows if r["source"] == "6_NINDS_QA")
    copies = [{**rows[0], "id": "copy/question", "source": "3_GHR_QA", "focus": "copy", "url": "u1", "question": ninds["question"]},
              {**rows[0], "id": "copy/answer", "source": "3_GHR_QA", "focus": "copy2", "url": "u2", "question": "What is new here?",
               "answer": ninds["answer"] + " Extra."}]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + copies))
    summary = split.run(split_params(test_sources=["1_CancerGov_QA", "6_NINDS_QA"]), BASE, tmp_path / "in", tmp_path / "split")
    parts = {s: read_jsonl(tmp_path / "split" / f"{s}.jsonl") for s in SPLITS}
    assert {r["source"] for r in parts["test"]} == {"1_CancerGov_QA", "6_NINDS_QA"}
    assert summary["test"] == sum(r["source"] in ("1_CancerGov_QA", "6_NINDS_QA") for r in rows)
    kept = {r["id"] for s in ("train", "val") for r in parts[s]}
    assert "copy/question" not in kept and "copy/answer" not in kept
    assert sum(summary["dropped_leaks"].values()) >= 2 and summary["leakage_ok"]
    assert summary["train"] + summary["val"] + summary["test"] + sum(summary["dropped_leaks"].values()) == len(rows) + 2


def test_split_unknown_test_source_is_named(tmp_path, sample_clean):
    with pytest.raises(MedtuneError, match=r"split.test_sources: no rows with source '4_MPlus_QA'"):
        split.run(split_params(test_sources=["4_MPlus_QA"]), BASE, sample_clean, tmp_path / "split")


def test_split_refuses_to_write_a_leaking_split(tmp_path, sample_clean, monkeypatch):
    """The leakage check is the stage's guarantee, independent of the grouping: break the grouping, it still holds."""
    monkeypatch.setattr(splitting, "group_rows", lambda rows, *a: list(range(len(rows))))
    rows = read_jsonl(sample_clean / "records.jsonl")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "records.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows + [{**r, "id": r["id"] + "/again"} for r in rows]))
    with pytest.raises(MedtuneError, match=r"train rows repeat a test question or near-duplicate answer, e\.g\. train"):
        split.run(split_params(), BASE, tmp_path / "in", tmp_path / "split")
    assert not (tmp_path / "split").exists()


# ---------------------------------------------------------------- format


@pytest.fixture
def split_dir(tmp_path, clean_dir) -> Path:
    split.run(split_params(), BASE, clean_dir, tmp_path / "split")
    return tmp_path / "split"


def tiny_m(tiny_model):
    from medtune.params import ModelParams

    return ModelParams(base=str(tiny_model), revision=local_revision(tiny_model), chat_template="gemma3_base", trust_remote_code=False)


def test_format_disclaimer_goes_to_the_chosen_fraction(tmp_path, split_dir, tiny_model):
    d = {"enabled": True, "text": "not medical advice", "position": "start", "fraction": 0.5}
    summary = format_stage.run(format_params(template="qa", disclaimer=d), tiny_m(tiny_model), split_dir, tmp_path / "a")
    rows = [r for s in SPLITS for r in read_jsonl(tmp_path / "a" / f"{s}.jsonl")]
    with_it = [r for r in rows if r["disclaimer"]]
    assert 0.2 < len(with_it) / len(rows) < 0.8 and sum(summary[s]["with_disclaimer"] for s in SPLITS) == len(with_it)
    assert all(r["completion"].startswith("not medical advice\n\n") for r in with_it)
    assert not any("not medical advice" in r["completion"] for r in rows if not r["disclaimer"])
    format_stage.run(format_params(template="qa", disclaimer=d | {"position": "end"}), tiny_m(tiny_model), split_dir, tmp_path / "b")
    again = {r["id"]: r for s in SPLITS for r in read_jsonl(tmp_path / "b" / f"{s}.jsonl")}
    assert all(again[r["id"]]["completion"].endswith("not medical advice<eos>") for r in with_it)  # same rows chosen


def test_format_overflow_drops_or_truncates(tmp_path, split_dir, tiny_model):
    m, system = tiny_m(tiny_model), " ".join(["answer the question about the condition"] * 5)  # a 30-token prompt prefix
    kw = {"system_prompt": system, "template": "qa", "max_answer_tokens": 60, "max_length": 64}
    dropped = format_stage.run(format_params(**kw), m, split_dir, tmp_path / "drop")
    cut = format_stage.run(format_params(**kw, overflow="truncate"), m, split_dir, tmp_path / "cut")
    assert dropped["train"]["over_max_length"] == cut["train"]["over_max_length"] > 0
    assert dropped["train"]["dropped_too_long"] == dropped["train"]["over_max_length"] and dropped["train"]["truncated_to_fit"] == 0
    assert cut["train"]["truncated_to_fit"] > 0 and cut["train"]["rows"] > dropped["train"]["rows"]
    assert all(r["n_tokens"] <= 64 for r in read_jsonl(tmp_path / "cut" / "train.jsonl"))


def test_format_overflow_cut_reproduces_plain_trl_truncation_and_train_accepts_it(tmp_path, split_dir, tiny_model):
    """overflow=cut: long examples are cut at max_length tokens and lose their end token, as a plain trl run
    truncates them (the baseline of a comparison); train accepts exactly those rows without an end token."""
    from medtune.params import ModelParams
    from medtune.stages import train

    m, system = tiny_m(tiny_model), " ".join(["answer the question about the condition"] * 5)
    kw = {"system_prompt": system, "template": "qa", "max_answer_tokens": 60, "max_length": 64}
    shortened = format_stage.run(format_params(**kw, overflow="truncate"), m, split_dir, tmp_path / "short")
    cut = format_stage.run(format_params(**kw, overflow="cut"), m, split_dir, tmp_path / "cut")
    assert cut["train"]["rows"] >= shortened["train"]["rows"] and cut["train"]["truncated_to_fit"] > 0
    rows = read_jsonl(tmp_path / "cut" / "train.jsonl")
    long = [r for r in rows if r.get("cut_at_max_length")]
    assert len(long) == cut["train"]["truncated_to_fit"]
    assert all(60 <= r["n_tokens"] <= 64 and not r["completion"].endswith("<eos>") for r in long)
    assert all(r["completion"].endswith("<eos>") for r in rows if not r.get("cut_at_max_length"))
    test = read_jsonl(tmp_path / "cut" / "test.jsonl")
    assert test == read_jsonl(tmp_path / "short" / "test.jsonl")  # test prompts and references do not change

    p = TrainParams(**(tiny_params(tiny_model)["train"] | {"max_length": 64, "max_steps": 1, "save_steps": 0}))
    mp = ModelParams(base=str(tiny_model), revision=local_revision(tiny_model), chat_template="gemma3_base", trust_remote_code=False)
    metrics = train.run(p, mp, BaseParams(seed=3), tmp_path / "cut", tmp_path / "adapter", tmp_path / "curves", tmp_path / "ckpt")
    assert metrics["steps"] == 1 and (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_format_mcq_template_needs_multiple_choice_rows(tmp_path, split_dir, tiny_model):
    with pytest.raises(MedtuneError, match=r"train.jsonl: format.template=mcq: row '.*' has no options"):
        format_stage.run(format_params(template="mcq"), tiny_m(tiny_model), split_dir, tmp_path / "fmt")
    assert not (tmp_path / "fmt").exists()


def test_format_params_check_the_disclaimer_mapping(tmp_path, tiny_model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params.yaml", tiny_model, **{"format.disclaimer": {"enabled": True, "text": "x", "position": "middle"}})
    (tmp_path / "in").mkdir()
    result = CliRunner().invoke(format_stage.main, ["--in", "in", "--out", "out", "--metrics", "m.json"])
    assert result.exit_code == 1 and "format.disclaimer.position: input should be 'end' or 'start'" in result.output
    assert "format.disclaimer.fraction: missing" in result.output


def test_clean_strips_boilerplate_by_regex(tmp_path, tiny_rows):
    rows = [{"id": str(i), "question": r["question"], "answer": "Key Points - " + r["answer"]} for i, r in enumerate(tiny_rows[:10])]
    clean.run(clean_params(strip_boilerplate=[r"^Key Points -\s*"], near_dup_threshold=None), write_raw(tmp_path, rows), tmp_path / "clean")
    out = read_jsonl(tmp_path / "clean" / "records.jsonl")
    assert out and all(not r["answer"].startswith("Key Points") for r in out)
    assert {r["answer"] for r in out} <= {normalise(r["answer"]) for r in tiny_rows[:10]}


def test_fetch_non_utf8_names_the_line(tmp_path, tiny_rows):
    src = tmp_path / "mixed.jsonl"
    good = "".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in tiny_rows[:3])
    src.write_bytes(good.encode() + '{"question": "Qu\'est-ce que la fi\xe8vre ?", "answer": "x"}\n'.encode("latin-1"))
    with pytest.raises(MedtuneError, match=r"mixed.jsonl: not UTF-8 text at line 4, byte 34 \(invalid continuation byte\)"):
        fetch.run(fetch_params(src, id_column=None, columns={"question": "question", "answer": "answer"}), BASE, tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_format_multi_turn_needs_chat_or_qa(tmp_path, tiny_model):
    turns = [{"role": "user", "content": "What is glaucoma?"}, {"role": "assistant", "content": "An eye disease."},
             {"role": "user", "content": "How is it treated?"}, {"role": "assistant", "content": "With eye drops or surgery."}]
    (tmp_path / "split").mkdir()
    for s in SPLITS:
        (tmp_path / "split" / f"{s}.jsonl").write_text(json.dumps({"id": s, "question": "How is it treated?",
                                                                    "answer": "With eye drops or surgery.", "messages": turns}) + "\n")
    format_stage.run(format_params(template="qa"), tiny_m(tiny_model), tmp_path / "split", tmp_path / "qa")
    row = read_jsonl(tmp_path / "qa" / "train.jsonl")[0]
    assert row["prompt"] == ("### Question:\nWhat is glaucoma?\n\n### Answer:\nAn eye disease.\n\n"
                             "### Question:\nHow is it treated?\n\n### Answer:\n")
    assert row["completion"] == "With eye drops or surgery.<eos>"
    with pytest.raises(MedtuneError, match=r"train.jsonl: format.template=alpaca: row 'train' is a multi-turn dialogue"):
        format_stage.run(format_params(template="alpaca"), tiny_m(tiny_model), tmp_path / "split", tmp_path / "alpaca")


@pytest.mark.parametrize("options,key,correct", [({"A": "Vitamin A", "B": "Vitamin C"}, "letter", "b"),
                                                 (["Vitamin A", "Vitamin C"], "index0", 1),
                                                 (["Vitamin A", "Vitamin C"], "text", "vitamin c")])
def test_fetch_options_column_as_mapping_or_list(tmp_path, options, key, correct):
    src = tmp_path / "mcq.jsonl"
    src.write_text(json.dumps({"id": "q1", "question": "Which vitamin deficiency causes scurvy?", "options": options, "answer_idx": correct})
                   + "\n" + json.dumps({"id": "q2", "question": "Which one?", "options": options, "answer_idx": 7 if key == "index0" else "z"}) + "\n")
    fetch.run(fetch_params(src, columns={"question": "question", "options": "options", "correct": "answer_idx"}, answer_key=key),
              BASE, tmp_path / "raw")
    q1, q2 = read_jsonl(tmp_path / "raw" / "records.jsonl")
    assert (q1["options"], q1["correct"], q1["answer"]) == ({"A": "Vitamin A", "B": "Vitamin C"}, "B", "Vitamin C")
    assert q2["correct"] is None  # names no option: clean drops it as bad_correct_option
    assert clean.run(clean_params(min_answer_chars=1, max_drop_frac=1.0), tmp_path / "raw", tmp_path / "clean")["dropped"] == {"bad_correct_option": 1}


@pytest.mark.parametrize("action", ["keep", "mask"])
def test_report_counts_phi_left_in_the_training_data(tmp_path, tiny_rows, tiny_model, action):
    from medtune.stages import report

    rows = [{"id": r["id"], "question": r["question"], "answer": r["answer"] + f" Call 301-555-01{i:02d}.", "focus": r["focus"]}
            for i, r in enumerate(tiny_rows[:30])]
    c = clean.run(clean_params(phi=action), write_raw(tmp_path, rows), tmp_path / "clean")
    (tmp_path / "raw" / "manifest.json").write_text(json.dumps({"source": "x.jsonl", "rows": len(rows), "sources": {}}))
    split.run(split_params(group_by=["focus"]), BASE, tmp_path / "clean", tmp_path / "split")
    format_stage.run(format_params(max_answer_tokens=80, max_length=128), tiny_m(tiny_model), tmp_path / "split", tmp_path / "fmt")
    key, details, md = report.run(ReportParams(n_examples=3), format_params(max_answer_tokens=80, max_length=128),
                                  tiny_m(tiny_model), tmp_path / "raw", tmp_path / "clean", tmp_path / "split", tmp_path / "fmt")
    assert c["phi"] == {"phone": c["phi_rows"]} and c["phi_rows"] >= 25
    assert key["phi_flagged"] == (key["rows_train"] if action == "keep" else 0)
    assert f"clean.phi = {action}" in md


def test_fetch_reads_a_json_array_and_clean_reads_sharegpt_turns(tmp_path):
    """ChatDoctor ships one JSON array per file; many dialogue sets use ShareGPT's {from: human/gpt, value} turns."""
    chat = read_jsonl(ASSETS / "chatdoctor_tiny.jsonl")
    (tmp_path / "chatdoctor.json").write_text(json.dumps(chat, indent=2))
    cols = {"instruction": "instruction", "question": "input", "answer": "output"}
    assert fetch.run(fetch_params(tmp_path / "chatdoctor.json", columns=cols), BASE, tmp_path / "a")["rows"] == len(chat)
    assert read_jsonl(tmp_path / "a" / "records.jsonl")[0]["question"] == chat[0]["input"]

    dialogues = read_jsonl(ASSETS / "dialogue_tiny.jsonl")
    share = [{"id": d["id"], "conversations": [{"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
                                               for m in d["messages"]]} for d in dialogues]
    share[0]["conversations"][1]["from"] = "robot"  # an unknown speaker: the row is dropped
    (tmp_path / "share.jsonl").write_text("".join(json.dumps(r) + "\n" for r in share))
    fetch.run(fetch_params(tmp_path / "share.jsonl", columns={"messages": "conversations"}), BASE, tmp_path / "raw")
    summary = clean.run(clean_params(min_answer_chars=10), tmp_path / "raw", tmp_path / "clean")
    out = {r["id"]: r for r in read_jsonl(tmp_path / "clean" / "records.jsonl")}
    assert summary["dropped"] == {"bad_messages": 1} and len(out) == len(dialogues) - 1
    d = dialogues[1]
    assert out[d["id"]]["messages"] == d["messages"] and out[d["id"]]["answer"] == d["messages"][-1]["content"]
